"""GGUF quantization kept (`--target-weights gguf`), and quantized targets exact: a verify window computes
what the same rows would as single autoregressive steps, bit for bit, so every mode equals AR."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM

from mirror_deploy.artifact import read_manifest
from mirror_deploy.axes import ATTENTION_SPAN
from mirror_deploy.check import FAIL, check_artifact
from mirror_deploy.decoding.config import GenerationConfig as G
from mirror_deploy.decoding.drive import TargetDriver
from mirror_deploy.decoding.engine import Engine
from mirror_deploy.errors import MirrorDeployError
from mirror_deploy.export.gguf_weights import MAPPERS, map_weight
from mirror_deploy.export.pipeline import ExportOptions, export_artifact
from mirror_deploy.runtimes.loader import open_target
from mirror_deploy.targets import Profile
from mirror_deploy.tiny import build_model, perturbed, tiny_config, tiny_tokenizer
from mirror_deploy.tiny.gguf import ALTERNATE_TYPES, MIXED_TYPES, random_blocks, write_tiny_gguf

QUIET = Console(quiet=True)
OPTS = dict(kappa=4, gamma=4, max_context=320, branch_batch=4, profile="cpu")
PROMPTS = [[5, 9, 17, 3, 44], [7] * 12, [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4], [100, 21, 64]]
SPEC_MODES = [("sd", "serial"), ("mirror", "serial"), ("mirror", "overlapped")]


@pytest.mark.parametrize("gguf_type", list(MAPPERS))
def test_mapping_equals_gguf_dequantization(gguf_type):
    """Codes, scales and offsets give back gguf-py's own dequantization of the same blocks, exactly."""
    from gguf import GGMLQuantizationType, quants
    rng = np.random.default_rng(0)
    raw = random_blocks(rng, gguf_type, 6, 512, 0.05)
    mapped = map_weight(raw, gguf_type, (6, 512))
    expected = quants.dequantize(raw, GGMLQuantizationType[gguf_type]).reshape(6, 512)
    np.testing.assert_array_equal(mapped.dequantize(), expected)
    assert mapped.packed.shape == (6, 512 // mapped.block, mapped.block * mapped.bits // 8)


def test_unmapped_type_is_refused():
    with pytest.raises(MirrorDeployError, match="Q2_K") as err:
        map_weight(np.zeros((1, 84), np.uint8), "Q2_K", (1, 256), "blk.0.ffn_up.weight")
    assert "llama-quantize" in err.value.fix and "blk.0.ffn_up.weight" in err.value.problem


@pytest.mark.parametrize("gguf_type", list(MAPPERS))
def test_graph_multiplies_by_the_mapped_weights(gguf_type):
    """MatMulNBits (+ the offsets' MatMul) over the mapped blocks is x @ Wᵀ. The inputs are integers with a
    ±127 in every block of 16, so accuracy level 4's int8 activations are exact and only fp32 sums differ."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from mirror_deploy.export.fused_target import _Graph, _quant_linear
    rng = np.random.default_rng(1)
    k, n = 512, 48
    mapped = [map_weight(random_blocks(rng, gguf_type, n, k, 0.05), gguf_type, (n, k)) for _ in range(2)]
    g = _Graph()
    y = _quant_linear(g, "x", mapped, "proj")
    g.nodes.append(helper.make_node("Identity", [y], ["y"]))
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", 2 * n])], g.weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    x = rng.integers(-126, 127, (1, 5, k)).astype(np.float32)
    x[..., ::16] = 127
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    weight = np.concatenate([m.dequantize() for m in mapped]).astype(np.float64)
    want = x.astype(np.float64) @ weight.T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    onnx.checker.check_model(model)


@pytest.mark.parametrize("gguf_type", list(MAPPERS))
def test_a_token_table_kept_in_its_blocks_gathers_gguf_rows_bit_for_bit(gguf_type):
    """The graph's gather of codes, scales and offsets gives gguf-py's dequantized rows exactly, so a
    table stored at its own 4-8 bits changes no output against the fp32 table."""
    import onnxruntime as ort
    from gguf import GGMLQuantizationType, quants
    from onnx import TensorProto, helper

    from mirror_deploy.export.fused_embedding import embedding as _embedding
    from mirror_deploy.export.fused_target import _Graph
    from mirror_deploy.export.gguf_model import QuantEmbedding
    from mirror_deploy.export.gguf_weights import read_blocks
    rng = np.random.default_rng(3)
    vocab, width = 40, 512
    raw = random_blocks(rng, gguf_type, vocab, width, 0.05)
    g = _Graph()
    rows = _embedding(g, QuantEmbedding(read_blocks(raw, gguf_type, (vocab, width))), quantized=False)
    g.nodes.append(helper.make_node("Identity", [rows], ["rows"]))
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"])],
                              [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [1, "s", width])], g.weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    model.ir_version = 10
    ids = rng.permutation(vocab)[None]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    expected = quants.dequantize(raw, GGMLQuantizationType[gguf_type]).reshape(vocab, width)
    np.testing.assert_array_equal(got[0], expected[ids[0]])


@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory):
    """A tiny qwen2 GGUF target in Q4_K_M's types, its dequantized HF model, and a draft near it."""
    root = tmp_path_factory.mktemp("gguf")
    target = write_tiny_gguf(root / "target.gguf", MIXED_TYPES)
    model = AutoModelForCausalLM.from_pretrained(root, gguf_file=target.name, dtype=torch.float32).eval()
    perturbed(model, 0.2, 1).save_pretrained(root / "draft")
    return target, root / "draft", model


@pytest.fixture(scope="module")
def gguf_artifact(gguf_pair, tmp_path_factory):
    target, draft, _ = gguf_pair
    return export_artifact(target, draft, tmp_path_factory.mktemp("gguf-art") / "art",
                           ExportOptions(target_weights="gguf", **OPTS), QUIET)


def _driver(art):
    m = read_manifest(art)
    return TargetDriver.for_manifest(open_target(art, m, Profile.from_dict(m.profile)), m)


def test_gguf_artifact_keeps_the_blocks_and_agrees_with_pytorch(gguf_pair, gguf_artifact):
    import onnx
    target, _, model = gguf_pair
    m = read_manifest(gguf_artifact)
    assert m.target_weights == "gguf" and m.target["gguf_file"] == str(target.resolve())
    ops = {n.op_type for g in ("target_seg0", "target_head")
           for n in onnx.load(str(gguf_artifact / m.graphs[g].file), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "MatMul" in ops   # MatMul: the offsets of the K types
    seg0 = onnx.load(str(gguf_artifact / m.graphs["target_seg0"].file), load_external_data=False)
    tables = {t.name for t in seg0.graph.initializer if t.name.startswith("embed_tokens.")}
    assert "embed_tokens.codes4" in tables and "embed_tokens.weight" not in tables   # Q4_K kept, no fp32 copy
    ids = np.random.default_rng(2).integers(0, 128, 24)
    got = _driver(gguf_artifact).window(ids, start=0)["logits"]
    with torch.no_grad():
        want = model(torch.tensor(ids)[None]).logits[0].numpy()
    # Same weights; only the int8 activations of accuracy level 4 differ from PyTorch's fp32.
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    report = check_artifact(gguf_artifact)
    assert report.ok, [r for r in report.rows if r.result == FAIL]
    assert {r.graph for r in report.rows if r.check == "gguf weights"} == set(MIXED_TYPES.values())


def test_a_pulled_checkpoint_keeps_its_published_token_table_and_its_outputs(gguf_pair, tmp_path, monkeypatch):
    """A checkpoint made by `models pull`, with its GGUF on disk: quantized and fp32 exports store the token
    table as the GGUF's own blocks, and the target computes exactly what it does with the dense table."""
    import onnx

    from mirror_deploy import models
    from mirror_deploy.export import pipeline
    gguf_file, _, model = gguf_pair
    name = "qwen2.5-coder-1.5b-instruct"
    folder = tmp_path / name
    model.save_pretrained(folder)
    (folder / "source.json").write_text('{"name": "%s"}' % name)
    models.gguf_path(name, tmp_path).parent.mkdir()
    models.gguf_path(name, tmp_path).write_bytes(gguf_file.read_bytes())

    def tables(art):
        m = read_manifest(art)
        seg0 = onnx.load(str(art / m.graphs["target_seg0"].file), load_external_data=False)
        return {t.name for t in seg0.graph.initializer if t.name.startswith("embed_tokens.")}
    for weights in ("int8", "fp32"):
        art = export_artifact(folder, None, tmp_path / f"art-{weights}", ExportOptions(target_weights=weights, **OPTS),
                              QUIET)
        assert "embed_tokens.codes4" in tables(art), weights
    monkeypatch.setattr(pipeline, "published_table", lambda *a: None)   # the dense table, for reference
    dense = export_artifact(folder, None, tmp_path / "art-dense", ExportOptions(target_weights="fp32", **OPTS), QUIET)
    assert "embed_tokens.weight" in tables(dense)
    ids = np.random.default_rng(7).integers(0, 128, 24)
    np.testing.assert_array_equal(_driver(tmp_path / "art-fp32").window(ids, start=0)["logits"],
                                  _driver(dense).window(ids, start=0)["logits"])


@pytest.mark.parametrize("weights", ["gguf", "int4", "int8"])
def test_window_rows_equal_single_steps_bit_for_bit(gguf_pair, gguf_artifact, tmp_path, weights):
    """The property every mode's exactness rests on, at each quantized format we export by default."""
    art = gguf_artifact
    if weights != "gguf":
        target, draft, model = gguf_pair
        model.save_pretrained(tmp_path / "hf")
        art = export_artifact(tmp_path / "hf", None, tmp_path / "art", ExportOptions(target_weights=weights, **OPTS),
                              QUIET)
    assert _windows_differ_from_steps(art) == 0


def test_the_window_check_can_fail(gguf_pair, tmp_path, monkeypatch):
    """Without the even-row rule, int4 MatMulNBits (blocks of 128) computes a lone row its own way: the check
    above sees it."""
    from mirror_deploy.runtimes.kv import InPlaceKV
    _, _, model = gguf_pair
    model.save_pretrained(tmp_path / "hf")
    art = export_artifact(tmp_path / "hf", None, tmp_path / "art", ExportOptions(target_weights="int4", **OPTS), QUIET)
    monkeypatch.setattr(InPlaceKV, "_even_call", lambda self, graph, feeds, *_: graph.run(feeds, in_place=self.bound))
    assert _windows_differ_from_steps(art) > 0


def _windows_differ_from_steps(art) -> int:
    """Rows whose logits or exit top-κ differ (at all) between windows of 2..8 rows and the same rows one at a
    time: early in the context, and around position 256, where the attention's span grows (ATTENTION_SPAN)
    and the K/V buffers with it; last, a rollback back across 256, where they shrink again."""
    assert ATTENTION_SPAN == 256 and read_manifest(art).max_context > 290
    ids = np.random.default_rng(3).integers(0, 128, 290)
    differ = 0

    def compare(rows, steps):
        return sum(int((rows[key] != np.concatenate([s[key] for s in steps])).any(axis=-1).sum())
                   for key in ("logits", "exit_logprobs", "exit_ids"))
    for prefill in (10, 250):
        window, single = _driver(art), _driver(art)
        window.window(ids[:prefill], start=0)
        single.window(ids[:prefill], start=0)
        at, alone = prefill, {}
        for size in (2, 3, 5, 8, 7):
            rows = window.window(ids[at:at + size], start=at)
            steps = [single.window(ids[i:i + 1], start=i) for i in range(at, at + size)]
            alone.update(zip(range(at, at + size), steps))
            differ += compare(rows, steps)
            at += size
        if prefill == 250:   # back to 253 (the buffers were sized past 256), then a window over 256 again
            differ += compare(window.window(ids[253:255], start=253), [alone[253], alone[254]])
            differ += compare(window.window(ids[255:260], start=255), [alone[i] for i in range(255, 260)])
    return differ


def test_one_query_head_per_kv_head_is_exact_too(tmp_path):
    """Multi-head attention (as many K/V heads as query heads) takes the fused path's doubled-rows branch."""
    config = tiny_config("llama", layers=2)
    config.num_key_value_heads = config.num_attention_heads
    build_model(config, 0, scale=3.0).save_pretrained(tmp_path / "mha")
    tiny_tokenizer().save_pretrained(tmp_path / "mha")
    art = export_artifact(tmp_path / "mha", None, tmp_path / "art", ExportOptions(**OPTS), QUIET)
    assert _windows_differ_from_steps(art) == 0


def test_every_mode_equals_autoregressive_on_a_gguf_target(gguf_artifact):
    engine = Engine(gguf_artifact)
    for prompt in PROMPTS:
        expected = engine.generate(prompt, G(max_new_tokens=24, mode="ar", stop_at_eos=False)).tokens
        assert engine.generate(prompt, G(max_new_tokens=24, mode="lookup", stop_at_eos=False)).tokens == expected
        for gamma in (1, 2, 4):
            for mode, schedule in SPEC_MODES:
                got = engine.generate(prompt, G(max_new_tokens=24, mode=mode, schedule=schedule, gamma=gamma,
                                                stop_at_eos=False)).tokens
                assert got == expected, (prompt, gamma, mode, schedule)


def test_other_types_and_a_tied_head(tmp_path):
    """Q4_0, Q4_1, Q5_1, Q8_0, and a head tied to a Q8_0 embedding: the graph agrees with PyTorch."""
    types = {k: v for k, v in ALTERNATE_TYPES.items() if k != "output"}
    path = write_tiny_gguf(tmp_path / "alt.gguf", types, seed=4)
    art = export_artifact(path, None, tmp_path / "art", ExportOptions(target_weights="gguf", **OPTS), QUIET)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = np.random.default_rng(5).integers(0, 128, 16)
    got = _driver(art).window(ids, start=0)["logits"]
    with torch.no_grad():
        want = model(torch.tensor(ids)[None]).logits[0].numpy()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_bad_gguf_requests_are_refused_before_writing(gguf_pair, tmp_path):
    target, draft, model = gguf_pair
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(MirrorDeployError, match="needs a GGUF file") as err:
        export_artifact(tmp_path / "hf", None, tmp_path / "a", ExportOptions(target_weights="gguf", **OPTS), QUIET)
    assert "--target-weights int4" in err.value.fix
    with pytest.raises(MirrorDeployError, match="runs the target on openvino"):
        export_artifact(target, None, tmp_path / "b", ExportOptions(target_weights="gguf", **{**OPTS, "profile": "intel-npu"}),
                        QUIET)
    with pytest.raises(MirrorDeployError, match="exit-head"):
        export_artifact(target, None, tmp_path / "c", ExportOptions(target_weights="gguf", exit_head_weights="int4", **OPTS),
                        QUIET)
    assert not any(tmp_path.glob("[abc]*")) and not any(tmp_path.glob(".[abc]*"))


def _every_mode_equals_ar(art) -> None:
    engine = Engine(art)
    for prompt in PROMPTS[:2]:
        expected = engine.generate(prompt, G(max_new_tokens=12, mode="ar", stop_at_eos=False)).tokens
        for mode, schedule in SPEC_MODES:
            got = engine.generate(prompt, G(max_new_tokens=12, mode=mode, schedule=schedule, stop_at_eos=False))
            assert got.tokens == expected, (prompt, mode, schedule)


def test_a_gguf_draft_keeps_its_blocks_in_openvino(gguf_pair, tmp_path):
    """`--draft-weights gguf`: every weight of the OpenVINO draft is its GGUF tensor's blocks (u4/u8 codes
    the CPU plugin multiplies compressed), `check` compares them with gguf-py's dequantization per type,
    and every mode still equals autoregressive decoding."""
    import openvino as ov
    target, _, _ = gguf_pair
    draft = write_tiny_gguf(tmp_path / "draft.gguf", MIXED_TYPES, seed=3)
    art = export_artifact(target, draft, tmp_path / "art",
                          ExportOptions(target_weights="gguf", draft_weights="gguf", also_profiles=("cuda-npu",), **OPTS),
                          QUIET)
    m = read_manifest(art)
    assert m.draft["gguf_file"] == str(draft.resolve())
    for graph in ("draft_stateful", "draft_static"):
        model = ov.Core().read_model(str(art / m.graphs[graph].file))
        dense = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "Constant"
                 and op.get_element_type() == ov.Type.f32 and len(op.get_output_shape(0)) == 2
                 and min(op.get_output_shape(0)) >= 64]
        assert not dense, (graph, dense)
        kinds = {op.get_element_type() for op in model.get_ops() if op.get_type_name() == "Constant"}
        assert {ov.Type.u4, ov.Type.u8} <= kinds
    report = check_artifact(art)
    assert report.ok, [r for r in report.rows if r.result == FAIL]
    rows = {r.graph for r in report.rows if r.check == "gguf weights" and r.graph.startswith("draft")}
    assert rows == {f"{g} {t}" for g in ("draft_stateful", "draft_static") for t in set(MIXED_TYPES.values())}
    _every_mode_equals_ar(art)


def test_a_pulled_gguf_draft_is_traced_without_its_weights_and_checked_against_its_checkpoint(gguf_pair, tmp_path,
                                                                                              monkeypatch):
    """The stateful draft of a GGUF draft is traced with no weight data (its fp32 checkpoint is never loaded);
    its GGUF tensors go in by name, each compared with the pulled checkpoint it dequantizes to. A checkpoint
    of another GGUF with the same shapes is refused, and nothing is written."""
    from mirror_deploy.export import pipeline
    from mirror_deploy.export.loading import SourceModel
    target, _, _ = gguf_pair
    draft_gguf = write_tiny_gguf(tmp_path / "draft.gguf", MIXED_TYPES, seed=3)
    other = write_tiny_gguf(tmp_path / "other.gguf", MIXED_TYPES, seed=4)
    for name, source in (("pulled", draft_gguf), ("other", other)):    # a checkpoint as `models pull` makes it
        AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=source.name, dtype=torch.float32).save_pretrained(
            tmp_path / name)
    monkeypatch.setattr(pipeline, "gguf_file_of", lambda path, role: target if role == "target" else draft_gguf)

    def no_dense_draft(self):
        raise AssertionError(f"{self.path} loaded as a dense PyTorch model")
    with monkeypatch.context() as export_only:     # (check's parity rows load the reference models)
        export_only.setattr(SourceModel, "load_model", no_dense_draft)
        art = export_artifact(target, tmp_path / "pulled", tmp_path / "art",
                              ExportOptions(target_weights="gguf", draft_weights="gguf", **OPTS), QUIET)
    report = check_artifact(art)
    assert report.ok, [r for r in report.rows if r.result == FAIL]
    assert any(r.check == "fused attention" and r.graph == "draft_stateful" for r in report.rows)
    _every_mode_equals_ar(art)
    with pytest.raises(MirrorDeployError, match="not equal to its tensor .*not this GGUF's dequantization"):
        export_artifact(target, tmp_path / "other", tmp_path / "art2",
                        ExportOptions(target_weights="gguf", draft_weights="gguf", **OPTS), QUIET)
    assert not (tmp_path / "art2").exists()


def test_two_gguf_files_are_compared_by_their_token_lists(gguf_pair, tmp_path):
    """A target and a draft given as .gguf files: their vocabularies are read from the headers (equal to
    gguf-py's reading), and a draft whose tokens differ is refused before anything is written."""
    from gguf import GGUFReader

    from mirror_deploy.export.gguf_model import gguf_tokens
    target, _, _ = gguf_pair
    field = GGUFReader(target).fields["tokenizer.ggml.tokens"]
    assert gguf_tokens(target) == [bytes(field.parts[i]) for i in field.data]
    other = write_tiny_gguf(tmp_path / "other.gguf", MIXED_TYPES, seed=3, token_prefix="u")
    with pytest.raises(MirrorDeployError, match="different ids"):
        export_artifact(target, other, tmp_path / "art", ExportOptions(target_weights="gguf", draft_weights="gguf",
                                                                       **OPTS), QUIET)
    assert not (tmp_path / "art").exists()


def test_a_draft_checkpoint_that_is_not_its_gguf_is_refused(gguf_pair, tmp_path):
    from mirror_deploy import models
    target, draft_folder, _ = gguf_pair
    name = "qwen2.5-coder-0.5b-instruct"
    folder = tmp_path / name
    import shutil
    shutil.copytree(draft_folder, folder)
    (folder / "source.json").write_text('{"name": "%s"}' % name)
    models.gguf_path(name, tmp_path).parent.mkdir()
    models.gguf_path(name, tmp_path).write_bytes(target.read_bytes())   # another model's file
    with pytest.raises(MirrorDeployError, match="not this GGUF's dequantization"):
        export_artifact(target, folder, tmp_path / "art", ExportOptions(draft_weights="gguf", **OPTS), QUIET)
    assert not (tmp_path / "art").exists()
