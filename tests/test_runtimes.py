"""Runtimes and KV state: ONNX Runtime and OpenVINO against the eager wrappers, rollback, keeping one
branch of a tree (and compacting), the stateful draft and its fused attention, capacity and device
errors, the static (NPU-shaped) draft against the dynamic one."""
from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from mirror_deploy import cli
from mirror_deploy.artifact import read_manifest
from mirror_deploy.errors import MirrorDeployError
from mirror_deploy.reference import Reference
from mirror_deploy.runtimes.devices import builtin_fits
from mirror_deploy.decoding.drive import DraftDriver, TargetDriver
from mirror_deploy.check import FAIL, PASS, check_artifact
from mirror_deploy.runtimes.draft_cache import BufferStore, DraftCache
from mirror_deploy.runtimes.kv import COMMITTED, KVCache
from mirror_deploy.runtimes.loader import open_draft, open_graph, target_graph_names, target_graphs
from mirror_deploy.runtimes.onnxruntime import OrtGraph, require_provider
from mirror_deploy.runtimes.openvino import OvGraph, require_device
from mirror_deploy.targets import PartProfile, Profile

ORT_CPU = PartProfile("onnxruntime", "cpu", 1)
OV_CPU = PartProfile("openvino", "CPU", 1, precision="f32")
rng = np.random.default_rng(7)


@pytest.fixture(scope="module")
def refs(tiny_artifacts):
    return {arch: Reference.load(read_manifest(tiny_artifacts[arch])) for arch in ("llama", "gpt2")}


def _target(folder, manifest, part):
    opened = {g: open_graph(folder, manifest, g, part, g) for g in target_graph_names(manifest)}
    return TargetDriver.for_manifest(target_graphs(manifest, opened), manifest)


def _eager_export(fused, out):
    """The same pair and options as a fused artifact, with traced (eager) target segments."""
    from mirror_deploy.export.pipeline import ExportOptions, export_artifact
    m = read_manifest(fused)
    opts = ExportOptions(exit_layer=m.exit_layer, exit_layers=m.exit_layers, kappa=m.kappa, gamma=m.gamma,
                         max_context=m.max_context, branch_batch=m.branch_batch, target_attention="eager")
    return export_artifact(m.target["path"], m.draft["path"], out / "art", opts)


def _draft(folder, manifest, name, part=OV_CPU):
    return DraftDriver.for_manifest(open_graph(folder, manifest, name, part, "draft"), manifest)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("part", [ORT_CPU, OV_CPU], ids=["onnxruntime", "openvino"])
def test_target_graphs_match_torch_wrappers(tiny_artifacts, refs, tmp_path_factory, arch, part):
    folder, ref = tiny_artifacts[arch], refs[arch]
    m = ref.manifest
    if part is OV_CPU and m.target_attention == "fused":
        # OpenVINO cannot run GroupQueryAttention: refused with the fix, and the eager export runs instead.
        with pytest.raises(MirrorDeployError, match="--target-attention eager"):
            _target(folder, m, part)
        folder = _eager_export(folder, tmp_path_factory.mktemp("eager"))
        m = read_manifest(folder)
    run, mirror = _target(folder, m, part), TargetDriver.for_manifest(target_graphs(m, ref.target_graphs()), m)
    ids = rng.integers(0, 128, 20)
    for a, b in [(0, 9), (9, 14), (14, 15), (15, 20)]:  # prefill, then windows with the cache
        got, want = run.window(ids[a:b]), mirror.window(ids[a:b])
        assert np.abs(got["logits"] - want["logits"]).max() < 1e-4
        assert np.abs(got["exit_logprobs"] - want["exit_logprobs"]).max() < 1e-4
        assert (got["exit_ids"] == want["exit_ids"]).all()
    assert run.used == 20


def test_target_rollback_equals_fresh_run(tiny_artifacts, refs):
    folder, m = tiny_artifacts["llama"], refs["llama"].manifest
    ids, rejected, correction = rng.integers(0, 128, 10), rng.integers(0, 128, 5), rng.integers(0, 128, 5)
    run = _target(folder, m, ORT_CPU)
    run.window(ids)
    run.window(rejected)                                # verify a window at 10..14
    again = run.window(correction, start=12)["logits"]  # accept 2, roll back, write another window
    fresh = _target(folder, m, ORT_CPU).window(np.concatenate([ids, rejected[:2], correction]))["logits"]
    assert run.used == 17
    np.testing.assert_allclose(again, fresh[-5:], atol=1e-5)


def _tree(driver, branches):
    """One call holding several branches from the committed prefix; returns each branch's slots."""
    tokens, parents, spans = [], [], []
    for branch in branches:
        spans.append(range(len(tokens), len(tokens) + len(branch)))
        for j, t in enumerate(branch):
            parents.append(COMMITTED if j == 0 else driver.call_slot(len(tokens) - 1))
            tokens.append(t)
    logits, slots = driver.call(tokens, parents)
    return logits, [[slots[i] for i in span] for span in spans], spans


DRAFT_VARIANTS = [("draft_stateful", OV_CPU), ("draft_static", OV_CPU), ("draft", ORT_CPU)]


@pytest.mark.parametrize("variant,part", DRAFT_VARIANTS, ids=[v for v, _ in DRAFT_VARIANTS])
def test_keep_chain_then_continue(tiny_artifacts, static_artifact, refs, variant, part):
    """A tree call equals eager PyTorch branch by branch; keeping one branch moves nothing, and the
    next call continues it."""
    folder = static_artifact if variant == "draft_static" else tiny_artifacts["llama"]
    m, ref = read_manifest(folder), refs["llama"]
    run = _draft(folder, m, variant, part)
    assert getattr(run.graph, "stateful", False) == (variant == "draft_stateful")
    committed = rng.integers(0, 128, 9)
    run.commit(committed)
    branches = [list(rng.integers(0, 128, 2)) for _ in range(2)]  # 4 tokens: fits the static width 5
    logits, slots, spans = _tree(run, branches)
    for branch, span in zip(branches, spans):
        want = ref.draft_logits([*committed, *branch])[-len(branch):]
        np.testing.assert_allclose(logits[span.start:span.stop], want, atol=1e-4)
    run.keep(slots[1], n_commit=1)  # the second branch survives where it is
    assert (run.cache.committed, run.cache.used) == (10, 13) and list(run.cache.speculative) == [slots[1][1]]
    more = list(rng.integers(0, 128, 2))
    got, _ = run.call(more, [slots[1][1], run.call_slot(0)])  # continue after the kept, uncommitted token
    want = ref.draft_logits([*committed, *branches[1], *more])[-2:]
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("variant,part", DRAFT_VARIANTS, ids=[v for v, _ in DRAFT_VARIANTS])
def test_kept_branch_and_compaction_equal_a_fresh_prefill(tiny_artifacts, static_artifact, refs, variant, part):
    """Keep one branch of a tree (its first token committed, the second still speculative), compact:
    the dropped slots are gone, the committed K/V equal a fresh prefill's, and the next call equals the
    same call after a fresh prefill."""
    folder = static_artifact if variant == "draft_static" else tiny_artifacts["llama"]
    m = read_manifest(folder)
    run, fresh = _draft(folder, m, variant, part), _draft(folder, m, variant, part)
    committed = list(rng.integers(0, 128, 7))
    run.commit(committed)
    branches = [list(rng.integers(0, 128, 2)) for _ in range(2)]
    _, slots, _ = _tree(run, branches)
    run.keep(slots[0], n_commit=1)
    where = run.compact()
    assert where[slots[1]].tolist() == [-2, -2]                          # the rejected branch is gone
    kept = int(where[slots[0][1]])
    assert (run.cache.used, run.cache.committed, list(run.cache.speculative)) == (9, 8, [kept])
    more = list(rng.integers(0, 128, 2))
    got, _ = run.call(more, [kept, run.call_slot(0)])

    fresh.commit(committed + branches[0][:1])
    want, _ = fresh.call([branches[0][1], *more], [COMMITTED, fresh.call_slot(0), fresh.call_slot(1)])
    np.testing.assert_allclose(got, want[1:], atol=1e-5)
    fresh.rollback()
    a, b = run.cache.committed_kv(), fresh.cache.committed_kv()
    assert set(a) == set(b) and all(v.shape[1] == 8 for v in a.values())
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5)


def test_rollouts_compact_instead_of_overflowing(tiny_artifacts, refs):
    """A draft that has filled its capacity with rejected slots compacts before the next rollout
    (not mid-way), and the window it writes equals one from a fresh prefill."""
    folder, ref = tiny_artifacts["llama"], refs["llama"]
    m = read_manifest(folder)
    runner = _draft(folder, m, "draft_stateful").runner
    from mirror_deploy.decoding.config import GenerationConfig
    cfg = GenerationConfig(max_new_tokens=8)
    prompt = [int(t) for t in rng.integers(0, 128, 20)]
    runner.prefill(prompt[:-1])
    while runner.cache.used + 4 <= m.max_context:      # fill the capacity with dropped windows
        runner.rollout_fresh(prompt[-1], len(prompt) - 1, 4, cfg, 0)
        runner.cache.rollback_speculative()
    window = runner.rollout_fresh(prompt[-1], len(prompt) - 1, 4, cfg, 0)
    assert runner.cache.compactions == 1 and runner.cache.used == len(prompt) - 1 + 4
    want = ref.draft_logits(prompt + window.tokens[:-1])[-4:].argmax(-1)
    assert window.tokens == want.tolist()


def test_graph_top_m_is_the_softmax_top_m(tiny_artifacts):
    """The draft's runner-up tokens come out of the graph: the same as a softmax over its logits."""
    folder = tiny_artifacts["llama"]
    m = read_manifest(folder)
    runner = _draft(folder, m, "draft_stateful").runner
    rows = runner.call([5, 6, 7], [COMMITTED, 0, 1], [0, 1, 2])
    probs = np.exp(rows.logits - rows.logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1)[:, :rows.top_ids.shape[1]]
    assert (rows.top_ids == order).all()
    np.testing.assert_allclose(rows.top_probs, np.take_along_axis(probs, order, -1), atol=1e-6)


def test_fused_attention_is_counted_and_checked(tiny_artifacts, monkeypatch):
    """`fused_attention` counts what the compiled model really runs (the explicit graph on OpenVINO has
    no fused node, so the count is not a constant), and `check` fails when the fusion is gone."""
    folder = tiny_artifacts["llama"]
    m = read_manifest(folder)
    graph = open_graph(folder, m, "draft_stateful", OV_CPU, "draft")
    types = [op.get_rt_info()["layerType"].astype(str) for op in graph.compiled.get_runtime_model().get_ops()]
    assert graph.fused_attention == types.count("ScaledDotProductAttention")
    explicit = OvGraph(folder / "draft.onnx", "draft", "CPU", 1, "f32")
    assert not explicit.stateful and explicit.fused_attention == 0
    row = {(r.check, r.graph): r for r in check_artifact(folder, skip_parity=True).rows}[
        ("fused attention", "draft_stateful")]
    assert row.result == (PASS if graph.fused_attention == m.draft["num_layers"] else FAIL)
    # Only after counting it ourselves: OpenVINO 2026.4 fuses every layer of the Llama family here.
    assert graph.fused_attention == m.draft["num_layers"], types
    monkeypatch.setattr(OvGraph, "fused_attention", property(lambda self: 0))
    lost = {(r.check, r.graph): r for r in check_artifact(folder, skip_parity=True).rows}[
        ("fused attention", "draft_stateful")]
    assert lost.result == FAIL and "0 of 4" in lost.detail and "openvino" in lost.fix


def test_draft_rollback_discards_branches(static_artifact, refs):
    m, ref = read_manifest(static_artifact), refs["llama"]
    run = _draft(static_artifact, m, "draft_static")
    committed = rng.integers(0, 128, 6)
    run.commit(committed)
    _tree(run, [list(rng.integers(0, 128, 4))])
    run.rollback()  # stale K/V stay in the buffer; the static call reads the whole buffer, masked
    branch = list(rng.integers(0, 128, 3))
    logits, _, _ = _tree(run, [branch])
    np.testing.assert_allclose(logits, ref.draft_logits([*committed, *branch])[-3:], atol=1e-4)


def test_static_draft_equals_dynamic(static_artifact):
    m = read_manifest(static_artifact)
    static = open_draft(static_artifact, m, Profile.from_dict(m.profile))  # the recorded, static profile
    assert static.static_dims["seq"] == m.branch_batch + 1
    runs = [DraftDriver.for_manifest(static, m), _draft(static_artifact, m, "draft_stateful")]
    assert runs[0].static_seq == 5 and runs[1].static_seq is None
    committed, branches = rng.integers(0, 128, 12), [list(rng.integers(0, 128, 2)) for _ in range(2)]
    outs = [(r.commit(committed), _tree(r, branches)[0]) for r in runs]
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_capacity_errors():
    cache = KVCache(range(1), capacity=8, kv_heads=2, head_dim=4)
    new = {n: np.zeros((1, 4, 2, 4), np.float32) for n in ("new_key.0", "new_value.0")}
    cache.write(new, at=4, rows=slice(0, 4))  # exactly full is fine
    with pytest.raises(MirrorDeployError) as err:
        cache.write(new, at=6, rows=slice(0, 4))
    assert "needs 10 KV positions" in err.value.problem and "--max-context" in err.value.fix

    draft = DraftCache(BufferStore(range(1), capacity=8, kv_heads=2, head_dim=4), capacity=8)
    draft.used = draft.committed = 6
    with pytest.raises(MirrorDeployError) as err:
        draft.call_feeds([1, 2, 3], [COMMITTED, 6, 7], [6, 7, 8])
    assert "--max-context" in err.value.fix
    with pytest.raises(MirrorDeployError) as err:
        draft.call_feeds([1, 2], [COMMITTED, 6], [6, 7], static_seq=1)
    assert "--branch-batch" in err.value.fix


def test_absent_devices_name_the_present_ones(tiny_artifacts):
    folder = tiny_artifacts["llama"]
    with pytest.raises(MirrorDeployError) as err:
        OvGraph(folder / "draft_stateful.xml", "draft", "NPU")
    assert "'NPU' is not present" in err.value.problem and "present devices: CPU" in err.value.fix
    with pytest.raises(MirrorDeployError) as err:
        OrtGraph(folder / "target_head.onnx", "target_head", "cuda")
    assert "CUDAExecutionProvider" in err.value.problem and "CPUExecutionProvider" in err.value.fix
    with pytest.raises(MirrorDeployError) as err:
        require_device("AUTO:NPU,CPU")
    assert "silently" in err.value.problem
    with pytest.raises(MirrorDeployError) as err:
        require_provider("tpu")
    assert "cuda" in err.value.fix


def test_devices_lists_what_runs_here():
    fits = {f.profile.name: f for f in builtin_fits()}
    assert fits["cpu-sim"].runs_here and fits["cpu"].runs_here
    assert fits["cuda-npu"].missing == ("target: onnxruntime cuda", "draft: openvino NPU")
    assert fits["intel-npu"].missing == ("target: openvino GPU", "draft: openvino NPU")
    result = CliRunner().invoke(cli.app, ["devices"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "CPUExecutionProvider" in result.output and "cuda-npu" in result.output


def test_dropped_slots_are_compacted_before_they_spill_into_a_larger_bucket():
    """A bucketed static draft runs a call at the smallest capacity holding its used slots: dropped drafts
    must not push a short context into a larger bucket."""
    store = BufferStore(range(1), capacity=32, kv_heads=1, head_dim=2)
    cache = DraftCache(store, capacity=32, buckets=(8, 16, 32))
    cache.used, cache.committed = 6, 6
    cache.is_committed[:6] = cache.live[:6] = True
    store.buffers["past_key.0"][0, :6, 0, 0] = np.arange(6)
    assert cache.ensure_room(2) is None                       # 6 + 2 fit the 8 bucket
    cache.used = 8                                             # two drafts written, then dropped
    where = cache.ensure_room(2)                               # 8 + 2 would need 16; 6 live + 2 fit 8
    assert where is not None and cache.used == 6 and cache.compactions == 1
    np.testing.assert_array_equal(store.buffers["past_key.0"][0, :6, 0, 0], np.arange(6))
    cache.live[6:14] = True                                    # 14 live slots: the 16 bucket is right
    cache.used = 14
    assert cache.ensure_room(2) is None
    unbucketed = DraftCache(BufferStore(range(1), capacity=32, kv_heads=1, head_dim=2), capacity=32)
    unbucketed.used = 30
    assert unbucketed.ensure_room(2) is None                   # no buckets: only the capacity counts


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_explicit_draft_attends_per_kv_head_without_copying_kv(tiny_pairs, tiny_artifacts, arch):
    """The explicit-K/V draft is traced with grouped-query attention (export/graphs.grouped_attention): the same
    logits as HF's eager attention, and no Expand in its attention (repeat_kv's copy of K/V for every query head,
    40% of a static 0.5B draft call on OpenVINO's CPU)."""
    import onnx
    import torch
    from mirror_deploy.export.architectures import arch_for
    from mirror_deploy.export.graphs import grouped_attention
    from mirror_deploy.export.loading import open_source
    draft = open_source(tiny_pairs[arch][1], "draft")
    model = draft.load_model()
    assert model.config.num_key_value_heads < model.config.num_attention_heads   # else the test shows nothing
    seq, past = 5, 7
    mask = torch.zeros(1, 1, seq, past + seq)
    mask[..., 2] = mask[..., past + 3:] = torch.finfo(torch.float32).min   # a dropped slot, and causal rows
    ids, positions = torch.randint(0, 50, (1, seq)), torch.arange(past, past + seq)[None]
    from transformers import DynamicCache
    def logits():
        cache = DynamicCache()
        layers = len(draft.arch.layers_of(model))
        for i in range(layers):
            k = torch.randn(1, model.config.num_key_value_heads, past, draft.shape.head_dim, generator=torch.Generator().manual_seed(i))
            cache.update(k, k * 0.5, i)
        with torch.no_grad():
            return model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits
    eager = logits()
    with grouped_attention(model, arch_for(model.config.model_type)):
        grouped = logits()
    np.testing.assert_allclose(grouped.numpy(), eager.numpy(), rtol=1e-5, atol=1e-5)
    graph = onnx.load(str(tiny_artifacts[arch] / "draft.onnx"), load_external_data=False).graph
    expands = [node.name for node in graph.node if node.op_type == "Expand"]
    assert expands and not [name for name in expands if "self_attn" in name], expands
