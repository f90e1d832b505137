"""Speculative streams compiled into an OpenVINO draft graph (tuning/streams.py trains them).

The block is added after the head, in the graph, so one call returns the draft's own token and S more:
    y1 = top_ids[..., 0]                       (the draft's own greedy token, already in the graph)
    z_j = z_(j-1) + SiLU([z_(j-1) ; E[y_j]] @ W_in) @ W_out,   z_0 = the head's input
    stream j's logits = the head applied to z_j (the same weight chain: a cut head stays cut, u8/u4 stay)
and three outputs beside the draft's: stream_logits [1, rows, S, V], stream_top_ids / stream_top_probs
[1, rows, S, m] (ids mapped back to the vocabulary, as the draft's own are). E is the draft's embedding,
read by a second Gather on the same (decompressed) table, so nothing is copied. Every output row gets
its streams, so Mirror's tree-masked branch calls get them per branch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from ..errors import MirrorDeployError
from ..runtimes.openvino import port_name
from .vocab_cut import _head_matmul, _result

STREAM_OUTPUTS = ("stream_logits", "stream_top_ids", "stream_top_probs")


def _embedding_table(model: ov.Model):
    """The (decompressed) embedding table the draft's input_ids Gather reads."""
    for param in model.get_parameters():
        if port_name(param.output(0)) != "input_ids" and param.get_friendly_name() != "input_ids":
            continue
        for target in param.output(0).get_target_inputs():
            node = target.get_node()
            if node.get_type_name() == "Gather" and target.get_index() == 1:
                return node.input_value(0)
    raise MirrorDeployError("the draft graph has no embedding Gather on input_ids, so streams cannot be added",
                            "re-export the artifact with this mirror-deploy")


def _named(output, name: str):
    output.get_tensor().set_names({name})
    return output


def add_streams(model: ov.Model, w_in: np.ndarray, w_out: np.ndarray, streams: int,
                vocab_ids: np.ndarray | None) -> ov.Model:
    """Add `streams` stream positions to a draft graph (in place); `vocab_ids` maps a cut head's columns."""
    if streams < 1:
        raise MirrorDeployError(f"{streams} streams asked for", "ask for at least one")
    if any(port_name(o) in STREAM_OUTPUTS for o in model.outputs):
        raise MirrorDeployError("the draft graph already has streams", "add them to the plain draft graph")
    matmul = _head_matmul(model)
    z = matmul.input_value(0)
    weight = matmul.input_value(1)
    transpose_b = bool(matmul.get_attributes().get("transpose_b"))
    table = _embedding_table(model)
    top_ids = _result(model, "top_ids").input_value(0)
    m = top_ids.get_partial_shape()[-1].get_length()
    ids_map = None if vocab_ids is None else ops.constant(np.asarray(vocab_ids, np.int64))
    w_in_c, w_out_c = ops.constant(w_in.astype(np.float32)), ops.constant(w_out.astype(np.float32))
    axis0, last = ops.constant(np.int64(0)), ops.constant(np.int64(2))
    token = ops.gather(top_ids, ops.constant(np.int64(0)), last)          # [1, rows]: y1
    logits_out, ids_out, probs_out = [], [], []
    for _ in range(streams):
        e = ops.gather(table, token, axis0)                                    # [1, rows, d]
        x = ops.concat([z, e.output(0)], -1)
        z = ops.add(z, ops.matmul(ops.swish(ops.matmul(x, w_in_c, False, False)), w_out_c, False, False)).output(0)
        logits = ops.matmul(z, weight, False, transpose_b)
        top = ops.topk(ops.softmax(logits, -1), m, -1, "max", "value", "i64")
        ids = top.output(1) if ids_map is None else ops.gather(ids_map, top.output(1), axis0).output(0)
        token = ops.gather(ids, ops.constant(np.int64(0)), last).output(0)
        logits_out.append(ops.unsqueeze(logits, last))
        ids_out.append(ops.unsqueeze(ids, last))
        probs_out.append(ops.unsqueeze(top.output(0), last))
    outputs = []
    for name, parts in zip(STREAM_OUTPUTS, (logits_out, ids_out, probs_out)):
        joined = parts[0] if len(parts) == 1 else ops.concat(parts, 2)
        outputs.append(_named(joined.output(0), name))
    model.add_outputs(outputs)
    model.validate_nodes_and_infer_types()
    return model


def streams_draft_ir(xml_in: Path, xml_out: Path, w_in: np.ndarray, w_out: np.ndarray, streams: int,
                     vocab_ids: np.ndarray | None) -> Path:
    """Read a draft IR, add streams, and save it under a new name (the .bin beside it)."""
    model = ov.Core().read_model(str(xml_in))
    ov.save_model(add_streams(model, w_in, w_out, streams, vocab_ids), str(xml_out), compress_to_fp16=False)
    return xml_out
