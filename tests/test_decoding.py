"""Losslessness of every decoding mode, and the engine's failure paths."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from rich.console import Console

from mirror_deploy.artifact import read_manifest
from mirror_deploy.decoding.config import GenerationConfig as G
from mirror_deploy.decoding.engine import Engine
from mirror_deploy.errors import MirrorDeployError
from mirror_deploy.export.pipeline import ExportOptions, export_artifact
from mirror_deploy.tiny import build_tiny_pair

QUIET = Console(quiet=True)
PROMPTS = ["Hello world", "abc", "The quick brown fox", "x", "0123456789 tokens", "def f(n):"]
SPEC_MODES = [("sd", "serial"), ("mirror", "serial"), ("mirror", "overlapped")]


def _export(pair, folder, exit_layer, kappa, gamma=4, branch_batch=4, max_context=256):
    return export_artifact(*pair, folder, ExportOptions(exit_layer=exit_layer, kappa=kappa, gamma=gamma,
                                                        max_context=max_context, branch_batch=branch_batch), QUIET)


@pytest.fixture(scope="module")
def agreeing_pair(tmp_path_factory):
    return build_tiny_pair(tmp_path_factory.mktemp("agree"), "llama", noise=0.05)


@pytest.fixture(scope="module")
def grid_engines(agreeing_pair, tmp_path_factory):
    """Artifacts over (ℓe, κ): a shallow narrow exit and a deep wide one."""
    root = tmp_path_factory.mktemp("grid")
    return {(le, k): Engine(_export(agreeing_pair, root / f"e{le}k{k}", le, k)) for le, k in [(1, 2), (3, 32)]}


def _ar(engine, prompt, n=24):
    return engine.generate(prompt, G(max_new_tokens=n, mode="ar", stop_at_eos=False)).tokens


@pytest.mark.parametrize("key", [(1, 2), (3, 32)])
def test_greedy_equals_autoregressive_over_grid(grid_engines, key):
    engine = grid_engines[key]
    reused = fallback = 0
    for prompt in PROMPTS:
        expected = _ar(engine, prompt)
        for gamma, budget in [(1, 1), (3, 4), (4, 0), (4, 2)]:
            for mode, schedule in SPEC_MODES:
                result = engine.generate(prompt, G(max_new_tokens=24, mode=mode, schedule=schedule, gamma=gamma,
                                                   branch_budget=budget, stop_at_eos=False))
                assert result.tokens == expected, (prompt, gamma, budget, mode, schedule)
                if mode == "mirror":
                    reused += sum(s.reused for s in result.metrics.steps)
                    fallback += sum(s.fallback for s in result.metrics.steps)
    assert reused > 0 and fallback > 0, (reused, fallback)


def test_greedy_with_a_draft_that_never_agrees(tmp_path):
    pair = build_tiny_pair(tmp_path, "llama", disagree=True)
    engine = Engine(_export(pair, tmp_path / "art", 2, 16))
    for prompt in PROMPTS[:3]:
        expected = _ar(engine, prompt)
        for mode, schedule in SPEC_MODES:
            result = engine.generate(prompt, G(max_new_tokens=24, mode=mode, schedule=schedule, stop_at_eos=False))
            assert result.tokens == expected
            assert all(s.accepted == 0 for s in result.metrics.steps)  # it really never agreed
            windows = [s.window for s in result.metrics.steps]
            # the window adapts down; each length is chosen a step ahead (before that step's verdict)
            assert windows[:5] == [4, 4, 3, 2, 1] and set(windows[5:]) == {1}
        fixed = engine.generate(prompt, G(max_new_tokens=24, mode="mirror", adaptive_gamma=False, stop_at_eos=False))
        assert fixed.tokens == expected and {s.window for s in fixed.metrics.steps} == {4}


def test_window_grows_back_when_the_draft_agrees(tmp_path):
    from mirror_deploy.decoding.policy import HeuristicWindow
    policy = HeuristicWindow(6, 4, adaptive=True)
    lengths = []
    for accepted in (0, 0, 0, 0, 0, 9, 9, 9, 9):   # nothing accepted, then whole windows again
        drafted = policy.plan(0).length
        policy.observe(min(accepted, drafted), drafted)
        lengths.append(policy.plan(0).length)
    assert lengths == [5, 4, 3, 2, 1, 3, 5, 6, 6]


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_greedy_other_architectures(tiny_artifacts, arch):
    engine = Engine(tiny_artifacts[arch])
    for prompt in PROMPTS[:3]:
        expected = _ar(engine, prompt)
        for mode, schedule in SPEC_MODES:
            assert engine.generate(prompt, G(max_new_tokens=24, mode=mode, schedule=schedule,
                                             stop_at_eos=False)).tokens == expected


def test_static_draft_greedy_equals_autoregressive(static_artifact):
    engine = Engine(static_artifact)
    assert engine.draft.static_seq == 5
    for prompt in PROMPTS[:3]:
        expected = _ar(engine, prompt)
        assert engine.generate(prompt, G(max_new_tokens=24, stop_at_eos=False)).tokens == expected


def test_partial_acceptance_rolls_kv_back(grid_engines):
    """After steps that accept part of a window, both KV caches hold exactly the committed context:
    the same K/V a fresh prefill of that context gives, and nothing of the rejected positions."""
    engine = grid_engines[(3, 32)]
    for prompt in PROMPTS:
        result = engine.generate(prompt, G(max_new_tokens=30, stop_at_eos=False))
        if any(0 < s.accepted < 4 for s in result.metrics.steps):
            break
    else:
        pytest.fail("no prompt gave a partial acceptance")
    ids = engine.encode(prompt)
    committed = sum(s.committed for s in result.metrics.steps)
    length = len(ids) - 1 + committed
    assert engine.target.length == length and engine.draft.cache.committed == length
    context = ids + result.tokens
    assert len(context) >= length
    kept_target = [{k: v[:, :length].copy() for k, v in kv.buffers.items()} for kv in engine.target.kv]
    kept_draft = engine.draft.cache.committed_kv()   # scattered slots (kept branches), in position order
    engine.target.reset()
    engine.target.prefill(context[:length])
    engine.draft.reset()
    engine.draft.prefill(context[:length])
    for kv, kept_segment in zip(engine.target.kv, kept_target):
        for name, kept in kept_segment.items():
            np.testing.assert_allclose(kept, kv.buffers[name][:, :length], atol=1e-5)
    fresh_draft = engine.draft.cache.committed_kv()
    assert set(fresh_draft) == set(kept_draft) and len(kept_draft) == 2 * engine.manifest.draft["num_layers"]
    for name, kept in kept_draft.items():
        assert kept.shape[1] == length
        np.testing.assert_allclose(kept, fresh_draft[name], atol=1e-5)


def test_seeded_sampling_reproduces(grid_engines):
    engine = grid_engines[(3, 32)]
    cfg = dict(max_new_tokens=20, temperature=0.9, top_p=0.95, seed=7, stop_at_eos=False)
    a = engine.generate("abc", G(schedule="overlapped", **cfg)).tokens
    b = engine.generate("abc", G(schedule="serial", **cfg)).tokens
    assert a == b


# ---- failures ------------------------------------------------------------------------------------

def _run_with_deadline(fn, seconds=30):
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "generation hung"
    return box


@pytest.mark.parametrize("schedule", ["overlapped", "serial"])
def test_failing_draft_names_the_part(tiny_artifacts, schedule, monkeypatch):
    engine = Engine(tiny_artifacts["llama"])
    calls = {"n": 0}
    real = engine.draft.graph.run

    def flaky(feeds):
        calls["n"] += 1
        if calls["n"] > 6:
            raise RuntimeError("NPU fell over")
        return real(feeds)
    monkeypatch.setattr(engine.draft.graph, "run", flaky)
    box = _run_with_deadline(lambda: engine.generate("Hello world", G(max_new_tokens=40, schedule=schedule,
                                                                      stop_at_eos=False)))
    assert isinstance(box.get("error"), MirrorDeployError)
    assert "draft" in str(box["error"]) and "NPU fell over" in str(box["error"])


def test_failing_target_does_not_hang_the_draft(tiny_artifacts, monkeypatch):
    engine = Engine(tiny_artifacts["llama"])
    calls = {"n": 0}
    last = engine.target.graphs.segments[-1]     # a suffix segment: it runs while the draft works
    real = last.run

    def flaky(feeds, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("GPU fell over")
        return real(feeds, **kwargs)
    monkeypatch.setattr(last, "run", flaky)
    box = _run_with_deadline(lambda: engine.generate("Hello world", G(max_new_tokens=40, stop_at_eos=False)))
    assert "target suffix" in str(box.get("error")) and "GPU fell over" in str(box["error"])


def test_capacity_is_refused_before_any_work(tiny_artifacts):
    engine = Engine(tiny_artifacts["llama"])
    assert engine.draft.graph.stateful            # the stateful draft is refused up front too
    first = engine.target.graphs.segments[0]
    before = first.timer.calls, engine.draft.graph.timer.calls
    with pytest.raises(MirrorDeployError) as info:
        engine.generate("Hello world", G(max_new_tokens=250))
    assert "max-context" in info.value.fix and "256" in info.value.problem
    assert (first.timer.calls, engine.draft.graph.timer.calls) == before


def test_stops_at_end_of_sequence(tiny_artifacts):
    engine = Engine(tiny_artifacts["llama"])
    free = engine.generate("Hello world", G(max_new_tokens=30, mode="ar", stop_at_eos=False)).tokens
    engine.eos = {free[5]}
    for mode in ("ar", "sd", "mirror"):
        tokens = engine.generate("Hello world", G(max_new_tokens=30, mode=mode)).tokens
        assert tokens == free[:free.index(free[5]) + 1]


# ---- branch choice and the early-exit head ---------------------------------------------------------

def test_ranking_follows_the_acceptance_history():
    from mirror_deploy.decoding.branches import CONTINUATION, AcceptanceHistory, rank_branches
    ids = np.array([[5, 6, 7, 8], [1, 2, 3, 4], [9, 10, 11, 12]])
    lp = np.log(np.array([[0.5, 0.2, 0.1, 0.05], [0.3, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]]))
    drafts = [5, 1]
    history = AcceptanceHistory(2)
    for _ in range(3):
        history.observe(0)                    # the first draft token keeps being rejected
    early = rank_branches(ids, lp, drafts, 3, history, continuation=True)
    assert all(r == 1 for r, _ in early) and (1, 5) not in early   # depth 1, never the draft's own token
    history = AcceptanceHistory(2)
    for _ in range(10):
        history.observe(2, bonus_guess_right=True)   # whole windows accepted, the bonus guess right
    late = rank_branches(ids, lp, drafts, 3, history, continuation=True)
    assert late[0] == CONTINUATION and any(r == 3 for r, _ in late[1:])


def test_quantized_exit_head_changes_speed_not_output(agreeing_pair, tmp_path):
    import onnx
    art = export_artifact(*agreeing_pair, tmp_path / "q", ExportOptions(kappa=8, gamma=4, max_context=256,
                                                                        branch_batch=4, exit_head_weights="int4"),
                          QUIET)
    ops = lambda name: [n.op_type for n in onnx.load(str(art / f"{name}.onnx")).graph.node]
    assert ops("exit_head").count("MatMulNBits") == 1 and "MatMul" not in ops("exit_head")
    assert "MatMulNBits" not in ops("target_head") + ops("target_seg0")   # the target itself is untouched
    engine = Engine(art)
    assert engine.manifest.graphs["exit_head"].weights == "int4"
    for prompt in PROMPTS[:3]:
        assert engine.generate(prompt, G(max_new_tokens=24, stop_at_eos=False)).tokens == _ar(engine, prompt)


# With int8/int4 weights ORT quantizes activations too (accuracy_level 4), so the ~1e-7 fp32 ordering noise
# between a window and single steps can move an activation across a rounding step, and int4's kernel pairs
# rows: logits then differ between a verify window and an autoregressive step by far more than in fp32,
# and a near-tie may resolve the other way. Lossless here means: equal to autoregressive decoding of the
# same artifact, except where the artifact's own top-2 logits are closer than twice the window-vs-step
# difference measured on that very context; anything else is a real divergence and fails.
def _divergence_is_within_noise(engine, prompt_ids, expected, got) -> bool:
    from mirror_deploy.decoding.drive import TargetDriver
    at = next(i for i, (a, b) in enumerate(zip(expected, got)) if a != b)
    context = prompt_ids + expected[:at]
    driver = TargetDriver(engine.target.graphs, engine.manifest)
    n = len(prompt_ids) - 1
    window = driver.window(context)["logits"][n:]
    driver.window(prompt_ids[:-1], start=0)        # the autoregressive path: prefill, then single steps
    steps = np.stack([driver.window([t])["logits"][0] for t in context[n:]])
    noise = float(np.abs(window - steps).max())
    top2 = np.sort(steps[-1])[-2:]
    return top2[1] - top2[0] <= 2 * noise and got[at] in np.argsort(steps[-1])[-2:]


@pytest.mark.parametrize("weights,attention", [("int8", "fused"), ("int4", "fused"), ("int8", "eager")])
def test_quantized_target_decodes_every_mode_like_its_own_ar(agreeing_pair, tmp_path, weights, attention):
    """A quantized target is a different model: every mode must equal autoregressive decoding of the same
    artifact, at every exported exit layer (up to measured near-ties, see NEAR_TIE). Fused segments get
    their packed MatMuls quantized like the traced ones."""
    import onnx
    art = export_artifact(*agreeing_pair, tmp_path / weights,
                          ExportOptions(kappa=4, gamma=4, max_context=256, branch_batch=4, target_weights=weights,
                                        target_attention=attention), QUIET)
    assert read_manifest(art).target_attention == attention
    for name in ("target_seg0", "target_seg3", "target_head"):
        graph = onnx.load(str(art / f"{name}.onnx")).graph
        weights_ = {i.name for i in graph.initializer}
        ops = [n.op_type for n in graph.node]
        dense = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights_]
        assert "MatMulNBits" in ops and not dense, (name, dense)   # attention's MatMuls have no weights
    engine = Engine(art)
    equal = runs = 0
    for prompt in PROMPTS[:3]:
        expected = _ar(engine, prompt)
        for layer in engine.manifest.exit_layers:
            for mode, schedule in SPEC_MODES:
                got = engine.generate(prompt, G(max_new_tokens=24, mode=mode, schedule=schedule, exit_layer=layer,
                                                stop_at_eos=False)).tokens
                runs += 1
                if got == expected:
                    equal += 1
                else:
                    assert _divergence_is_within_noise(engine, engine.encode(prompt), expected, got), \
                        (prompt, layer, mode, schedule)
    assert equal >= runs // 2, (equal, runs)


def test_exit_layer_is_chosen_per_run(grid_engines):
    engine = grid_engines[(1, 2)]
    assert engine.manifest.exit_layers == [1, 2, 3]
    expected = _ar(engine, PROMPTS[0])
    hits = {}
    for layer in (1, 2, 3):
        result = engine.generate(PROMPTS[0], G(max_new_tokens=24, exit_layer=layer, stop_at_eos=False))
        assert result.tokens == expected
        hits[layer] = result.summary["exit_hit_rate"]
    assert hits[3] > hits[1]        # a deeper exit agrees with the final layer more often
    with pytest.raises(MirrorDeployError) as err:
        engine.generate(PROMPTS[0], G(exit_layer=4))
    assert "exit layer 4 was not exported" in err.value.problem and "1, 2, 3" in err.value.fix
    with pytest.raises(MirrorDeployError) as err:
        engine.generate(PROMPTS[0], G(kappa=3))
    assert "kappa 3" in err.value.problem


def test_pipelined_prefill_equals_sequential(agreeing_pair, tmp_path):
    art = _export(agreeing_pair, tmp_path / "p", 2, 4, max_context=512)
    ids = list(np.random.default_rng(3).integers(0, 128, 300))
    caches = []
    for pipelined in (False, True):
        engine = Engine(art)
        engine.target = type(engine.target)(engine.target.graphs, engine.manifest, prefill_chunk=64,
                                            pipeline_prefill=pipelined)
        engine.target.prefill(ids)
        caches.append([{k: v[:, :300].copy() for k, v in kv.buffers.items()} for kv in engine.target.kv])
        assert engine.target.length == 300
    for seq, pipe in zip(*caches):
        for name in seq:
            np.testing.assert_array_equal(seq[name], pipe[name])


OV_TARGET_PROFILE = ('name = "ov-target"\ndescription = "target and draft on OpenVINO CPU"\n'
                     '[target]\nbackend = "openvino"\ndevice = "CPU"\nthreads = 1\nprecision = "f32"\n'
                     '[draft]\nbackend = "openvino"\ndevice = "CPU"\nthreads = 1\nprecision = "f32"\n')


def test_eager_openvino_target_gets_nncf_weights_and_stays_exact(agreeing_pair, tmp_path):
    """An eager (traced) target on OpenVINO is IR with NNCF int8 weights (not ORT's MatMulNBits); weight-only,
    so every mode equals this artifact's own autoregressive output on these prompts. (The default for an
    OpenVINO target is the native fused one: tests/test_openvino_target.py.)"""
    import openvino as ov
    from mirror_deploy.check import check_artifact
    profile = tmp_path / "ov-target.toml"
    profile.write_text(OV_TARGET_PROFILE)
    art = export_artifact(*agreeing_pair, tmp_path / "ov", ExportOptions(kappa=4, gamma=4, max_context=256,
                          branch_batch=4, target_weights="int8", profile=str(profile),
                          target_attention="eager"), QUIET)
    engine = Engine(art)
    m = engine.manifest
    for name in [*m.target_segments(), "target_head"]:
        entry = m.graphs[name]
        assert entry.format == "openvino" and entry.file.endswith(".xml") and entry.weights == "int8"
        assert not (art / f"{name}.onnx").exists()
        types = {op.get_output_element_type(0).get_type_name() for op in ov.Core().read_model(art / entry.file).get_ops()
                 if op.get_type_name() == "Constant"}
        assert types & {"u8", "i8"}, (name, types)     # NNCF's compressed weights are in the IR
    assert engine.target.graphs.segments[0].device == "CPU"          # really the OpenVINO runtime
    for prompt in PROMPTS[:3]:
        expected = _ar(engine, prompt)
        for mode, schedule in SPEC_MODES:
            got = engine.generate(prompt, G(max_new_tokens=24, mode=mode, schedule=schedule,
                                            stop_at_eos=False)).tokens
            assert got == expected, (prompt, mode, schedule)
    report = check_artifact(art)
    assert report.ok, [r for r in report.rows if r.result != "PASS"]


def test_fp16_target_decodes_every_mode_like_its_own_ar(agreeing_pair, tmp_path):
    """fp16 weights and compute, fp32 inputs and outputs (GPU format; ORT CPU runs it through casts)."""
    import onnx
    art = export_artifact(*agreeing_pair, tmp_path / "fp16", ExportOptions(kappa=4, gamma=4, max_context=256,
                          branch_batch=4, target_weights="fp16"), QUIET)
    graph = onnx.load(str(art / "target_seg1.onnx")).graph
    assert {i.data_type for i in graph.initializer if len(i.dims) == 2} == {onnx.TensorProto.FLOAT16}
    assert all(v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16 for v in [*graph.input, *graph.output])
    engine = Engine(art)
    for prompt in PROMPTS[:3]:
        expected = _ar(engine, prompt)
        for mode, schedule in SPEC_MODES:
            got = engine.generate(prompt, G(max_new_tokens=24, mode=mode, schedule=schedule,
                                            stop_at_eos=False)).tokens
            if got != expected:
                assert _divergence_is_within_noise(engine, engine.encode(prompt), expected, got), (prompt, mode)
