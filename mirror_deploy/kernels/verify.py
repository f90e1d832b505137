"""Is the built kernel right? Its op against the float product of the weights it was given (the dequantized
codes), on random weights: a wrong build (a bad flag, a broken scale) fails here before any graph uses it."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from . import layout
from .graph import matmuls_model
from .library import load_into

# int8 activations per group of 128 put the product within about 1% of its float value (measured 0.5-1.0%
# of the largest output on random weights); a wrong scale, layout or nibble order lands far outside.
TOLERANCE = 0.03


def compile_matmuls(weights: list[layout.Q4Weights], threads: int = 1, extra_flags: str = ""):
    """An OpenVINO CPU request running one Q4MatMul per weight (inputs x<K>, outputs y<i>)."""
    import onnx
    import openvino as ov

    core = ov.Core()
    load_into(core, extra_flags)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q4.onnx"
        onnx.save(matmuls_model(weights), str(path))
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                          "INFERENCE_PRECISION_HINT": "f32"})
    return compiled.create_infer_request()


def relative_error(extra_flags: str = "", seed: int = 0) -> float:
    """Largest |kernel - float product| over the largest |float product|, 5 rows, two shapes."""
    rng = np.random.default_rng(seed)
    packed, floats = [], []
    for n, k in ((96, 384), (32, 256)):
        codes, scale, minimum = layout.quantize(rng.standard_normal((n, k)).astype(np.float32), 128)
        packed.append(layout.pack(codes, scale, minimum, 128))
        floats.append(layout.dequantize(codes, scale, minimum, 128))
    request = compile_matmuls(packed, extra_flags=extra_flags)
    x = {k: rng.standard_normal((5, k)).astype(np.float32) for k in (384, 256)}
    out = list(request.infer({f"x{k}": v for k, v in x.items()}).values())
    worst = 0.0
    for y, w in zip(out, floats):
        want = x[w.shape[1]] @ w.T
        worst = max(worst, float(np.abs(y - want).max() / np.abs(want).max()))
    return worst
