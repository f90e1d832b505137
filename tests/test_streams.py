"""Speculative streams (issue 17): the graph surgery against the PyTorch block, exactness of every mode with
streams (greedy and sampling, trained or random streams), `learn-streams` end to end, and the cost arithmetic."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mirror_deploy.artifact import read_manifest
from mirror_deploy.costs import latency
from mirror_deploy.decoding.config import GenerationConfig as G
from mirror_deploy.decoding.engine import Engine
from mirror_deploy.errors import MirrorDeployError
from mirror_deploy.export.pipeline import ExportOptions, export_artifact
from mirror_deploy.tiny import build_tiny_pair
from test_sampling import V, _chi2_pvalue, _exact_marginals, tiny_vocab  # noqa: F401  (a fixture)


def attach_random_streams(folder, streams: int = 2, seed: int = 0, scale: float = 0.3):
    """Streams with random (untrained) weights: whatever they propose, the output must not change."""
    import torch

    from mirror_deploy.tuning.learn_streams import write_streams
    from mirror_deploy.tuning.streams import StreamBlock, StreamReport
    torch.manual_seed(seed)
    manifest = read_manifest(folder)
    block = StreamBlock(manifest.draft["hidden_size"])
    torch.nn.init.normal_(block.w_out.weight, std=scale / manifest.draft["hidden_size"] ** 0.5)
    report = StreamReport(streams, 0, 0, [0.5] * (streams + 1), 0.5, 0.0)
    write_streams(folder, manifest, block, report, [], 0)
    return block


@pytest.fixture(scope="module")
def random_streams(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    pair = build_tiny_pair(root / "m", "qwen2", target_layers=6, noise=0.3)
    art = export_artifact(*pair, root / "art", ExportOptions(kappa=4, gamma=4, max_context=256, branch_batch=4))
    block = attach_random_streams(art)
    return Engine(art), pair, block


def test_the_streams_graph_computes_the_block(random_streams):
    """OpenVINO's stream outputs equal the PyTorch block walked from the draft's own head input."""
    import torch
    from transformers import AutoModelForCausalLM

    engine, (_, draft_dir), block = random_streams
    runner = engine.stream_draft()
    tokens = [5, 9, 17, 3, 22, 8]
    runner.reset()
    rows = runner.call(tokens, [-1] + list(range(len(tokens) - 1)), list(range(len(tokens))))
    model = AutoModelForCausalLM.from_pretrained(draft_dir).eval()
    with torch.no_grad():
        z = model.model(input_ids=torch.tensor([tokens])).last_hidden_state[0]
        head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        token = (z @ head.T).argmax(-1)
        assert token.tolist() == rows.top_ids[:, 0].tolist()
        for j in range(runner.streams):
            z = block(z, embed[token])
            logits = z @ head.T
            np.testing.assert_allclose(rows.streams[0][:, j], logits.numpy(), rtol=1e-4, atol=1e-4)
            token = logits.argmax(-1)
            assert token.tolist() == rows.streams[1][:, j, 0].tolist()
    assert not np.allclose(rows.streams[0][:, 0], rows.logits, atol=1e-3)   # the block is not the identity


@pytest.mark.parametrize("mode,schedule", [("sd", "serial"), ("mirror", "overlapped"), ("mirror", "serial")])
def test_greedy_with_streams_equals_autoregressive(random_streams, mode, schedule):
    engine = random_streams[0]
    for prompt in ("The quick brown fox", "def add(a, b):"):
        expected = engine.generate(prompt, G(max_new_tokens=40, mode="ar", stop_at_eos=False)).tokens
        for gamma, adaptive, lookup in ((1, False, False), (2, False, False), (3, False, False), (4, False, False),
                                        (4, True, False), (4, True, True)):
            result = engine.generate(prompt, G(max_new_tokens=40, mode=mode, schedule=schedule, gamma=gamma,
                                               adaptive_gamma=adaptive, streams=True, lookup=lookup,
                                               stop_at_eos=False))
            assert result.tokens == expected, (prompt, gamma, adaptive, lookup)
            if gamma >= 3 and not adaptive:
                # a call yields up to 1 + S tokens: fewer calls than proposed tokens
                assert result.summary["draft_tokens_per_call"] > 1.0
                assert result.summary["acceptance_by_stream"] is not None


def test_the_static_npu_draft_takes_streams_too(static_artifact, tmp_path):
    """The NPU-shaped draft (static width and KV) gets its own streams variant; runs on it stay exact."""
    import shutil
    art = shutil.copytree(static_artifact, tmp_path / "art")
    attach_random_streams(art)
    manifest = read_manifest(art)
    assert manifest.draft_streams["graphs"]["draft_static"] == "draft_static_streams"
    engine = Engine(art)
    assert engine.stream_draft().static_seq and engine.stream_draft().streams == 2
    expected = engine.generate("The quick brown fox", G(max_new_tokens=24, mode="ar", stop_at_eos=False)).tokens
    for mode in ("sd", "mirror"):
        result = engine.generate("The quick brown fox", G(max_new_tokens=24, mode=mode, gamma=4, adaptive_gamma=False,
                                                          streams=True, stop_at_eos=False))
        assert result.tokens == expected and result.summary["draft_tokens_per_call"] > 1.0


def test_streams_are_refused_where_they_do_not_apply(random_streams, tiny_artifacts):
    engine = random_streams[0]
    with pytest.raises(MirrorDeployError, match="streams"):
        engine.generate("Hi", G(mode="ar", streams=True).validate())
    plain = Engine(tiny_artifacts["llama"])
    with pytest.raises(MirrorDeployError, match="learn-streams"):
        plain.generate("Hi", G(mode="sd", streams=True, max_new_tokens=4))


@pytest.fixture(scope="module")
def sampled_streams(tiny_vocab, tmp_path_factory):
    engine = tiny_vocab[0]
    attach_random_streams(engine.folder, streams=1, seed=1, scale=1.0)
    return Engine(engine.folder), tiny_vocab[1], tiny_vocab[2]


@pytest.mark.parametrize("mode,schedule", [("sd", "serial"), ("mirror", "overlapped")])
def test_sampling_with_streams_keeps_the_target_distribution(sampled_streams, mode, schedule):
    engine, model, torch = sampled_streams
    prompt = [3, 5, 7, 2]
    cfg = dict(mode=mode, schedule=schedule, streams=True, gamma=2, adaptive_gamma=False, temperature=1.0,
               top_k=8, verify_rule="rejection")
    exact = _exact_marginals(model, torch, prompt, G(**cfg), 3)
    counts = np.zeros((3, V))
    streamed = 0
    for seed in range(800):
        result = engine.generate(prompt, G(seed=seed, max_new_tokens=3, stop_at_eos=False, **cfg))
        counts[np.arange(len(result.tokens)), result.tokens] += 1
        streamed += sum((s.stream_checked or (0, 0))[1] for s in result.metrics.steps)
    assert streamed > 100          # stream proposals were really verified
    assert min(_chi2_pvalue(counts[i], exact[i]) for i in range(3)) > 1e-3


def test_learn_streams_trains_attaches_checks_and_stays_exact(tmp_path, monkeypatch):
    """The command as a user runs it, from another working directory by a relative path, twice."""
    from typer.testing import CliRunner

    from mirror_deploy import cli
    from mirror_deploy.check import PASS, check_artifact
    target, draft = build_tiny_pair(tmp_path / "m", "qwen2", target_layers=6, noise=0.05)
    export_artifact(target, draft, tmp_path / "art", ExportOptions(kappa=4, gamma=4, max_context=256, branch_batch=4))
    monkeypatch.chdir(tmp_path)
    args = ["learn-streams", "art", "--new-tokens", "24", "--epochs", "2", "--code-tokens", "2000"]
    for streams in ("1", "2"):     # a second run replaces the first
        result = CliRunner().invoke(cli.app, [*args, "--streams", streams])
        assert result.exit_code == 0, result.output
        assert "held-out acceptance" in result.output
    manifest = read_manifest(tmp_path / "art")
    info = manifest.draft_streams
    assert info["streams"] == 2 and len(info["acceptance"]) == 3 and info["trained_on"]
    assert info["call_ratio"] and info["call_ratio"] > 0
    assert not list((tmp_path / "art").glob("*_s1.*")), "the first run's graphs were left behind"
    report = check_artifact(tmp_path / "art")
    rows = [r for r in report.rows if r.check == "streams"]
    assert report.ok and len(rows) == 3 and all(r.result == PASS for r in rows), [str(r) for r in report.rows]
    engine = Engine("art")
    prompt = "The quick brown fox"
    expected = engine.generate(prompt, G(max_new_tokens=32, mode="ar", stop_at_eos=False)).tokens
    for mode in ("sd", "mirror"):
        result = engine.generate(prompt, G(max_new_tokens=32, mode=mode, streams=True, gamma=4, adaptive_gamma=False,
                                           stop_at_eos=False))
        assert result.tokens == expected
    out = CliRunner().invoke(cli.app, ["run", "art", "--prompt", prompt, "--mode", "sd", "--streams", "--json",
                                       "--max-new-tokens", "16"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output.strip().splitlines()[-1])["metrics"]["draft_tokens_per_call"] >= 1.0


def test_an_interrupted_second_learn_streams_leaves_the_first_whole(random_streams, tmp_path, monkeypatch):
    """A re-run writes new files beside the ones the manifest hashes and replaces the manifest last: killed
    before that, the artifact is the first run's, and `check` passes on it."""
    import shutil

    from mirror_deploy.check import check_artifact
    from mirror_deploy.tuning import learn_streams
    art = shutil.copytree(random_streams[0].folder, tmp_path / "art")
    before = {p.name: p.read_bytes() for p in art.iterdir() if p.is_file()}

    def interrupted(folder, manifest):
        raise KeyboardInterrupt
    monkeypatch.setattr(learn_streams, "replace_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        attach_random_streams(art, streams=2, seed=7)
    assert {p.name: p.read_bytes() for p in art.iterdir() if p.is_file()} == before
    assert check_artifact(art).ok


def test_learn_streams_refuses_a_target_only_artifact(tmp_path):
    from typer.testing import CliRunner

    from mirror_deploy import cli
    target, _ = build_tiny_pair(tmp_path / "m", "qwen2")
    art = export_artifact(target, None, tmp_path / "art", ExportOptions(kappa=4, gamma=4, max_context=128))
    before = sorted(p.name for p in art.iterdir())
    result = CliRunner().invoke(cli.app, ["learn-streams", str(art)])
    assert result.exit_code == 2 and "target-only" in result.output
    assert sorted(p.name for p in art.iterdir()) == before


def test_stream_calls_in_the_latency_model():
    """A window of γ takes ⌈γ / (1 + S)⌉ draft calls, each at the streamed call's cost."""
    class Flat:   # a stand-in for Curves: a draft call costs 10 ms, the target's window 100 ms
        n_segments = 1
        data = {"widths": [1, 2, 3, 4]}

        def segments(self, *args):
            return np.asarray(90.0)

        def head(self, *args, **kw):
            return np.asarray(10.0)

        def draft(self, *args):
            return np.asarray(10.0)

    plain = [float(latency.sd_step_ms(Flat(), g, 0)) for g in (1, 2, 3, 4)]
    streamed = [float(latency.sd_step_ms(Flat(), g, 0, latency.DraftCalls(2, 1.2))) for g in (1, 2, 3, 4)]
    assert plain == [110.0, 120.0, 130.0, 140.0]
    assert streamed == pytest.approx([112.0, 112.0, 124.0, 124.0])


def test_bench_columns_name_streams_and_lookup():
    from mirror_deploy.bench.methods import EngineMethod
    assert EngineMethod.known("sd+streams") and EngineMethod.known("mirror+streams+lookup")
    assert EngineMethod.known("sd+streams:heuristic")
    assert not EngineMethod.known("ar+streams") and not EngineMethod.known("sd+bogus")
    assert EngineMethod.config_fields("sd+streams") == {"streams": True, "lookup": False}
    assert EngineMethod.config_fields("mirror") == {"streams": False, "lookup": False}
    assert EngineMethod.config_fields("ar") == {}


def test_tune_measures_streams_and_sd_takes_them_where_they_were_faster(random_streams, tmp_path):
    """`tune` times SD with streams beside plain SD and records the figures; where streams were faster a
    run that names no streams setting gets them at tune's window, an explicit False (and bench's plain
    `sd` column) does not, and the output is AR's either way."""
    import shutil

    from rich.console import Console

    from mirror_deploy.bench.methods import EngineMethod
    from mirror_deploy.tuning import store, tune
    folder = shutil.copytree(random_streams[0].folder, tmp_path / "art")
    data = tune.tune_artifact(folder, tune.TuneOptions(seed=3, prompts=6, new_tokens=16, rounds=1, measure_prompts=1),
                              Console(quiet=True))
    streamed = data["streams"]["sd"]
    assert streamed["gamma"] >= 2 and streamed["tokens_per_s"] > 0 and streamed["without_tokens_per_s"] > 0
    assert streamed["chosen"] == (streamed["tokens_per_s"] > streamed["without_tokens_per_s"])
    edited = json.loads(json.dumps(data))
    edited["streams"] = {"sd": {**streamed, "chosen": True, "gamma": 3}}
    store.write_tuning(folder, edited)
    engine = Engine(folder)
    prompt = "The quick brown fox"
    assert engine.with_tuned_defaults(G(mode="sd")).streams is True
    assert engine.with_tuned_defaults(G(mode="sd")).gamma == 3
    expected = engine.generate(prompt, G(max_new_tokens=24, mode="ar", stop_at_eos=False)).tokens
    tuned_run = engine.generate(prompt, G(max_new_tokens=24, mode="sd", adaptive_gamma=False, stop_at_eos=False))
    plain = engine.generate(prompt, G(max_new_tokens=24, mode="sd", adaptive_gamma=False, streams=False,
                                      stop_at_eos=False))
    assert tuned_run.tokens == plain.tokens == expected
    assert tuned_run.summary["draft_tokens_per_call"] > 1.0 and plain.summary["draft_tokens_per_call"] == 1.0
    column = EngineMethod(engine, "sd").generate(engine.encode(prompt), 24)
    assert column.tokens == expected and column.figures["draft_tokens_per_call"] in (None, 1.0)   # None: no draft call


def test_learn_streams_refuses_a_draft_that_changed_since_the_export(tmp_path):
    """Streams are trained on the draft checkpoint the artifact names: one edited since is refused, with
    nothing written."""
    from typer.testing import CliRunner

    from mirror_deploy import cli
    target, draft = build_tiny_pair(tmp_path / "m", "qwen2")
    art = export_artifact(target, draft, tmp_path / "art", ExportOptions(kappa=4, gamma=4, max_context=128))
    weights = next(p for p in draft.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    before = sorted(p.name for p in art.iterdir())
    result = CliRunner().invoke(cli.app, ["learn-streams", str(art), "--code-tokens", "0", "--epochs", "1"])
    assert result.exit_code == 2 and "changed since the export" in " ".join(result.output.split()), result.output
    assert sorted(p.name for p in art.iterdir()) == before
