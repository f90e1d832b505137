"""Runtimes and KV state: ONNX Runtime and OpenVINO against the eager wrappers, rollback, keeping one
branch of a tree, capacity and device errors, the static (NPU-shaped) draft against the dynamic one."""
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
from mirror_deploy.runtimes.kv import COMMITTED, DraftCache, KVCache
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


def _draft(folder, manifest, name, part=OV_CPU):
    return DraftDriver.for_manifest(open_graph(folder, manifest, name, part, "draft"), manifest)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("part", [ORT_CPU, OV_CPU], ids=["onnxruntime", "openvino"])
def test_target_graphs_match_torch_wrappers(tiny_artifacts, refs, arch, part):
    folder, ref = tiny_artifacts[arch], refs[arch]
    m = ref.manifest
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


@pytest.mark.parametrize("variant", ["draft_ir", "draft_static"])
def test_keep_chain_then_continue(tiny_artifacts, static_artifact, refs, variant):
    folder = static_artifact if variant == "draft_static" else tiny_artifacts["llama"]
    m, ref = read_manifest(folder), refs["llama"]
    run = _draft(folder, m, variant)
    committed = rng.integers(0, 128, 9)
    run.commit(committed)
    branches = [list(rng.integers(0, 128, 2)) for _ in range(2)]  # 4 tokens: fits the static width 5
    logits, slots, spans = _tree(run, branches)
    for branch, span in zip(branches, spans):
        want = ref.draft_logits([*committed, *branch])[-len(branch):]
        np.testing.assert_allclose(logits[span.start:span.stop], want, atol=1e-4)
    run.keep(slots[1], n_commit=1)  # the second branch survives: its slots move down
    assert (run.cache.committed, run.cache.used) == (10, 11)
    more = list(rng.integers(0, 128, 2))
    got, _ = run.call(more, [10, run.call_slot(0)])  # continue after the kept, uncommitted token
    want = ref.draft_logits([*committed, *branches[1], *more])[-2:]
    np.testing.assert_allclose(got, want, atol=1e-4)


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
    runs = [DraftDriver.for_manifest(static, m), _draft(static_artifact, m, "draft_ir")]
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

    draft = DraftCache(range(1), capacity=8, kv_heads=2, head_dim=4)
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
        OvGraph(folder / "draft.xml", "draft", "NPU")
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
