"""The kernel's node in an ONNX graph (domain mirror_deploy, converted by OpenVINO's ONNX frontend once the
extension is loaded), and a one-MatMul model for tests and `bench-kernels`."""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

from .layout import Q4Weights

DOMAIN = "mirror_deploy"


def q4_node(x: str, out: str, w: Q4Weights, prefix: str) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    weights = [numpy_helper.from_array(w.codes, f"{prefix}.codes"),
               numpy_helper.from_array(w.scales, f"{prefix}.scales"),
               numpy_helper.from_array(w.mins, f"{prefix}.mins")]
    node = helper.make_node("Q4MatMul", [x, *(t.name for t in weights)], [out], name=f"{prefix}/Q4MatMul",
                            domain=DOMAIN, n=w.n, k=w.k, group=w.group)
    return node, weights


def matmuls_model(layers: list[Q4Weights]) -> onnx.ModelProto:
    """One Q4MatMul per weight, each reading the input `x<K>` of its width: a step's projections, side by side."""
    nodes, inits = [], []
    for i, w in enumerate(layers):
        node, weights = q4_node(f"x{w.k}", f"y{i}", w, f"w{i}")
        nodes.append(node)
        inits.extend(weights)
    widths = sorted({w.k for w in layers})
    graph = helper.make_graph(nodes, "q4_matmuls",
                              [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["rows", k]) for k in widths],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["rows", w.n])
                               for i, w in enumerate(layers)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
