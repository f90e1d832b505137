"""An artifact the size of its weights (issue 21): only the graphs its profiles run, the token table of a
quantized target at int8, and the run's peak memory in its figures."""
from __future__ import annotations

import onnx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mirror_deploy import cli
from mirror_deploy.artifact import read_manifest
from mirror_deploy.decoding.config import GenerationConfig as G
from mirror_deploy.decoding.engine import Engine
from mirror_deploy.errors import MirrorDeployError
from mirror_deploy.export.pipeline import ExportOptions, export_artifact

ORT_DRAFT = ('name = "ort-draft"\ndescription = "draft on ONNX Runtime CPU"\n'
             '[target]\nbackend = "onnxruntime"\ndevice = "cpu"\nthreads = 1\n'
             '[draft]\nbackend = "onnxruntime"\ndevice = "cpu"\nthreads = 1\n')
OV_TARGET = ('name = "ov-target"\ndescription = "target on OpenVINO CPU"\n'
             '[target]\nbackend = "openvino"\ndevice = "CPU"\nthreads = 1\n'
             '[draft]\nbackend = "openvino"\ndevice = "CPU"\nthreads = 1\n')


@pytest.fixture(scope="module")
def int4_cpu(tiny_pairs, tmp_path_factory):
    """An int4 target, int8 draft artifact for the cpu profile only (the deployment the issue sizes)."""
    console = Console(record=True, width=200)
    opts = ExportOptions(kappa=4, gamma=4, max_context=256, branch_batch=4, profile="cpu", target_weights="int4",
                         draft_weights="int8")
    folder = export_artifact(*tiny_pairs["qwen2"], tmp_path_factory.mktemp("int4") / "art", opts, console)
    return folder, console.export_text()


def test_only_the_profiles_graphs_are_written(int4_cpu, tmp_path):
    folder, printed = int4_cpu
    graphs = read_manifest(folder).graphs
    assert "draft_stateful" in graphs and "draft" not in graphs and "draft_static" not in graphs
    assert not list(folder.glob("draft.onnx*"))
    assert "profile cpu runs: target_seg0" in printed and printed.rstrip().endswith("draft_stateful")
    profile = tmp_path / "ort-draft.toml"
    profile.write_text(ORT_DRAFT)
    with pytest.raises(MirrorDeployError, match="re-export with --profile ort-draft"):
        Engine(folder, str(profile))


def test_several_profiles_write_each_ones_draft(tiny_pairs, tmp_path):
    profile = tmp_path / "ort-draft.toml"
    profile.write_text(ORT_DRAFT)
    opts = ExportOptions(kappa=4, gamma=4, max_context=256, branch_batch=4, profile="cpu",
                         also_profiles=(str(profile),))
    folder = export_artifact(*tiny_pairs["llama"], tmp_path / "art", opts, Console(quiet=True))
    assert {"draft", "draft_stateful"} <= set(read_manifest(folder).graphs)
    prompt = [5, 6, 7, 8]
    cfg = G(max_new_tokens=12, mode="sd", stop_at_eos=False)
    assert Engine(folder, str(profile)).generate(prompt, cfg).tokens == Engine(folder).generate(prompt, cfg).tokens
    other = tmp_path / "ov-target.toml"
    other.write_text(OV_TARGET)
    with pytest.raises(MirrorDeployError, match="one artifact per target runtime"):
        export_artifact(*tiny_pairs["llama"], tmp_path / "mixed",
                        ExportOptions(profile="cpu", also_profiles=(str(other),)), Console(quiet=True))
    assert not (tmp_path / "mixed").exists()


def test_a_quantized_targets_token_table_is_int8_and_every_mode_stays_exact(int4_cpu):
    folder, _ = int4_cpu
    seg0 = onnx.load(str(folder / "target_seg0.onnx"), load_external_data=False)
    ops = {n.op_type for n in seg0.graph.node}
    names = {t.name for t in seg0.graph.initializer}
    assert "GatherBlockQuantized" in ops
    assert "embed_tokens.qweight" in names and "embed_tokens.weight" not in names
    engine = Engine(folder)
    for prompt in ([5, 6, 7, 8], list(range(20, 60))):
        expected = engine.generate(prompt, G(max_new_tokens=20, mode="ar", stop_at_eos=False)).tokens
        for mode, schedule in (("sd", "serial"), ("mirror", "serial"), ("mirror", "overlapped")):
            out = engine.generate(prompt, G(max_new_tokens=20, mode=mode, schedule=schedule, stop_at_eos=False))
            assert out.tokens == expected, (mode, schedule)


def test_run_reports_peak_memory(int4_cpu):
    folder, _ = int4_cpu
    result = CliRunner().invoke(cli.app, ["run", str(folder), "--prompt", "abc", "--max-new-tokens", "4", "--stats"])
    assert result.exit_code == 0, result.output
    assert "peak resident memory" in result.output
    summary = Engine(folder).generate([5, 6], G(max_new_tokens=3, mode="ar")).summary
    assert 0.05 < summary["peak_rss_gb"] < 64


def test_anatomy_reports_bytes_bandwidth_and_window_ratios(int4_cpu):
    from mirror_deploy.bench.anatomy import anatomy
    from mirror_deploy.bench.bandwidth import bandwidth_rows, graph_bytes
    folder, _ = int4_cpu
    engine = Engine(folder)
    total, streamed = graph_bytes(folder, engine.manifest, "target_seg0")
    assert streamed < total            # the token table is looked up, not streamed
    figures = anatomy(engine, context=40, rounds=1, prefill_tokens=16)
    rows = {name: ratios for name, *_, ratios in bandwidth_rows(folder, engine.manifest, engine.profile, figures, 4)}
    assert set(rows) == {*engine.manifest.target_segments(), "target_head", "draft_stateful"}
    assert set(rows["target_seg1"]) == {2, 4, 5} and set(rows["draft_stateful"]) == {4, 8}


def test_op_profile_splits_a_segment_by_op_type(int4_cpu):
    """`python -m mirror_deploy.bench.op_profile`: the weights' kernel and the K/V writes of every layer
    appear, the K/V is sliced nowhere (it is bound at the span), and a graph that is no fused segment is
    refused."""
    from mirror_deploy.bench.op_profile import profile_segment
    folder, _ = int4_cpu
    layers = read_manifest(folder).graphs["target_seg1"].layers
    call_ms, ops = profile_segment(folder, "target_seg1", context=40, rows=2, runs=3)
    assert call_ms > 0 and ops["MatMulNBits"][1] == 4 * (layers[1] - layers[0])
    assert ops["TensorScatter"][1] == 2 * (layers[1] - layers[0])
    assert ops.get("Slice", (0, 0))[1] == 1      # the K/V write position only; the K/V itself is not sliced
    with pytest.raises(MirrorDeployError, match="not a fused target segment"):
        profile_segment(folder, "target_head", context=40, rows=2, runs=1)
