"""`mirror-deploy learn-draft` (issue 37): a draft cut to fewer layers and taught by the target. Used as people
would (the CLI, relative paths, another working directory), exported like any draft, every mode equal to AR,
sampling exact, `check` passing; a draft taught by another target refused at export and at load; an
interrupted run leaves the folder as it was."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mirror_deploy import cli
from mirror_deploy.artifact import MANIFEST
from mirror_deploy.check import check_artifact
from mirror_deploy.decoding.config import GenerationConfig as G
from mirror_deploy.decoding.engine import Engine
from mirror_deploy.errors import MirrorDeployError
from mirror_deploy.export.pipeline import ExportOptions, export_artifact
from mirror_deploy.tiny import build_tiny_pair
from mirror_deploy.learned_draft import PROVENANCE
from mirror_deploy.tuning.learn_draft import learn_draft

runner = CliRunner()
OPTS = dict(kappa=4, gamma=4, max_context=128, branch_batch=4)


def _prompts(folder):
    """Eight calibration prompts, four a category (one of each is held out): the shipped 48 cost
    the tests time and teach a random tiny model nothing more."""
    path = folder / "prompts.jsonl"
    rows = [{"category": c, "prompt": f"{c} prompt number {i}: say something"} for c in ("chat", "code") for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _learn(target, draft, out, layers=2, passes=2):
    """Bounded by passes, not time: the same steps on a fast or a loaded machine."""
    from rich.console import Console
    return learn_draft(target, draft, out, layers, 10.0, _prompts(out.parent), 12, 0, 0, Console(quiet=True),
                       max_passes=passes)


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A 4-layer draft cut to 2 layers and taught through the CLI, from another working directory with
    relative paths; then exported beside its target."""
    root = tmp_path_factory.mktemp("learned")
    target, draft = build_tiny_pair(root / "m", "qwen2", noise=0.3)
    work = root / "work"
    work.mkdir()
    _prompts(work)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        result = runner.invoke(cli.app, ["learn-draft", "../m/target", "../m/draft", "small", "--layers", "2",
                                         "--minutes", "10", "--passes", "3", "--code-tokens", "0", "--new-tokens", "12",
                                         "--prompts", "prompts.jsonl"],
                               env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    out = work / "small"
    art = export_artifact(target, out, root / "art", ExportOptions(**OPTS))
    return target, draft, out, art, " ".join(result.output.split())


def test_learned_draft_is_a_cut_checkpoint_with_its_record(learned):
    target, draft, out, art, text = learned
    config = json.loads((out / "config.json").read_text())
    record = json.loads((out / PROVENANCE).read_text())
    assert config["num_hidden_layers"] == 2 and record["layers_kept"] == [0, 3] and record["of_layers"] == 4
    held = record["held_out"]
    assert all(0.0 <= held[k] <= 1.0 for k in ("full_draft", "cut_untrained", "learned"))
    assert record["training"]["steps"] > 0 and record["training"]["last_loss"] < record["training"]["first_loss"]
    assert "held-out agreement with the target" in text and "--draft small" in text
    manifest = json.loads((art / MANIFEST).read_text())
    assert manifest["draft"]["learned"]["target"]["weights_sha256"] == manifest["target"]["weights_sha256"]
    assert manifest["draft"]["num_layers"] == 2


def test_every_mode_equals_ar_and_check_passes(learned):
    *_, art, _ = learned
    engine = Engine(art)
    for prompt in ([3, 5, 7, 2], [9, 1, 4, 4, 8, 20]):
        ar = engine.generate(prompt, G(mode="ar", max_new_tokens=20, stop_at_eos=False)).tokens
        for mode in ("sd", "mirror"):
            assert engine.generate(prompt, G(mode=mode, max_new_tokens=20, stop_at_eos=False)).tokens == ar, mode
    report = check_artifact(art)
    assert report.ok, [r for r in report.rows if r.result == "FAIL"]


def test_a_draft_taught_by_another_target_is_refused(learned, tmp_path):
    target, draft, out, art, _ = learned
    other, _ = build_tiny_pair(tmp_path / "other", "qwen2", seed=7)
    with pytest.raises(MirrorDeployError) as err:
        export_artifact(other, out, tmp_path / "art", ExportOptions(**OPTS))
    assert "was taught by target" in str(err.value) and "learn-draft" in err.value.fix
    assert not (tmp_path / "art").exists()
    # an artifact whose manifest pairs them anyway is refused at load, with the same fix
    import shutil
    copy = shutil.copytree(art, tmp_path / "copy")
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["draft"]["learned"]["target"]["weights_sha256"] = "0" * 64
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MirrorDeployError) as err:
        Engine(copy)
    assert "learn-draft" in err.value.fix


def test_bad_layers_and_interrupted_run(learned, tmp_path, monkeypatch):
    target, draft, *_ = learned
    with pytest.raises(MirrorDeployError, match="--layers 4"):
        _learn(target, draft, tmp_path / "x", layers=4)
    from rich.console import Console
    few = tmp_path / "few.jsonl"
    few.write_text('{"category": "chat", "prompt": "hello"}\n')
    with pytest.raises(MirrorDeployError, match="none is held out"):
        learn_draft(target, draft, tmp_path / "x", 2, 1.0, few, 12, 0, 0, Console(quiet=True))
    assert not (tmp_path / "x").exists()
    out = tmp_path / "kept"
    out.mkdir()
    (out / "mine.txt").write_text("untouched")
    import mirror_deploy.tuning.learn_draft as module

    def broken(model, tokenizer, folder, record):
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt
    monkeypatch.setattr(module, "_save", broken)
    with pytest.raises(KeyboardInterrupt):
        _learn(target, draft, out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".kept")]


def test_sampling_with_a_learned_draft_keeps_the_target_distribution(tmp_path):
    """The χ² test of test_sampling.py on a learned draft (12-token vocabulary, enumerable marginals)."""
    from test_sampling import V, _chi2_pvalue, _exact_marginals, _sample_counts
    from transformers import AutoModelForCausalLM
    import torch
    target, draft = build_tiny_pair(tmp_path / "m", "llama", noise=0.5, vocab_size=V)
    _learn(target, draft, tmp_path / "small", layers=1)
    engine = Engine(export_artifact(target, tmp_path / "small", tmp_path / "art",
                                    ExportOptions(exit_layer=2, kappa=6, gamma=2, branch_batch=3, max_context=64)))
    model = AutoModelForCausalLM.from_pretrained(target).eval()
    prompt = [3, 5, 7, 2]
    cfg = dict(mode="mirror", temperature=1.0, top_k=8, verify_rule="rejection", schedule="overlapped")
    exact = _exact_marginals(model, torch, prompt, G(**cfg), 3)
    counts = _sample_counts(engine, prompt, cfg, 3)
    assert min(_chi2_pvalue(counts[i], exact[i]) for i in range(3)) > 1e-3


def test_anatomy_reports_the_draft_share_and_the_learned_agreement(learned):
    from rich.console import Console

    from mirror_deploy.bench.anatomy import anatomy, print_anatomy
    *_, art, _ = learned
    engine = Engine(art)
    figures = anatomy(engine, context=40, rounds=1, prefill_tokens=16)
    console = Console(record=True, width=300)
    print_anatomy(figures, engine, 40, console)
    text = console.export_text()
    assert "draft call × 1 ÷ target step × 1" in text and "learned draft: 2 of 4 layers" in text


def test_the_record_names_its_training_prompts_and_tuning_holds_them_out(learned):
    from mirror_deploy.learned_draft import trained_prompts
    from mirror_deploy.artifact import read_manifest
    from mirror_deploy.tuning.calibration import load_prompts, prompt_sha256
    target, draft, out, art, _ = learned
    trained = trained_prompts(read_manifest(art))
    prompts = load_prompts(out.parent / "prompts.jsonl")
    # four prompts a category, a quarter of each held out: six trained, one of each category left out
    every = {prompt_sha256(p.text): p.category for p in prompts}
    assert trained < set(every) and len(trained) == 6
    assert sorted(every[h] for h in set(every) - trained) == ["chat", "code"]
