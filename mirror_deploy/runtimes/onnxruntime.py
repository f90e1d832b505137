"""ONNX Runtime backend: provider preference per profile, explicit thread counts, no silent fallback."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import MirrorDeployError
from .base import CallTimer, only_known

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "directml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
}


def provider_for(device: str) -> str:
    try:
        return PROVIDERS[device.lower()]
    except KeyError:
        raise MirrorDeployError(f"unknown ONNX Runtime device {device!r}",
                                f"use one of: {', '.join(PROVIDERS)}") from None


def require_provider(device: str) -> str:
    provider = provider_for(device)
    available = ort.get_available_providers()
    if provider not in available:
        raise MirrorDeployError(
            f"ONNX Runtime device {device!r} ({provider}) is not available on this machine",
            f"available providers: {', '.join(available)}; pick a profile that uses them "
            "(see `mirror-deploy devices`)")
    return provider


class OrtGraph:
    def __init__(self, path: Path, name: str, device: str = "cpu", threads: int = 1, spinning: bool | None = None):
        provider = require_provider(device)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle workers spinning for work steal the core another runtime (or the draft, next) needs:
        # off for one thread unless asked; with all cores, the profile decides (None: ORT's default, on).
        spin = threads != 1 if spinning is None else spinning
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        if self.session.get_providers()[0] != provider:  # ORT falls back quietly when a provider fails
            raise MirrorDeployError(f"{name}: ONNX Runtime could not start {provider}",
                                    "check the accelerator's driver, or choose a profile without it")
        self.name = name
        self.device = device
        self.static_dims = None
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self.timer = CallTimer()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        outputs = self.session.run(None, only_known(feeds, self.input_names))
        self.timer.record(start)
        return dict(zip(self.output_names, outputs))
