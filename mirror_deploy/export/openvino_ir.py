"""Draft ONNX -> OpenVINO IR: optional NNCF weight compression (what NPUs run) and a static variant."""
from __future__ import annotations

from pathlib import Path

import openvino as ov

from ..errors import MirrorDeployError
from ..runtimes.openvino import reshape_static

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
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=128, ratio=1.0)


def convert_draft(onnx_path: Path, xml_path: Path, weights: str,
                  static_shapes: dict[str, list[int]] | None = None) -> Path:
    model = ov.convert_model(str(onnx_path))
    if static_shapes:
        reshape_static(model, static_shapes)
    model = compress(model, weights)
    ov.save_model(model, str(xml_path), compress_to_fp16=(weights == "fp16"))
    return xml_path


def ir_io(xml_path: Path) -> tuple[list[dict], list[dict]]:
    model = ov.Core().read_model(str(xml_path))

    def describe(port):
        dims = [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]
        return {"name": port.get_any_name(), "dtype": port.get_element_type().to_dtype().name, "shape": dims}

    return [describe(p) for p in model.inputs], [describe(p) for p in model.outputs]
