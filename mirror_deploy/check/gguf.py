"""`check` on a GGUF artifact: the weights its graphs multiply by are the GGUF file's own, per tensor type.

Each projection's MatMulNBits blocks (codes, scales, and the offsets' MatMul of the K types) are expanded
back to a dense `[N, K]` and set beside gguf-py's dequantization of the tensors they came from; the
embedding table (dense, or gathered from its own blocks) is compared the same way. Both sides compute in fp32, so they agree to within fp16's
rounding of the largest weight (measured: exactly, or to 1e-7 where the offset is folded).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..artifact import Manifest
from .report import CheckReport

FP16_ROUNDING = 2.0 ** -11   # half an fp16 ulp, relative to the tensor's largest weight
INT8_ROUNDING = 0.5 / 127 * 1.01   # half an int8 step of a group's largest weight (+1%: float rounding), for
#                                    what an OpenVINO-native target re-quantizes to int8
_GROUPS = {"attn.qkv_proj": ("attn_q", "attn_k", "attn_v"), "attn.o_proj": ("attn_output",),
           "mlp.gate_up_proj": ("ffn_gate", "ffn_up"), "mlp.down_proj": ("ffn_down",)}
_HF_NAMES = {"attn_q": "q_proj", "attn_k": "k_proj"}


def gguf_sources(group: str, tensors: dict) -> list[str]:
    """The GGUF tensor names a graph projection was packed from, in packing order."""
    if group == "lm_head":
        return ["output.weight" if "output.weight" in tensors else "token_embd.weight"]
    layer, kind = re.match(r"layers\.(\d+)\.(.*)", group).groups()
    return [f"blk.{layer}.{g}.weight" for g in _GROUPS[kind]]


def _dense_from_graph(folder: Path, inits: dict, nodes: dict, prefix: str) -> np.ndarray:
    """A projection part's MatMulNBits blocks (and offsets), expanded the way the graph computes them."""
    from ..export.gguf_weights import MappedWeight
    node = nodes[f"{prefix}.qweight"]
    bits, block = (next(a.i for a in node.attribute if a.name == key) for key in ("bits", "block_size"))
    packed = numpy_helper.to_array(inits[f"{prefix}.qweight"], str(folder))
    scales = numpy_helper.to_array(inits[f"{prefix}.scales"], str(folder)).reshape(packed.shape[:2])
    offsets = (numpy_helper.to_array(inits[f"{prefix}.offsets"], str(folder)).T
               if f"{prefix}.offsets" in inits else None)
    return MappedWeight("graph", bits, block, packed, scales, offsets).dequantize()


def _graph_projections(folder: Path, m: Manifest, names: list[str]):
    """(group, dense weight) per quantized projection of the named graphs, parts concatenated in order."""
    for name in names:
        model = onnx.load(str(folder / m.graphs[name].file), load_external_data=False)
        inits = {t.name: t for t in model.graph.initializer}
        nodes = {n.input[1]: n for n in model.graph.node if n.op_type == "MatMulNBits"}
        groups: dict[str, list[str]] = {}
        for key in nodes:
            prefix = key[:-len(".qweight")]
            groups.setdefault(re.sub(r"\.part\d+$", "", prefix), []).append(prefix)
        for group, prefixes in groups.items():
            yield group, np.concatenate([_dense_from_graph(folder, inits, nodes, p) for p in sorted(prefixes)])
        if "embed_tokens.weight" in inits:
            yield "embed_tokens", numpy_helper.to_array(inits["embed_tokens.weight"], str(folder))
        table = _graph_table(folder, inits)
        if table is not None:
            yield "embed_tokens", table


def _graph_table(folder: Path, inits: dict) -> np.ndarray | None:
    """A token table kept in its GGUF blocks (`fused_embedding._gguf_table`), expanded the way the graph does."""
    from ..export.gguf_weights import GgufBlocks, unpack
    bits = next((b for b in (4, 8) if f"embed_tokens.codes{b}" in inits), None)
    if bits is None:
        return None
    read = lambda name: numpy_helper.to_array(inits[f"embed_tokens.{name}"], str(folder))  # noqa: E731
    packed, scales = read(f"codes{bits}"), read("scales")
    codes = unpack(packed, bits)
    center = int(read("center")) if "embed_tokens.center" in inits else 0
    offsets = read("offsets") if "embed_tokens.offsets" in inits else None
    return GgufBlocks("graph", bits, codes.shape[1] // scales.shape[1], codes, center, scales, offsets).dequantize()


def _ov_projections(folder: Path, m: Manifest, names: list[str]):
    """(group, dense weight, kept) per projection of OpenVINO-native graphs (export/openvino_target.py): our
    kernel's nodes expanded from their codes, fp16 scales and minimums (`kept`, per row: the file's own
    codes), the int8 MatMuls and the token table evaluated by OpenVINO (re-quantized)."""
    import openvino as ov

    from ..kernels.layout import Q4Weights, dequantize, unpack
    from ..runtimes.openvino import KERNEL_OP, core, load_kernel
    load_kernel()
    for name in names:
        model = core().read_model(str(folder / m.graphs[name].file))
        parts: dict[str, list] = {}
        evaluate = []
        for op in model.get_ordered_ops():
            kind, label = op.get_type_name(), op.get_friendly_name()
            group = re.sub(r"\.part\d+$", "", label)
            if kind == KERNEL_OP:
                a = op.get_attributes()
                codes, scales, mins = (op.input_value(i).get_node().get_data() for i in (1, 2, 3))
                c, sc, mn = unpack(Q4Weights(codes, scales, mins, a["n"], a["k"], a["group"]))
                parts.setdefault(group, []).append((label, dequantize(c, sc, mn, a["group"]), True))
            elif kind == "MatMul" and (group.endswith("_proj") or group == "lm_head"):
                parts.setdefault(group, []).append((label, len(evaluate), False))
                evaluate.append(op.input_value(1))
            elif kind == "Gather" and "input_ids" in op.input_value(1).get_names():   # the token table
                parts["embed_tokens"] = [("embed_tokens", len(evaluate), False)]
                evaluate.append(op.input_value(0))
        values = []
        if evaluate:
            weights = core().compile_model(ov.Model(evaluate, [], "weights"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            values = list(weights.create_infer_request().infer({}).values())
        for group, items in parts.items():
            items.sort(key=lambda item: item[0])
            dense = [values[v] if isinstance(v, int) else v for _, v, _ in items]
            yield group, np.concatenate(dense), np.concatenate([np.full(len(d), kept) for d, (*_, kept) in zip(dense, items)])


def check_gguf_weights(folder: Path, m: Manifest, intact: set[str], report: CheckReport) -> None:
    from gguf import GGUFReader, quants
    from transformers import AutoConfig

    from ..export.gguf_model import permuted_heads, qk_row_order
    names = [*m.target_segments(), "target_head"]
    path = Path(m.target.get("gguf_file", ""))
    if not all(n in intact for n in names) or not path.is_file():
        why = "a graph file is damaged (see hash)" if path.is_file() else f"the source GGUF {path} is gone"
        report.skip("gguf weights", "target", f"not compared: {why}")
        return
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    worst: dict[str, float] = {}   # GGUF type -> largest error relative to the tensor's largest weight
    count: dict[str, int] = {}
    requantized: set[str] = set()   # types an OpenVINO-native target holds as int8, not in their own blocks
    native = m.graphs[names[0]].format == "openvino"
    projections = _ov_projections(folder, m, names) if native else \
        ((g, w, np.ones(len(w), bool)) for g, w in _graph_projections(folder, m, names))
    for group, got, kept in projections:
        sources = ["token_embd.weight"] if group == "embed_tokens" else gguf_sources(group, tensors)
        row = 0
        for source in sources:
            t = tensors[source]
            want = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1, int(t.shape[0]))
            heads = permuted_heads(config.model_type, _HF_NAMES.get(source.split(".")[-2], ""), config)
            if heads is not None:
                want = want[qk_row_order(want.shape[0], heads)]
            part = got[row:row + want.shape[0]]
            row += want.shape[0]
            kind = t.tensor_type.name + ("" if kept[row - want.shape[0]:row].all() else " as int8")
            if kind.endswith(" as int8"):
                requantized.add(kind)
            err = float(np.abs(part - want).max() / max(np.abs(want).max(), 1e-30)) if part.shape == want.shape else np.inf
            worst[kind], count[kind] = max(worst.get(kind, 0.0), err), count.get(kind, 0) + 1
    for kind in sorted(worst):
        if kind in requantized:
            limit, how = INT8_ROUNDING, "int8 rounding: re-quantized, not the file's codes"
        elif native:   # our kernel: the file's codes, each block's scale and minimum rounded to fp16
            limit, how = 2 * FP16_ROUNDING, "fp16 rounding of a block's scale and of its minimum"
        else:
            limit, how = FP16_ROUNDING, "fp16 rounding"
        report.add("gguf weights", kind, worst[kind] <= limit,
                   f"{count[kind]} {kind} tensors of {path.name}: graph weights vs gguf's dequantization, "
                   f"largest difference {worst[kind]:.1e} of the tensor's largest weight", worst[kind],
                   f"≤ {limit:.1e} ({how})",
                   fix="re-export with --target-weights gguf; if it persists, report the type")


def check_gguf_draft(folder: Path, m: Manifest, intact: set[str], report: CheckReport) -> None:
    """An OpenVINO draft with its GGUF blocks kept (`--draft-weights gguf`): each weight it computes from
    them against gguf-py's dequantization, per type (types with a minimum fold it into a float zero point)."""
    from gguf import GGUFReader, quants

    from ..export.gguf_weights import DENSE
    from ..export.openvino_gguf import graph_gguf_weights
    path = Path((m.draft or {}).get("gguf_file", ""))
    graphs = [g for g in ("draft_stateful", "draft_static") if g in m.graphs]
    if not path.is_file() or not all(g in intact for g in graphs):
        why = "a graph file is damaged (see hash)" if path.is_file() else f"the source GGUF {path} is gone"
        report.skip("gguf weights", "draft", f"not compared: {why}")
        return
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    for graph in graphs:
        worst: dict[str, float] = {}
        count: dict[str, int] = {}
        got = graph_gguf_weights(folder / m.graphs[graph].file)
        for name, t in tensors.items():
            if t.tensor_type.name in DENSE or len(t.shape) != 2:
                continue
            want = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1, int(t.shape[0]))
            part = got.get(name)
            err = (float(np.abs(part - want).max() / max(np.abs(want).max(), 1e-30))
                   if part is not None and part.shape == want.shape else np.inf)
            kind = t.tensor_type.name
            worst[kind], count[kind] = max(worst.get(kind, 0.0), err), count.get(kind, 0) + 1
        for kind in sorted(worst):
            report.add("gguf weights", f"{graph} {kind}", worst[kind] <= FP16_ROUNDING,
                       f"{count[kind]} {kind} tensors of {path.name}: weights the draft computes from its blocks vs "
                       f"gguf's dequantization, largest difference {worst[kind]:.1e} of the tensor's largest weight",
                       worst[kind], f"≤ {FP16_ROUNDING:.1e} (fp16 rounding)",
                       fix="re-export with --draft-weights gguf; if it persists, report the type")
