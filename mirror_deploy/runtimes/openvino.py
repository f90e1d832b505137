"""OpenVINO backend: explicit device (no AUTO), f32 on CPU for parity (compute and K/V state), one unpinned
thread when the machine is shared, static reshape for NPU-shaped graphs, stateful graphs (K/V held as
model state), and a compile cache."""
from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import openvino as ov

from ..errors import MirrorDeployError
from .base import CallTimer, only_known


@lru_cache(maxsize=1)
def core() -> ov.Core:
    return ov.Core()


KERNEL_OP = "Q4MatMul"   # mirror-deploy's 4-bit kernel (kernels/): an IR holding it needs the extension loaded


def needs_kernel(xml: Path) -> bool:
    with open(xml, encoding="utf-8") as f:
        return f'type="{KERNEL_OP}"' in f.read()


@lru_cache(maxsize=1)
def load_kernel():
    """Load our kernel's extension into the shared Core once; refused with the fix where it is unusable."""
    from ..kernels.library import load_into
    return load_into(core())


def available_devices() -> list[str]:
    return list(core().available_devices)


def require_device(device: str) -> str:
    if device.split(":")[0].upper() in ("AUTO", "MULTI", "HETERO"):
        raise MirrorDeployError(f"OpenVINO device {device!r} may silently run on another device",
                                "name one device: NPU, GPU or CPU")
    devices = available_devices()
    if device.upper() not in [d.upper() for d in devices]:
        raise MirrorDeployError(f"OpenVINO device {device!r} is not present on this machine",
                                f"present devices: {', '.join(devices)}; pick a profile that uses them "
                                "(see `mirror-deploy devices`)")
    return device.upper()


def compile_config(device: str, threads: int | None, precision: str | None,
                   cache_dir: Path | None, int8_activations: bool = False, pinning: bool | None = None) -> dict:
    config: dict = {}
    if device == "CPU":
        # Activations quantized to int8 (groups of 32) in front of int4/int8 weights: about 2x on a
        # draft call of 8 rows here. Only for graphs whose numerics change speed, never the output (the
        # draft); everything else stays exact, whatever the plugin's default.
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = "32" if int8_activations else "0"
        config["INFERENCE_PRECISION_HINT"] = precision or "f32"  # bf16 default flips top-k ids
        if config["INFERENCE_PRECISION_HINT"] == "f32":
            config["KV_CACHE_PRECISION"] = "f32"   # the state's default here is u8: drift, and slower
        config["NUM_STREAMS"] = "1"
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        if threads or pinning is not None:   # pinned OpenVINO threads serialise with ORT's
            config["ENABLE_CPU_PINNING"] = "YES" if pinning else "NO"
    elif precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    return config


def reshape_static(model: ov.Model, shapes: dict[str, list[int]]) -> ov.Model:
    """Pin every input to a fixed shape (NPUs compile static graphs only)."""
    present = {n for port in model.inputs for n in port.get_names()}
    model.reshape({name: ov.PartialShape(dims) for name, dims in shapes.items() if name in present})
    return model


def port_name(port) -> str:
    """The graph-level name of a port: a reshaped, saved IR also carries internal names like
    '/layers.0/self_attn/Slice_4_output_0' on the same port, and get_any_name() may pick those."""
    names = sorted(port.get_names())
    public = [n for n in names if not n.startswith("/")]
    return (public or names)[0]


FUSED_ATTENTION = "ScaledDotProductAttention"


def runtime_layer_types(compiled: ov.CompiledModel) -> list[str]:
    """The layer type of every node the plugin really runs (after its own fusions)."""
    return [str(op.get_rt_info()["layerType"].astype(str)) for op in compiled.get_runtime_model().get_ops()]


class OvGraph:
    def __init__(self, path: Path, name: str, device: str = "CPU", threads: int | None = 1,
                 precision: str | None = None, static_shapes: dict[str, list[int]] | None = None,
                 static_dims: dict[str, int] | None = None, cache_dir: Path | None = None,
                 int8_activations: bool = False, pinning: bool | None = None):
        device = require_device(device)
        self.kernel = Path(path).suffix == ".xml" and needs_kernel(path)   # runs our 4-bit kernel
        if self.kernel:
            if device != "CPU":
                raise MirrorDeployError(f"{name} runs mirror-deploy's 4-bit kernel, a CPU op; this profile runs it on "
                                        f"{device}", "re-export naming this profile too (e.g. --profile intel-sim "
                                        "--profile intel-npu): the int4 target then uses OpenVINO's own kernel, "
                                        "which serves both devices")
            load_kernel()
        model = core().read_model(str(path))
        if static_shapes:
            reshape_static(model, static_shapes)
        self.compiled = core().compile_model(model, device, compile_config(device, threads, precision, cache_dir,
                                                                               int8_activations, pinning))
        self.request = self.compiled.create_infer_request()
        self.name = name
        self.device = device
        # Static artifacts are pinned at export (static_shapes=None here); their dims must still reach
        # the caller, which pads every call to them.
        self.static_dims = static_dims
        self.input_names = tuple(port_name(i) for i in self.compiled.inputs)
        self.output_names = tuple(port_name(o) for o in self.compiled.outputs)
        self.stateful = bool(self.request.query_state())   # K/V live in the request, not in the feeds
        self.timer = CallTimer()

    @property
    def fused_attention(self) -> int:
        """How many ScaledDotProductAttention nodes the compiled model runs. The fusion is internal to
        OpenVINO's CPU plugin (a version can lose it silently), so `check` reports this number."""
        return runtime_layer_types(self.compiled).count(FUSED_ATTENTION)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        # start_async/wait keeps the GIL free while the device works (a plain infer() beside a busy
        # Python thread was 10x slower here); outputs are copied because the request reuses them.
        self.request.start_async(only_known(feeds, self.input_names), share_inputs=True)
        self.request.wait()
        outputs = {n: self.request.get_output_tensor(i).data.copy() for i, n in enumerate(self.output_names)}
        self.timer.record(start)
        return outputs
