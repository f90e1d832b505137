"""A user's clone has nothing beside it: `bench` runs on the SpecBench questions shipped in the package,
and nothing the project ships cites a path outside the repository."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_runs_from_a_clone_with_nothing_beside_it(tiny_artifacts, tmp_path):
    clone = tmp_path / "somewhere" / "clone"
    shutil.copytree(REPO / "mirror_deploy", clone / "mirror_deploy",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    assert not (clone.parent / "shared").exists() and not (clone.parent.parent / "shared").exists()
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copytree(tiny_artifacts["qwen2"], work / "art")
    env = {k: v for k, v in os.environ.items() if k != "MIRROR_DEPLOY_SPECBENCH"}
    env["PYTHONPATH"] = str(clone)   # the clone's package, not the checkout's
    code = ("import sys, mirror_deploy; assert mirror_deploy.__file__.startswith(sys.argv[1]), mirror_deploy.__file__;"
            "from mirror_deploy.cli import app; sys.argv = ['mirror-deploy', *sys.argv[2:]]; app()")
    done = subprocess.run([sys.executable, "-c", code, str(clone), "bench", "art", "--per-task", "1",
                           "--max-new-tokens", "2", "--modes", "ar", "--out", "b"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(line) for line in (work / "b" / "results.jsonl").read_text().splitlines()]
    # the tiny artifact's 256 positions pass over the long prompts (summaries, RAG): the rest ran
    assert {"mt_bench", "translation", "qa", "math_reasoning"} <= {r["task"] for r in records}
    assert (work / "b" / "summary.json").is_file()


def test_an_edited_packaged_question_file_is_refused(tmp_path, monkeypatch):
    import pytest

    from mirror_deploy.bench import specbench
    from mirror_deploy.errors import MirrorDeployError

    edited = tmp_path / "question.jsonl"
    edited.write_bytes(specbench.PACKAGED.read_bytes().replace(b"German", b"French", 1))
    monkeypatch.setattr(specbench, "PACKAGED", edited.resolve())
    with pytest.raises(MirrorDeployError, match="sha256"):
        specbench.load_prompts(None, path=edited)


def test_nothing_shipped_cites_a_path_outside_the_repository():
    shipped = [REPO / "README.md", REPO / "Makefile", REPO / "pyproject.toml",
               *(REPO / "mirror_deploy").rglob("*.py"), *(REPO / "docs").rglob("*.md")]
    cites = [f"{p.relative_to(REPO)}:{i}" for p in shipped
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\.\./shared", line)]
    assert cites == []
