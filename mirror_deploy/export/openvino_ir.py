"""Draft ONNX -> OpenVINO IR: optional NNCF weight compression, the stateful variant (K/V as model
state, where OpenVINO's CPU plugin fuses attention), and the static variant NPUs compile."""
from __future__ import annotations

from pathlib import Path

import openvino as ov

from ..errors import MirrorDeployError
from ..runtimes.openvino import port_name, reshape_static

WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4", "gguf")   # gguf: the draft's GGUF blocks, kept (openvino_gguf.py)


def compress(model: ov.Model, weights: str, flag: str = "--draft-weights", gguf: Path | None = None) -> ov.Model:
    if weights in ("fp32", "fp16"):
        return model
    if weights == "gguf":
        from .openvino_gguf import keep_gguf_blocks
        if gguf is None:
            raise MirrorDeployError(f"{flag} gguf needs the GGUF file the weights come from",
                                    "give the .gguf file, or a folder `mirror-deploy models pull` made")
        return keep_gguf_blocks(model, gguf)
    try:
        import nncf
    except ImportError:
        raise MirrorDeployError(f"{flag} {weights} needs NNCF, which is not installed",
                                f"pip install 'mirror-deploy[compress]' (nncf), or use {flag} fp32") from None
    if weights == "int8":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    # int4 everywhere (ratio 1.0), as the ONNX Runtime target's MatMulNBits int4 and optimum-cli's --sym int4.
    try:
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=128, ratio=1.0)
    except nncf.errors.InvalidGroupSizeError:
        raise MirrorDeployError(f"{flag} int4 quantizes in groups of 128 input channels, and this model "
                                "has layers narrower than that", f"use {flag} int8 (or fp16)") from None


def convert_draft(onnx_path: Path, xml_path: Path, weights: str,
                  static_shapes: dict[str, list[int]] | None = None, gguf: Path | None = None) -> Path:
    model = ov.convert_model(str(onnx_path))
    if static_shapes:
        reshape_static(model, static_shapes)
    model = compress(model, weights, gguf=gguf)
    ov.save_model(model, str(xml_path), compress_to_fp16=(weights == "fp16"))
    return xml_path


def convert_target_graph(onnx_path: Path, weights: str) -> Path:
    """A target graph for a profile whose target runs on OpenVINO: the ONNX graph as IR beside it, its weights
    compressed by NNCF (int8/int4) or stored as fp16; the ONNX file is removed. Weight-only: the runtime
    keeps activations in the profile's precision, so a window and a single step stay the same computation."""
    xml_path = onnx_path.with_suffix(".xml")
    model = compress(ov.convert_model(str(onnx_path)), weights, flag="--target-weights")
    ov.save_model(model, str(xml_path), compress_to_fp16=(weights == "fp16"))
    for f in (onnx_path, onnx_path.with_name(onnx_path.name + ".data")):
        f.unlink(missing_ok=True)
    return xml_path


def make_stateful_draft(model: ov.Model) -> ov.Model:
    """Hide the head-major past_* inputs and present_* outputs as ReadValue/Assign state (optimum-intel's
    passes, as its own OpenVINO exports use them). Batch and kv dims are pinned first (else the state
    starts with batch 0), and the beam_idx Gather that `fuse_cache_reorder` inserts is kept: without it
    the CPU plugin did not fuse ScaledDotProductAttention here (measured, OpenVINO 2026.4)."""
    from optimum.exporters.openvino.stateful import fuse_cache_reorder, make_stateful

    inputs = list(model.inputs)
    names = [port_name(p) for p in inputs]
    pinned = {}
    for port, name in zip(inputs, names):
        dims = port.get_partial_shape()
        if name.startswith("past_"):
            dims = ov.PartialShape([1, dims[1], -1, dims[3]])
        elif len(dims) > 1:
            dims = ov.PartialShape([1, *dims[1:]])
        pinned[name] = dims
    if any(port.get_partial_shape() != pinned[name] for port, name in zip(inputs, names)):
        model.reshape(pinned)   # (its smart-reshape passes also rewrite Reshape shapes: only when needed)
    past = [n for n in names if n.startswith("past_")]
    present = [port_name(p) for p in model.outputs if port_name(p).startswith("present_")]
    if len(past) != len(present) or not past:
        raise RuntimeError(f"stateful draft: {len(past)} past inputs but {len(present)} present outputs")
    others = [p for p, n in zip(inputs, names) if not n.startswith("past_")]
    fuse_cache_reorder(model, others, past, gather_dim=0)
    make_stateful(model, others, past, present, batch_dim=0)
    return model


def convert_stateful_draft(onnx_path: Path, xml_path: Path, weights: str, gguf: Path | None = None,
                           weights_in=None) -> Path:
    """`weights_in`: for a graph traced without its weights (gguf_draft.py), the function that puts them in
    (by name, from the GGUF); it runs before the inputs are made state (they are no inputs then), and no
    compression follows. `make_stateful_draft` reshapes only where a shape changes, so OpenVINO's smart
    reshape does not rewrite the decompression pattern's Reshape."""
    if weights_in is not None:
        model = make_stateful_draft(weights_in(ov.convert_model(str(onnx_path))))
    else:
        model = compress(make_stateful_draft(ov.convert_model(str(onnx_path))), weights, gguf=gguf)
    ov.save_model(model, str(xml_path), compress_to_fp16=(weights == "fp16"))
    return xml_path


def ir_io(xml_path: Path) -> tuple[list[dict], list[dict]]:
    from ..runtimes.openvino import core, load_kernel, needs_kernel
    if needs_kernel(xml_path):
        load_kernel()
    model = core().read_model(str(xml_path))

    def describe(port):
        dims = [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]
        return {"name": port.get_any_name(), "dtype": port.get_element_type().to_dtype().name, "shape": dims}

    return [describe(p) for p in model.inputs], [describe(p) for p in model.outputs]
