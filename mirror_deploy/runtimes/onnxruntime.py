"""ONNX Runtime backend: provider preference per profile, explicit thread counts, no silent fallback."""
from __future__ import annotations

import os
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


def log_severity() -> int:
    """ONNX Runtime logs errors only (3), warnings and more with `mirror-deploy --verbose` (1)."""
    return 1 if os.environ.get("MIRROR_DEPLOY_VERBOSE") else 3


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
    def __init__(self, path: Path, name: str, device: str = "cpu", threads: int = 1, spinning: bool | None = None,
                 profile_prefix: str | None = None):
        """`profile_prefix`: record ONNX Runtime's per-op profile there (bench.op_profile)."""
        provider = require_provider(device)
        opts = ort.SessionOptions()
        opts.log_severity_level = log_severity()
        if profile_prefix:
            opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle workers spinning for work steal the core another runtime (or the draft, next) needs:
        # off for one thread unless asked; with all cores, the profile decides (None: ORT's default, on).
        spin = threads != 1 if spinning is None else spinning
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        else:   # spin within a call (its many small ops), never after it: each segment is its own session,
            # and idle spinners of six sessions, or one beside the draft, took the cores (AR ran 0.5x)
            opts.add_session_config_entry("session.force_spinning_stop", "1")
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

    def run(self, feeds: dict[str, np.ndarray], in_place: dict | None = None) -> dict[str, np.ndarray]:
        """One call. `in_place` (input name -> (output name, buffer)): buffers bound as that input and
        that output through IOBinding, which the graph updates in place (fused K/V); the returned dict
        then holds only the other outputs."""
        start = time.perf_counter()
        if in_place:
            result = self._run_bound(feeds, in_place)
        else:
            result = dict(zip(self.output_names, self.session.run(None, only_known(feeds, self.input_names))))
        self.timer.record(start)
        return result

    def bind(self, feeds: dict[str, np.ndarray], in_place: dict[str, tuple[str, np.ndarray]]) -> ort.IOBinding:
        """An IOBinding with each `in_place` buffer (input name -> (output name, array)) bound as that input
        AND that output, so the graph writes into it (GQA's past/present). Other outputs: ORT allocates."""
        binding = self.session.io_binding()
        binding.kept_alive = []   # arrays ORT may read by pointer: they must outlive the binding's runs
        for name in self.input_names:
            if name in in_place:
                out, buf = in_place[name]
                if not buf.flags.c_contiguous:
                    raise ValueError(f"{self.name}: in-place buffer {name} must be contiguous")
                binding.bind_input(name, "cpu", 0, buf.dtype.type, list(buf.shape), buf.ctypes.data)
                binding.bind_output(out, "cpu", 0, buf.dtype.type, list(buf.shape), buf.ctypes.data)
            else:
                value = np.asarray(feeds[name])   # (np.ascontiguousarray would make a 0-d scalar 1-d)
                binding.kept_alive.append(value if value.flags.c_contiguous else np.ascontiguousarray(value))
                binding.bind_cpu_input(name, binding.kept_alive[-1])
        bound = {out for out, _ in in_place.values()}
        binding.unbound = [n for n in self.output_names if n not in bound]   # ORT allocates these, in order
        for name in binding.unbound:
            binding.bind_output(name, "cpu")
        return binding

    def _run_bound(self, feeds: dict[str, np.ndarray], in_place: dict[str, tuple[str, np.ndarray]]) -> dict:
        binding = self.bind(feeds, in_place)
        self.session.run_with_iobinding(binding)
        names = binding.unbound
        # ORT returns outputs in binding order: the unbound ones were bound last, in output order.
        values = binding.get_outputs()[-len(names):] if names else []
        return {n: v.numpy() for n, v in zip(names, values)}
