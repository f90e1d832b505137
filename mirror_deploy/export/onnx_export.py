"""Trace one graph module to ONNX with the axes of `shapes.graph_io`.

The TorchScript exporter is used: it expresses `past + seq` (the dynamo exporter cannot) and takes ~2 s a
graph. It may drop inputs a graph does not use (GPT-2's suffix ignores position_ids); the manifest records
the inputs the file really has, and runtimes feed only those.
"""
from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import onnx.external_data_helper
import torch

from .shapes import ModelShape, TensorSpec, dynamic_axes

# Protobuf cannot hold more than 2 GiB; above this the weights go to a side file.
_EXTERNAL_DATA_BYTES = 1 << 30


def example_inputs(inputs: list[TensorSpec], shape: ModelShape, seq: int = 3, past: int = 2) -> tuple:
    """Small tensors of the right dtypes, with past > 0 and seq > 1 so no axis is specialised away."""
    sizes = {"seq": seq, "past": past, "rows": seq, "past+seq": past + seq}
    tensors = []
    for spec in inputs:
        dims = [sizes.get(d, d) if isinstance(d, str) else d for d in spec.shape]
        if spec.name == "input_ids":
            tensors.append(torch.randint(0, shape.vocab_size, dims))
        elif spec.name == "position_ids":
            tensors.append(torch.arange(past, past + seq)[None])
        elif spec.name == "output_rows":
            tensors.append(torch.arange(seq))
        elif spec.name == "attention_mask":
            tensors.append(torch.zeros(dims))
        else:
            tensors.append(torch.randn(dims))
    return tuple(tensors)


def trace(module: torch.nn.Module, inputs, outputs, shape: ModelShape, folder: Path) -> Path:
    """Trace `module` to `folder`/graph.onnx (a large model's tensors scattered beside it, one file each)."""
    module.eval()
    raw = Path(folder) / "graph.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, example_inputs(inputs, shape), str(raw), dynamo=False, opset_version=17,
            do_constant_folding=True, input_names=[s.name for s in inputs], output_names=[s.name for s in outputs],
            dynamic_axes=dynamic_axes([*inputs, *outputs]),
        )
    return raw


def export_graph(module: torch.nn.Module, inputs, outputs, shape: ModelShape, path: Path) -> Path:
    """Export into a scratch folder (large models scatter one file per tensor), then write `path`
    as one .onnx file, plus one `.onnx.data` side file when the weights exceed protobuf's limit."""
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        raw = trace(module, inputs, outputs, shape, Path(scratch))
        scattered = len(list(Path(scratch).iterdir())) > 1
        if not scattered and raw.stat().st_size < _EXTERNAL_DATA_BYTES:
            shutil.move(raw, path)
        else:
            model = onnx.load(str(raw), load_external_data=True)
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
    return path


def graph_files(path: Path) -> list[Path]:
    """The .onnx file and its external-data side file, if any."""
    side = path.with_name(path.name + ".data")
    return [path, side] if side.exists() else [path]


def read_io(path: Path) -> tuple[list[dict], list[dict]]:
    """Names, dtypes and shapes (ints or axis names) as the ONNX file records them."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(value_info):
        t = value_info.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        return {"name": value_info.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": dims}

    initializers = {i.name for i in model.graph.initializer}
    inputs = [describe(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [describe(v) for v in model.graph.output]


# Blocks of 128 for int4: MLAS's accuracy_level-4 kernel computes rows in pairs there (a lone row takes
# another path), which the runtime handles by giving every fused call an even number of rows (axes.py);
# measured 1.2x faster per step than blocks of 32, which are row-invariant outright. int8: blocks of 32.
BLOCK_SIZE = {4: 128, 8: 32}


def quantize_matmuls(path: Path, bits: int) -> None:
    """Weight-only int8/int4 (ORT MatMulNBits, symmetric, accuracy_level 4) for every MatMul with a
    constant weight, in place. accuracy_level 4 (int8 activations, VNNI kernels) is the fast one on x64:
    level 0 measured slower than fp32 (int4: 6.1 ms a layer against fp32's 9.7) and pathological for int8
    (247 ms a layer), on a 2-core Zen 4 with one thread."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    model = onnx.load(str(path), load_external_data=True)
    # Embedding lookups stay exact: only MatMuls are quantized.
    gathers = [n.name for n in model.graph.node if n.op_type == "Gather"]
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK_SIZE[bits], is_symmetric=True,
                                     accuracy_level=4, nodes_to_exclude=gathers, op_types_to_quantize=("MatMul",))
    quantizer.process()
    _save_in_place(quantizer.model.model, path)


def convert_to_fp16(path: Path) -> None:
    """fp16 weights and compute (onnxruntime's float16 converter), in place; inputs and outputs stay fp32 so
    the runtimes feed the same tensors. For GPU providers: ONNX Runtime's CPU provider runs fp16 nodes
    through inserted casts (correct, and slower than fp32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # The converter needs every tensor's type; infer them from the file (in-memory inference stops at
    # protobuf's 2 GiB, which the first segment with its embedding passes).
    typed = path.with_name(path.stem + ".typed.onnx")
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(typed))
        model = onnx.load(str(typed), load_external_data=False)
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    finally:
        typed.unlink(missing_ok=True)
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    _save_in_place(model, path)


def _save_in_place(model: onnx.ModelProto, path: Path) -> None:
    side = path.with_name(path.name + ".data")
    if side.exists():
        side.unlink()
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)  # ByteSize() fails past 2 GiB
    onnx.save_model(model, str(path), save_as_external_data=weight_bytes > _EXTERNAL_DATA_BYTES,
                    all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)
