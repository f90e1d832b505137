"""A GGUF's own blocks in an OpenVINO draft (`--draft-weights gguf`): every weight the traced graph holds
dense is swapped for its GGUF tensor's codes, zero point and scales, in the decompression pattern the CPU
plugin runs compressed (Constant u4/u8 → Convert → Subtract zero point → Multiply scale → Reshape).

A block is w = scale · (q − center) + offset (gguf_weights.GgufBlocks). Types without an offset (Q4_0,
Q5_0, Q8_0, Q6_K) map exactly: the center is an integer zero point. Types with one (Q4_1, Q5_1, Q4_K,
Q5_K) fold it into a float zero point, center − offset / scale: OpenVINO's pattern has no offset term
(an added one is constant-folded to a dense fp32 weight, measured), so those agree with gguf-py to about
one fp32 rounding. The draft only proposes tokens; the target verifies every one, so this changes
acceptance at most, never the output.

Here each GGUF tensor is matched to the graph by value: its dequantization must equal a dense constant of
the traced checkpoint bit for bit (a pulled checkpoint is that dequantization). A quantized tensor with no
such constant means the checkpoint is not this GGUF's, which is refused. This route serves the static (NPU)
draft and models whose GGUF permutes q/k rows; the stateful draft is traced without weights and takes its
tensors by name (gguf_draft.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from ..errors import MirrorDeployError
from .gguf_weights import DENSE, MAPPERS, GgufBlocks, read_blocks

_PROBE = 64   # leading values compared before a whole tensor is


def _dense_weights(model: ov.Model) -> dict[tuple[int, int], list[tuple]]:
    """(rows, cols) in the GGUF's [N, K] orientation -> [(consumer, input index, constant, transposed)]
    for every 2-D f32 constant a MatMul multiplies by or a Gather reads rows from."""
    found: dict[tuple[int, int], list[tuple]] = {}
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "MatMul":
            index, transposed = 1, not op.get_attributes().get("transpose_b")
        elif kind == "Gather":
            index, transposed = 0, False
        else:
            continue
        const = op.input_value(index).get_node()
        if const.get_type_name() != "Constant" or const.get_element_type() != ov.Type.f32:
            continue
        shape = tuple(const.get_output_shape(0))
        if len(shape) == 2:
            key = shape[::-1] if transposed else shape
            found.setdefault(key, []).append((op, index, const, transposed))
    return found


NAME_PREFIX = "gguf/"   # friendly name of each decompressed weight: gguf/<tensor name> (`check` reads them)


def decompressed(blocks: GgufBlocks) -> ov.Output:
    """f32 [N, K] from the blocks, in the CPU plugin's weight-decompression pattern."""
    n, k = blocks.codes.shape
    groups = k // blocks.block
    etype = ov.Type.u4 if blocks.bits == 4 else ov.Type.u8
    codes, scales = blocks.codes.reshape(n, groups, blocks.block), blocks.scales
    if blocks.offsets is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            zero = np.float32(blocks.center) - blocks.offsets / scales
        flat = scales == 0   # a block of one value (its offset): codes 1, zero point 0, scale = the offset
        if flat.any():
            codes, zero, scales = codes.copy(), np.where(flat, 0, zero), np.where(flat, blocks.offsets, scales)
            codes[flat] = 1
    w = ops.convert(ops.constant(codes, dtype=etype), ov.Type.f32)
    if blocks.offsets is not None:
        w = ops.subtract(w, ops.constant(zero[..., None].astype(np.float32)))
    elif blocks.center:
        w = ops.subtract(w, ops.convert(ops.constant(np.uint8(blocks.center), dtype=etype), ov.Type.f32))
    w = ops.multiply(w, ops.constant(scales[..., None].astype(np.float32)))
    w = ops.reshape(w, ops.constant(np.int64([n, k])), False)
    w.set_friendly_name(NAME_PREFIX + blocks.gguf_type)   # renamed to the tensor by the caller
    return w.output(0)


def _matches(const, transposed: bool, dense: np.ndarray) -> bool:
    data = const.get_data()
    data = data.T if transposed else data
    return np.array_equal(data[0, :_PROBE], dense[0, :_PROBE]) and np.array_equal(data, dense)


def rewire(op, index: int, transposed: bool, weight: ov.Output) -> None:
    if op.get_type_name() == "MatMul" and transposed:   # the decompressed weight is [N, K]: multiply by its ᵀ
        attrs = op.get_attributes()
        new = ops.matmul(op.input_value(0), weight, attrs.get("transpose_a", False), True)
        new.set_friendly_name(op.get_friendly_name())
        for target in list(op.output(0).get_target_inputs()):
            target.replace_source_output(new.output(0))
        return
    op.input(index).replace_source_output(weight)


def unmappable(name: str, kind: str, gguf_file: Path) -> MirrorDeployError:
    return MirrorDeployError(f"GGUF tensor {name} of {gguf_file.name} is {kind}, which has no mapping to "
                             f"OpenVINO's compressed weights here (mapped: {', '.join(MAPPERS)})",
                             "re-quantize the draft to Q4_K_M / Q8_0 with llama-quantize, or export with "
                             "--draft-weights int4")


def keep_gguf_blocks(model: ov.Model, gguf_file: Path) -> ov.Model:
    """Swap each dense weight of `model` that a quantized tensor of `gguf_file` dequantizes to for that
    tensor's blocks. Edits `model` in place and returns it."""
    from gguf import GGUFReader

    from .gguf_model import _read
    weights = _dense_weights(model)
    used = set()
    for tensor in GGUFReader(gguf_file).tensors:
        kind = tensor.tensor_type.name
        if kind in DENSE or len(tensor.shape) != 2:
            continue
        if kind not in MAPPERS:
            raise unmappable(tensor.name, kind, gguf_file)
        n, k = (int(d) for d in reversed(tensor.shape))
        blocks = read_blocks(_read(gguf_file, tensor), kind, (n, k), tensor.name)
        dense = blocks.dequantize()
        hits = [w for w in weights.get((n, k), []) if id(w[2]) not in used and _matches(w[2], w[3], dense)]
        if not hits:
            raise MirrorDeployError(f"the draft graph holds no weight equal to {tensor.name} of {gguf_file.name}: "
                                    "its checkpoint is not this GGUF's dequantization",
                                    "export the draft from the .gguf file itself or from the folder `mirror-deploy "
                                    "models pull` made of it")
        weight = decompressed(blocks)
        weight.get_node().set_friendly_name(NAME_PREFIX + tensor.name)
        for op, index, const, transposed in hits:   # a tied table and head share one constant
            used.add(id(const))
            rewire(op, index, transposed, weight)
    model.validate_nodes_and_infer_types()
    return model


def graph_gguf_weights(xml: Path) -> dict[str, np.ndarray]:
    """GGUF tensor name -> the weight an OpenVINO draft computes from its kept blocks (evaluated by
    OpenVINO itself, in f32), for `check`."""
    core = ov.Core()
    model = core.read_model(str(xml))
    nodes = [op for op in model.get_ops() if op.get_friendly_name().startswith(NAME_PREFIX)]
    if not nodes:
        return {}
    weights = ov.Model([n.output(0) for n in nodes], [], "gguf-weights")
    compiled = core.compile_model(weights, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    values = compiled.create_infer_request().infer({})
    return {n.get_friendly_name()[len(NAME_PREFIX):]: values[compiled.outputs[i]] for i, n in enumerate(nodes)}
