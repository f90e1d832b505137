"""The draft head cut to V tokens (FR-Spec, issue 21): output stays the target's own (greedy and sampled),
the cut graph is the same head on its V columns, `check` guards it, and bad sizes leave the artifact as it was."""
from __future__ import annotations

import shutil

import numpy as np
import openvino as ov
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mirror_deploy import cli
from mirror_deploy.artifact import read_manifest
from mirror_deploy.check import FAIL, check_artifact
from mirror_deploy.decoding.config import GenerationConfig as G
from mirror_deploy.decoding.engine import Engine
from mirror_deploy.errors import MirrorDeployError
from mirror_deploy.export.pipeline import ExportOptions, export_artifact
from mirror_deploy.export.vocab_cut import cut_head
from mirror_deploy.tiny import build_tiny_pair
from mirror_deploy.tuning.vocab import VocabChoice, VocabOptions, cut_vocab, write_cut

QUIET = Console(quiet=True)
PROMPTS = [list(range(5, 25)), [40, 41, 42], [7] * 9]
MODES = [("sd", "serial"), ("mirror", "serial"), ("mirror", "overlapped")]


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_tiny_pair(tmp_path_factory.mktemp("vocab-pair"), "qwen2", noise=0.05)


@pytest.fixture(scope="module")
def whole(pair, tmp_path_factory):
    opts = ExportOptions(kappa=4, gamma=4, max_context=256, branch_batch=4, draft_weights="int8", profile="cpu")
    return export_artifact(*pair, tmp_path_factory.mktemp("whole") / "art", opts, QUIET)


def _cut_copy(whole, tmp_path, ids):
    folder = shutil.copytree(whole, tmp_path / "cut")
    write_cut(folder, np.asarray(ids), VocabChoice(len(ids)))
    return folder


def _greedy(engine, prompt, mode="ar", schedule="serial", gamma=4):
    return engine.generate(prompt, G(max_new_tokens=24, mode=mode, schedule=schedule, gamma=gamma,
                                     stop_at_eos=False)).tokens


def test_a_cut_that_excludes_the_targets_tokens_keeps_every_mode_exact(whole, tmp_path):
    """V keeps the tokens the target emits least: the draft can rarely propose the right one, so only
    acceptance falls; every mode still equals autoregressive decoding."""
    engine = Engine(whole)
    expected = {tuple(p): _greedy(engine, p) for p in PROMPTS}
    engine.target.close()
    emitted = {t for out in expected.values() for t in out}
    ids = [t for t in range(128) if t not in emitted][:24] + sorted(emitted)[:2]
    cut = Engine(_cut_copy(whole, tmp_path, ids))
    assert cut.manifest.draft_vocab["size"] == len(ids) and list(cut.draft.vocab_ids) == ids
    assert sum(t not in ids for out in expected.values() for t in out) > 20
    for prompt in PROMPTS:
        assert _greedy(cut, prompt) == expected[tuple(prompt)]
        for mode, schedule in MODES:
            for gamma in (1, 3):
                assert _greedy(cut, prompt, mode, schedule, gamma) == expected[tuple(prompt)], (mode, gamma)
    # the draft's proposals come only from V
    window = cut.draft
    cut.draft.reset()
    rows = window.call([5, 6, 7], [-1, 0, 1], [0, 1, 2])
    assert rows.logits.shape == (3, len(ids)) and set(rows.top_ids.ravel()) <= set(ids)
    assert rows.argmax(0) in ids


def test_the_cut_graph_is_the_whole_head_on_its_columns(whole, tmp_path):
    """Same constants, fewer rows: the cut IR's logits equal the whole IR's on the kept ids, bit for bit."""
    core = ov.Core()
    ids = np.array([100, 3, 57, 9, 64, 11, 2, 90], np.int64)
    xml = str(whole / read_manifest(whole).graphs["draft_stateful"].file)
    full = core.compile_model(core.read_model(xml), "CPU")
    cut = core.compile_model(cut_head(core.read_model(xml), ids, ids), "CPU")
    feeds = {"input_ids": np.array([[5, 6, 7]]), "position_ids": np.array([[0, 1, 2]]),
             "attention_mask": np.triu(np.full((1, 1, 3, 3), -1e9, np.float32), 1),
             "output_rows": np.arange(3), "beam_idx": np.zeros(1, np.int32)}
    a = full.create_infer_request().infer(feeds)
    b = cut.create_infer_request().infer(feeds)
    names = {o.get_any_name(): o for o in cut.outputs}
    np.testing.assert_array_equal(b[names["logits"]], a[[o for o in full.outputs if o.get_any_name() == "logits"][0]][..., ids])
    np.testing.assert_array_equal(b[names["top_ids"]], ids[np.argsort(-b[names["logits"]], axis=-1)[..., :8]])


def test_check_passes_on_a_cut_artifact_and_catches_a_changed_id_file(whole, tmp_path):
    folder = _cut_copy(whole, tmp_path, list(range(0, 128, 2)))
    report = check_artifact(folder)
    assert not [r for r in report.rows if r.result == FAIL], report.rows
    parity = [r for r in report.rows if r.check == "parity logits" and r.graph == "draft_stateful"]
    assert parity and "head cut to 64 tokens" in parity[0].detail
    ids = np.load(folder / "draft_vocab_64.npy")
    np.save(folder / "draft_vocab_64.npy", ids[::-1])
    failed = [r for r in check_artifact(folder, skip_parity=True).rows if r.result == FAIL]
    assert any(r.check == "hash" and r.graph == "draft_stateful" for r in failed)


def test_a_cut_artifact_cuts_again_only_narrower(whole, tmp_path):
    folder = _cut_copy(whole, tmp_path, list(range(64)))
    before = _snapshot(folder)
    with pytest.raises(MirrorDeployError, match="(?s)outside \\[8, 64\\].*re-export to widen"):
        cut_vocab(folder, VocabOptions("100"), console=QUIET)
    with pytest.raises(MirrorDeployError, match="not auto, full or a number"):
        cut_vocab(folder, VocabOptions("lots"), console=QUIET)
    assert _snapshot(folder) == before
    write_cut(folder, np.arange(64)[::-1][:16], VocabChoice(16))   # a subset, in a new order
    engine = Engine(folder)
    assert list(engine.draft.vocab_ids) == list(range(63, 47, -1))
    assert sorted(p.name for p in folder.glob("draft*")) == ["draft_stateful_v16.bin", "draft_stateful_v16.xml",
                                                             "draft_vocab_16.npy"]
    prompt = PROMPTS[0]
    assert _greedy(engine, prompt, "mirror", "overlapped") == _greedy(engine, prompt)


def test_cut_vocab_command_measures_and_writes(whole, tmp_path, monkeypatch):
    """As a user runs it: a relative path from another folder; the table, then a run on the result."""
    folder = shutil.copytree(whole, tmp_path / "work" / "art")
    monkeypatch.chdir(tmp_path / "work")
    result = CliRunner().invoke(cli.app, ["cut-vocab", "art", "--size", "48", "--new-tokens", "8", "--rounds", "1"])
    assert result.exit_code == 0, result.output
    assert "coverage" in result.output and "V = 48" in result.output
    m = read_manifest(folder)
    assert m.draft_vocab["size"] == 48 and 0 <= m.draft_vocab["heldout_coverage"] <= 1
    again = CliRunner().invoke(cli.app, ["run", "art", "--prompt", "abc", "--mode", "mirror", "--max-new-tokens", "8"])
    assert again.exit_code == 0, again.output
    bad = CliRunner().invoke(cli.app, ["cut-vocab", "art", "--size", "500"])
    assert bad.exit_code != 0 and "outside [8, 48]" in bad.output


# ---- sampling keeps the target's distribution with a cut draft ------------------------------------

V = 12


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM
    root = tmp_path_factory.mktemp("small")
    pair = build_tiny_pair(root, "llama", noise=0.5, vocab_size=V)
    folder = export_artifact(*pair, root / "art", ExportOptions(exit_layer=2, kappa=6, gamma=2, branch_batch=3,
                                                                max_context=64), QUIET)
    write_cut(folder, np.array([11, 4, 0, 7, 2, 9, 1, 5]), VocabChoice(8))
    return Engine(folder), AutoModelForCausalLM.from_pretrained(pair[0]).eval(), torch


@pytest.mark.parametrize("mode,schedule", [("sd", "serial"), ("mirror", "overlapped")])
def test_sampling_keeps_the_target_distribution_with_a_cut_draft(small, mode, schedule):
    from test_sampling import _chi2_pvalue, _exact_marginals, _sample_counts
    engine, model, torch = small
    assert engine.draft.vocab_ids is not None
    prompt = [3, 5, 7, 2]
    cfg = dict(mode=mode, temperature=1.0, top_k=8, verify_rule="rejection", schedule=schedule)
    exact = _exact_marginals(model, torch, prompt, G(**cfg), 2)
    counts = _sample_counts(engine, prompt, cfg, 2)
    assert min(_chi2_pvalue(counts[i], exact[i]) for i in range(2)) > 1e-3
