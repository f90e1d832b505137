"""A draft whose LM head scores only its V most frequent tokens (FR-Spec, arXiv 2502.14856), cut into an
already-compiled OpenVINO draft graph.

The 0.5B draft's head is 151,936 × 896 weights, about 40% of the bytes a 4-bit draft call reads, while text
uses a few tens of thousands of tokens. The cut keeps the head rows of `ids` (frequency order) in every
constant of the head's weight chain (the u8/u4 weights, zero points and scales NNCF writes, or plain fp
weights), so the compressed format stays as it was; the embedding, a separate constant, keeps the whole
vocabulary (the draft must read any committed token). The graph's `top_ids` are mapped back to vocabulary
ids by a Gather in the graph, so the runtime never scans a full-vocabulary row; `logits` has V columns,
in the order of `ids`.

Only proposals change: the target verifies every token, so a token outside V lowers acceptance, never
the output (decoding/draft.py expands a sampled row to the whole vocabulary with zeros outside V).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from ..errors import MirrorDeployError
from ..runtimes.openvino import port_name

# Element types whose constants can be row-gathered as numpy arrays (sub-byte u4/i4 pack two per byte).
_GATHERABLE = {ov.Type.u8, ov.Type.i8, ov.Type.f16, ov.Type.f32, ov.Type.bf16}


def _result(model: ov.Model, name: str):
    for port in model.outputs:
        if port_name(port) == name:
            return port.get_node()
    raise MirrorDeployError(f"the draft graph has no {name!r} output", "re-export the artifact")


def _head_matmul(model: ov.Model):
    node = _result(model, "logits").input_value(0).get_node()
    while node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    if node.get_type_name() != "MatMul":
        raise MirrorDeployError(f"the draft's logits come from a {node.get_type_name()}, not the head's MatMul",
                                "re-export the artifact with this mirror-deploy")
    return node


def _cut_constant(const, axis: int, rows: np.ndarray, width: int):
    """A copy of `const` keeping `rows` along `axis` (where that axis is the vocabulary), or None."""
    shape = list(const.get_output_shape(0))
    if len(shape) <= axis or shape[axis] != width:
        return None
    if const.get_element_type() not in _GATHERABLE:
        raise MirrorDeployError(f"the draft head is stored as {const.get_element_type()}, which the vocabulary "
                                "cut cannot slice", "export the draft with --draft-weights int8 or int4 "
                                "(its head stays 8-bit) or fp32/fp16")
    return ops.constant(np.take(const.get_data(), rows, axis=axis), dtype=const.get_element_type())


def _cut_shape(const, axis: int, width: int, keep: int):
    """A Reshape target that names the vocabulary width at `axis`, rewritten to `keep`."""
    data = np.array(const.get_data())
    if data.ndim != 1 or len(data) <= axis or data[axis] != width:
        return None
    data[axis] = keep
    return ops.constant(data, dtype=const.get_element_type())


def _cut_chain(node, axis: int, rows: np.ndarray, width: int, seen: set) -> int:
    """Rewire every constant of `node`'s weight chain to its kept rows; returns how many were cut."""
    cut = 0
    for index, value in enumerate(node.input_values()):
        source = value.get_node()
        if source.get_type_name() == "Constant":
            shape_input = node.get_type_name() == "Reshape" and index == 1
            new = (_cut_shape(source, axis, width, len(rows)) if shape_input
                   else _cut_constant(source, axis, rows, width))
            if new is not None:
                node.input(index).replace_source_output(new.output(0))
                cut += 1
            continue
        if id(source) in seen:
            continue
        if len(value.get_target_inputs()) != 1:
            raise MirrorDeployError("the draft's head shares its weight chain with another part of the graph "
                                    f"({source.get_friendly_name()}), so it cannot be cut alone",
                                    "leave the draft's vocabulary whole (--draft-vocab full)")
        seen.add(id(source))
        cut += _cut_chain(source, axis, rows, width, seen)
    return cut


def cut_head(model: ov.Model, rows: np.ndarray, ids: np.ndarray) -> ov.Model:
    """Keep head rows `rows` of `model` (positions in its current logits); `ids` are their vocabulary
    ids, which the graph's top_ids now return. Edits `model` in place and returns it."""
    matmul = _head_matmul(model)
    width = matmul.get_output_partial_shape(0)[-1].get_length()
    rows = np.asarray(rows, np.int64)
    if rows.ndim != 1 or not len(rows) or rows.min() < 0 or rows.max() >= width:
        raise MirrorDeployError(f"vocabulary cut rows must index the head's {width} rows", "pass a ranked id list")
    weight = matmul.input_value(1).get_node()
    axis = 0 if matmul.get_attributes().get("transpose_b") else len(matmul.get_input_shape(1)) - 1
    if weight.get_type_name() == "Constant":
        cut = _cut_constant(weight, axis, rows, width)
        matmul.input(1).replace_source_output(cut.output(0))
    elif len(matmul.input_value(1).get_target_inputs()) != 1 or not _cut_chain(weight, axis, rows, width, set()):
        raise MirrorDeployError("the draft head's weights are not a constant chain the cut can slice",
                                "leave the draft's vocabulary whole (--draft-vocab full)")
    top = _result(model, "top_ids")
    source = top.input_value(0)
    mapped = ops.gather(ops.constant(np.asarray(ids, np.int64)), source, ops.constant(np.int64(0)))
    names = source.get_names()
    source.get_tensor().set_names(set())
    mapped.output(0).get_tensor().set_names(names)
    top.input(0).replace_source_output(mapped.output(0))
    model.validate_nodes_and_infer_types()
    return model


def cut_draft_ir(xml_in: Path, xml_out: Path, rows: np.ndarray, ids: np.ndarray) -> Path:
    """Read an artifact's draft IR, cut its head, and save it under a new name (the .bin beside it)."""
    model = ov.Core().read_model(str(xml_in))
    ov.save_model(cut_head(model, rows, ids), str(xml_out), compress_to_fp16=False)
    return xml_out


def head_width(xml: Path) -> int:
    """Columns of the draft graph's logits: the vocabulary, or V after a cut."""
    model = ov.Core().read_model(str(xml))
    return _head_matmul(model).get_output_partial_shape(0)[-1].get_length()
