"""A target-only artifact (`export TARGET` without `--draft`): it serves ar and lookup, refuses sd and
mirror with the fix, and passes `check`; driven through the CLI from another working directory with
relative paths, the way a user runs it."""
from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from mirror_deploy import cli
from mirror_deploy.decoding.config import GenerationConfig as G
from mirror_deploy.decoding.engine import Engine

runner = CliRunner()


@pytest.fixture(scope="module")
def target_only(tiny_pairs, tmp_path_factory):
    """(working directory, artifact path relative to it), exported through the CLI."""
    work = tmp_path_factory.mktemp("target-only")
    target, _ = tiny_pairs["llama"]
    here = os.getcwd()
    os.chdir(work)
    try:
        result = runner.invoke(cli.app, ["export", str(target), "--out", "art", "--kappa", "4", "--gamma", "4",
                                         "--max-context", "256", "--branch-batch", "4"])
    finally:
        os.chdir(here)
    assert result.exit_code == 0, result.output
    return work


def test_the_export_writes_no_draft_and_check_passes(target_only, monkeypatch):
    monkeypatch.chdir(target_only)
    manifest = json.loads(open("art/manifest.json").read())
    assert manifest["draft"] is None
    assert not any(name.startswith("draft") for name in manifest["graphs"])
    result = runner.invoke(cli.app, ["check", "art"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "target-only" in result.output


def test_lookup_is_the_default_and_equals_ar_twice_on_the_same_artifact(target_only, monkeypatch):
    monkeypatch.chdir(target_only)
    prompt = "abcabcabcab"
    ar = runner.invoke(cli.app, ["run", "art", "--prompt", prompt, "--mode", "ar", "--max-new-tokens", "16", "--json"])
    assert ar.exit_code == 0, ar.output
    for _ in range(2):   # a second run on the same artifact
        run = runner.invoke(cli.app, ["run", "art", "--prompt", prompt, "--max-new-tokens", "16", "--json"])
        assert run.exit_code == 0, run.output
        got, want = json.loads(run.stdout), json.loads(ar.stdout)
        assert got["metrics"]["mode"] == "lookup" and got["tokens"] == want["tokens"]


@pytest.mark.parametrize("mode", ["sd", "mirror"])
def test_sd_and_mirror_are_refused_with_the_fix(target_only, monkeypatch, mode):
    monkeypatch.chdir(target_only)
    result = runner.invoke(cli.app, ["run", "art", "--prompt", "hi", "--mode", mode])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "target-only" in text and "--mode ar" in text and "--draft" in text
    bench = runner.invoke(cli.app, ["bench", "art", "--modes", f"ar,{mode}", "--out", "b"])
    assert bench.exit_code == 2 and "target-only" in " ".join(bench.output.split())
    peers = runner.invoke(cli.app, ["bench", "art", "--modes", "ar", "--peers", "hf-assisted", "--out", "b"])
    assert peers.exit_code == 2 and "need the draft" in " ".join(peers.output.split())


def test_the_engine_opens_without_a_draft(target_only):
    engine = Engine(target_only / "art")
    assert engine.draft is None and engine.default_mode()[0] == "lookup"
    out = engine.generate("abcabcab", G(max_new_tokens=8, mode="lookup", stop_at_eos=False))
    assert out.tokens == engine.generate("abcabcab", G(max_new_tokens=8, mode="ar", stop_at_eos=False)).tokens
