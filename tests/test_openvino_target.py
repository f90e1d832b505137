"""The OpenVINO-native target (export/openvino_target.py) on the intel-sim stand-in: K/V as model state, fused
attention, rows that compute the same bits in a window as alone, every mode equal to AR, our 4-bit kernel or
OpenVINO's own, refusals with the fix."""
from __future__ import annotations

import numpy as np
import pytest
from rich.console import Console

from mirror_deploy.artifact import read_manifest
from mirror_deploy.check import check_artifact
from mirror_deploy.decoding.config import GenerationConfig as G
from mirror_deploy.decoding.drive import TargetDriver
from mirror_deploy.decoding.engine import Engine
from mirror_deploy.errors import MirrorDeployError
from mirror_deploy.export.pipeline import ExportOptions, export_artifact
from mirror_deploy.kernels import status
from mirror_deploy.runtimes.kv import StateKV
from mirror_deploy.runtimes.loader import open_target
from mirror_deploy.runtimes.static_buckets import BucketedDraft
from mirror_deploy.targets import load_profile
from mirror_deploy.tiny import build_tiny_pair

QUIET = Console(quiet=True)
OPTS = dict(kappa=4, gamma=4, max_context=256, branch_batch=4, profile="intel-sim")
PROMPTS = ["Hello world", "def f(n):"]
MODES = [("sd", "serial"), ("mirror", "serial"), ("mirror", "overlapped")]


def _kernel() -> bool:
    """Build our kernel into this session's cache (as `make install` does into the user's)."""
    from mirror_deploy.kernels.build import build
    try:
        build()
    except MirrorDeployError:
        pass
    return status().available


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Qwen2 (q/k/v biases, tied head) 128 wide, so int4 has its groups of 128; a draft that mostly agrees."""
    return build_tiny_pair(tmp_path_factory.mktemp("pair"), "qwen2", hidden=128, noise=0.05)


@pytest.fixture(scope="module")
def artifacts(pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("ov")
    kinds = {"fp32": dict(target_weights="fp32"), "int4-stock": dict(target_weights="int4", target_kernel="stock")}
    if _kernel():
        kinds["int4-ours"] = dict(target_weights="int4", target_kernel="ours")
    # The draft's weights are fp32 here (NNCF on the draft is another file's subject): the target is under test.
    return {k: export_artifact(*pair, root / k, ExportOptions(**OPTS, **kw), QUIET) for k, kw in kinds.items()}


KINDS = ["fp32", "int4-stock", "int4-ours"]


def _artifact(artifacts, kind):
    if kind not in artifacts:
        pytest.skip(f"our kernel is not usable here: {status().why}")
    return artifacts[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_every_mode_equals_autoregressive(artifacts, kind):
    engine = Engine(_artifact(artifacts, kind))
    assert isinstance(engine.target.kv[0], StateKV) and engine.manifest.target_attention == "fused"
    assert engine.target.graphs.segments[0].kernel == (kind == "int4-ours")
    trims = 0
    for prompt in PROMPTS:
        expected = engine.generate(prompt, G(max_new_tokens=24, mode="ar", stop_at_eos=False)).tokens
        for mode, schedule in MODES:
            got = engine.generate(prompt, G(max_new_tokens=24, mode=mode, schedule=schedule, stop_at_eos=False))
            assert got.tokens == expected, (kind, prompt, mode, schedule)
        trims += sum(kv.trims for kv in engine.target.kv)
    assert trims > 0   # rejected rows were trimmed from the state (else this test saw no rejection)
    calls = engine.draft.graph.calls   # the static draft ran at its capacity buckets and widths
    assert isinstance(engine.draft.graph, BucketedDraft) and set(calls) == {(1, 128), (1, 256), (5, 128), (5, 256)}
    assert calls[(1, 128)] > 0 and calls[(5, 128)] > 0


def test_dropped_drafts_do_not_push_a_short_context_into_a_larger_bucket(artifacts):
    """Under 128 live slots the whole run, but more than 128 written: rejected drafts are compacted away
    before they would push a call into the 256 bucket (DraftCache.room), and the text stays AR's."""
    engine = Engine(artifacts["fp32"])
    expected = engine.generate("def f(n):", G(max_new_tokens=100, mode="ar", stop_at_eos=False)).tokens
    calls = engine.draft.graph.calls
    calls.update({key: 0 for key in calls})
    got = engine.generate("def f(n):", G(max_new_tokens=100, mode="mirror", stop_at_eos=False))
    assert got.tokens == expected
    assert calls[(1, 256)] == calls[(5, 256)] == 0, calls
    assert engine.draft.cache.compactions > 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_window_row_has_the_bits_of_a_single_step(artifacts, kind):
    """Logits of a 6-row window equal those of six 1-row steps bit for bit, after a rollback too."""
    folder = _artifact(artifacts, kind)
    m = read_manifest(folder)
    graphs = open_target(folder, m, load_profile("intel-sim"))
    ids = np.random.default_rng(0).integers(0, 128, 30)
    driver = TargetDriver.for_manifest(graphs, m)
    driver.window(ids[:20])
    steps = np.concatenate([driver.window(ids[i:i + 1])["logits"] for i in range(20, 26)])
    window = driver.window(ids[20:26], start=20)["logits"]          # a rollback to 20 trims the state first
    np.testing.assert_array_equal(window, steps)
    driver.window(ids[20:23], start=20)
    np.testing.assert_array_equal(driver.window(ids[23:26])["logits"], steps[3:])


def test_check_passes_and_counts_the_fused_attention(artifacts):
    report = check_artifact(artifacts["int4-stock"])
    assert report.ok, [r for r in report.rows if r.result != "PASS"]
    fused = [r for r in report.rows if r.check == "fused attention" and r.graph.startswith("target_seg")]
    assert len(fused) == 4 and all(r.result == "PASS" for r in fused)


def test_the_plugin_fuses_each_layers_rotary_embedding(artifacts):
    """The rotation is written as HF's rotate_half (Slices), which the CPU plugin fuses into one RoPE node per
    q and k: if a version stops matching it, the layers fall back to reference Split/Concat nodes (slower)."""
    from mirror_deploy.runtimes.openvino import runtime_layer_types
    manifest = read_manifest(artifacts["fp32"])
    target = open_target(artifacts["fp32"], manifest, load_profile("intel-sim"))
    for name, graph in zip(manifest.target_segments(), target.segments):
        layers = range(*manifest.graphs[name].layers)
        assert runtime_layer_types(graph.compiled).count("RoPE") == 2 * len(layers), name


def test_a_second_run_compiles_from_the_cache(artifacts, monkeypatch):
    import time
    folder = artifacts["fp32"]
    Engine(folder).generate("abc", G(max_new_tokens=2, mode="ar"))
    t0 = time.perf_counter()
    Engine(folder).generate("abc", G(max_new_tokens=2, mode="ar"))
    assert time.perf_counter() - t0 < 5


def test_an_artifact_with_our_kernel_is_refused_where_the_kernel_is_not(artifacts, monkeypatch):
    folder = _artifact(artifacts, "int4-ours")
    import mirror_deploy.kernels.library as library
    import mirror_deploy.runtimes.openvino as runtime
    from mirror_deploy.kernels.library import KernelStatus
    absent = KernelStatus(False, None, "none", "not built")
    monkeypatch.setattr(library, "status", lambda extra_flags="": absent)
    runtime.load_kernel.cache_clear()
    try:
        with pytest.raises(MirrorDeployError, match="4-bit kernel, which is not usable here: not built") as err:
            Engine(folder)
        assert "mirror_deploy.kernels build" in err.value.fix
    finally:
        runtime.load_kernel.cache_clear()


def test_bad_kernel_requests_are_refused_before_writing(pair, tmp_path, monkeypatch):
    import mirror_deploy.kernels.library as library
    from mirror_deploy.kernels.library import KernelStatus
    with pytest.raises(MirrorDeployError, match="int4 targets only"):
        export_artifact(*pair, tmp_path / "a", ExportOptions(target_kernel="ours", **OPTS), QUIET)
    monkeypatch.setattr(library, "status", lambda extra_flags="": KernelStatus(False, None, "none", "not built"))
    with pytest.raises(MirrorDeployError, match="not usable here") as err:
        export_artifact(*pair, tmp_path / "b", ExportOptions(target_weights="int4", target_kernel="ours", **OPTS), QUIET)
    assert "--target-kernel stock" in err.value.fix
    assert not any(tmp_path.iterdir())


def test_the_real_intel_profile_still_refuses_a_machine_without_its_devices(artifacts):
    with pytest.raises(MirrorDeployError, match="not present on this machine"):
        Engine(artifacts["fp32"], "intel-npu")


@pytest.fixture(scope="module")
def gguf_artifact(tmp_path_factory):
    """A tiny GGUF in Q4_K_M's mix of types on intel-sim: its 4-bit blocks in our kernel, the rest as int8."""
    import torch
    from transformers import AutoModelForCausalLM

    from mirror_deploy.tiny import perturbed
    from mirror_deploy.tiny.gguf import MIXED_TYPES, write_tiny_gguf
    if not _kernel():
        pytest.skip(f"our kernel is not usable here: {status().why}")
    root = tmp_path_factory.mktemp("gguf")
    target = write_tiny_gguf(root / "target.gguf", MIXED_TYPES)
    model = AutoModelForCausalLM.from_pretrained(root, gguf_file=target.name, dtype=torch.float32).eval()
    perturbed(model, 0.05, 1).save_pretrained(root / "draft")
    return export_artifact(target, root / "draft", root / "art",
                           ExportOptions(target_weights="gguf", draft_weights="int8", **OPTS), QUIET)


def test_a_gguf_target_keeps_its_4_bit_blocks_in_our_kernel(gguf_artifact):
    engine = Engine(gguf_artifact)
    assert engine.target.graphs.segments[0].kernel
    for prompt in ([5, 6, 7, 8], list(range(20, 50))):
        expected = engine.generate(prompt, G(max_new_tokens=24, mode="ar", stop_at_eos=False)).tokens
        for mode, schedule in MODES:
            assert engine.generate(prompt, G(max_new_tokens=24, mode=mode, schedule=schedule,
                                             stop_at_eos=False)).tokens == expected, (prompt, mode)
    report = check_artifact(gguf_artifact)
    assert report.ok, [r for r in report.rows if r.result != "PASS"]
    rows = {r.graph: r for r in report.rows if r.check == "gguf weights"}
    assert "Q4_K" in rows and "fp16 rounding of a block's scale" in rows["Q4_K"].limit
    assert "Q6_K as int8" in rows   # the 6-bit type is re-quantized, and check says so


def test_a_gguf_target_on_openvino_needs_our_kernel(tmp_path, monkeypatch):
    import mirror_deploy.kernels.library as library
    from mirror_deploy.kernels.library import KernelStatus
    from mirror_deploy.tiny.gguf import MIXED_TYPES, write_tiny_gguf
    target = write_tiny_gguf(tmp_path / "target.gguf", MIXED_TYPES)
    monkeypatch.setattr(library, "status", lambda extra_flags="": KernelStatus(False, None, "none", "not built"))
    with pytest.raises(MirrorDeployError, match="not usable here") as err:
        export_artifact(target, None, tmp_path / "a", ExportOptions(target_weights="gguf", **OPTS), QUIET)
    assert "--target-weights int4" in err.value.fix
    with pytest.raises(MirrorDeployError, match="keeps the 4-bit blocks in our kernel"):
        export_artifact(target, None, tmp_path / "b", ExportOptions(target_weights="gguf", target_kernel="stock", **OPTS),
                        QUIET)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_our_kernel_serves_cpu_targets_only(artifacts, monkeypatch):
    """An artifact with our kernel opened for a GPU target is refused with the export that serves both; an
    export for intel-sim and intel-npu together picks OpenVINO's own int4 by itself."""
    import mirror_deploy.runtimes.openvino as runtime
    from mirror_deploy.export.pipeline import target_kernel
    folder = _artifact(artifacts, "int4-ours")
    monkeypatch.setattr(runtime, "available_devices", lambda: ["CPU", "GPU", "NPU"])
    with pytest.raises(MirrorDeployError, match="a CPU op") as err:
        Engine(folder, "intel-npu")
    assert "--profile intel-sim --profile intel-npu" in err.value.fix
    both = [load_profile("intel-sim"), load_profile("intel-npu")]
    assert not target_kernel(ExportOptions(target_weights="int4"), both, "fused")
    assert target_kernel(ExportOptions(target_weights="int4"), both[:1], "fused")


def test_the_anatomy_names_the_kernel_each_graph_runs(artifacts):
    """`bench --anatomy` on an OpenVINO-native target: several runners share the segments' state (each one's
    rows are trimmed by the next), the token table is not counted as streamed, and each graph's kernel is named."""
    from mirror_deploy.bench.anatomy import anatomy, graph_kernels
    from mirror_deploy.bench.bandwidth import graph_bytes
    engine = Engine(artifacts["int4-stock"])
    figures = anatomy(engine, context=40, rounds=1, prefill_tokens=16)
    assert figures["target step × 1"] > 0 and any(k.startswith("prefill") for k in figures)
    total, streamed = graph_bytes(artifacts["int4-stock"], engine.manifest, "target_seg0")
    assert streamed < total
    stock = graph_kernels(Engine(artifacts["int4-stock"], load_draft=False))
    assert set(stock) == {"target_seg0", "target_seg1", "target_seg2", "target_seg3", "target_head"}
    assert set(stock.values()) == {"OpenVINO's MatMul (compressed)"}
    ours = graph_kernels(Engine(_artifact(artifacts, "int4-ours"), load_draft=False))
    assert set(ours.values()) == {"ours: mirror_deploy::Q4MatMul"}
