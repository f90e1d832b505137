"""Draft ONNX -> OpenVINO IR: optional NNCF weight compression, the stateful variant (K/V as model
state, where OpenVINO's CPU plugin fuses attention), and the static variant NPUs compile."""
from __future__ import annotations

from pathlib import Path

import openvino as ov

from ..errors import MirrorDeployError
from ..runtimes.openvino import port_name, reshape_static

WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4")


def compress(model: ov.Model, weights: str) -> ov.Model:
    if weights in ("fp32", "fp16"):
        return model
    try:
        import nncf
    except ImportError:
        raise MirrorDeployError(f"--draft-weights {weights} needs NNCF, which is not installed",
                                "pip install 'mirror-deploy[compress]' (nncf), or use --draft-weights fp32") from None
    if weights == "int8":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    # int4 everywhere: the draft's numerics change speed only, never the committed output.
    try:
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=128, ratio=1.0)
    except nncf.errors.InvalidGroupSizeError:
        raise MirrorDeployError("--draft-weights int4 quantizes in groups of 128 input channels, and this draft "
                                "has layers narrower than that", "use --draft-weights int8 (or fp16)") from None


def convert_draft(onnx_path: Path, xml_path: Path, weights: str,
                  static_shapes: dict[str, list[int]] | None = None) -> Path:
    model = ov.convert_model(str(onnx_path))
    if static_shapes:
        reshape_static(model, static_shapes)
    model = compress(model, weights)
    ov.save_model(model, str(xml_path), compress_to_fp16=(weights == "fp16"))
    return xml_path


def make_stateful_draft(model: ov.Model) -> ov.Model:
    """Hide the head-major past_* inputs and present_* outputs as ReadValue/Assign state (optimum-intel's
    passes, as its own OpenVINO exports use them). Batch and kv dims are pinned first (else the state
    starts with batch 0), and the beam_idx Gather that `fuse_cache_reorder` inserts is kept: without it
    the CPU plugin did not fuse ScaledDotProductAttention here (measured, OpenVINO 2026.4)."""
    from optimum.exporters.openvino.stateful import fuse_cache_reorder, make_stateful

    names = [port_name(p) for p in model.inputs]
    pinned = {}
    for port, name in zip(model.inputs, names):
        dims = port.get_partial_shape()
        if name.startswith("past_"):
            dims = ov.PartialShape([1, dims[1], -1, dims[3]])
        elif len(dims) > 1:
            dims = ov.PartialShape([1, *dims[1:]])
        pinned[name] = dims
    model.reshape(pinned)
    past = [n for n in names if n.startswith("past_")]
    present = [port_name(p) for p in model.outputs if port_name(p).startswith("present_")]
    if len(past) != len(present) or not past:
        raise RuntimeError(f"stateful draft: {len(past)} past inputs but {len(present)} present outputs")
    others = [p for p, n in zip(model.inputs, names) if not n.startswith("past_")]
    fuse_cache_reorder(model, others, past, gather_dim=0)
    make_stateful(model, others, past, present, batch_dim=0)
    return model


def convert_stateful_draft(onnx_path: Path, xml_path: Path, weights: str) -> Path:
    model = make_stateful_draft(ov.convert_model(str(onnx_path)))
    model = compress(model, weights)
    ov.save_model(model, str(xml_path), compress_to_fp16=(weights == "fp16"))
    return xml_path


def ir_io(xml_path: Path) -> tuple[list[dict], list[dict]]:
    model = ov.Core().read_model(str(xml_path))

    def describe(port):
        dims = [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]
        return {"name": port.get_any_name(), "dtype": port.get_element_type().to_dtype().name, "shape": dims}

    return [describe(p) for p in model.inputs], [describe(p) for p in model.outputs]
