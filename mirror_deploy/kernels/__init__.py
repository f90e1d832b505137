"""mirror-deploy's own 4-bit matrix kernel (src/, one file per instruction set), loaded by OpenVINO as
the op `mirror_deploy::Q4MatMul`. The orchestrator stays pure Python: the kernel is part of the runtime
that loads it, never called from the decoding loop.

build.py compiles it against the installed openvino wheel with the distro's g++ and cmake (the README's
set-up runs it); this module finds the built library, checks it and says which path runs and why."""
from __future__ import annotations

from .library import KernelStatus, load_into, status

__all__ = ["KernelStatus", "load_into", "status"]
