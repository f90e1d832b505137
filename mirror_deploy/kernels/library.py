"""Find the built kernel, check it (sha256 against its stamp, ABI, a path for this CPU) and load it into an
OpenVINO Core. Where it is absent or unusable, `status()` says why and the stock kernels run; a graph
that needs it is refused with the fix (`load_into`), never run another way."""
from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import MirrorDeployError
from .build import ABI, LIBRARY, build_dir, sha256_file

FIX = "run: python -m mirror_deploy.kernels build --force (needs g++ and cmake); the stock kernels run meanwhile"


@dataclass(frozen=True)
class KernelStatus:
    available: bool
    path: Path | None
    isa: str            # avx512vnni | avx2 | none
    why: str            # why this path (or why none)

    def summary(self) -> str:
        if self.available:
            return f"ours ({self.isa}: {self.why}) at {self.path}"
        return f"stock (ours not loaded: {self.why})"


def _probe(path: Path) -> KernelStatus:
    stamp = path.parent / "stamp.json"
    if not path.is_file() or not stamp.is_file():
        return KernelStatus(False, None, "none", "not built")
    meta = json.loads(stamp.read_text())
    if meta.get("abi") != ABI:
        return KernelStatus(False, path, "none", f"built for kernel ABI {meta.get('abi')}, this package needs {ABI}")
    if sha256_file(path) != meta.get("sha256"):
        return KernelStatus(False, path, "none", f"{path} does not match the sha256 it was built with (altered "
                            "or corrupted)")
    try:
        lib = ctypes.CDLL(str(path))
        lib.mirror_q4_isa.restype = lib.mirror_q4_why.restype = ctypes.c_char_p
        abi, isa, why = lib.mirror_q4_abi(), lib.mirror_q4_isa().decode(), lib.mirror_q4_why().decode()
    except (OSError, AttributeError) as error:
        return KernelStatus(False, path, "none", f"{path} does not load: {error}")
    if abi != ABI:
        return KernelStatus(False, path, "none", f"{path} reports kernel ABI {abi}, this package needs {ABI}")
    return KernelStatus(isa != "none", path, isa, why)


def status(extra_flags: str = "") -> KernelStatus:
    """What `devices` and `run --stats` report. The ISA is chosen once per process (MIRROR_DEPLOY_Q4_ISA=avx2
    forces the narrower path)."""
    return _probe(build_dir(extra_flags) / LIBRARY)


def load_into(core, extra_flags: str = "") -> KernelStatus:
    """Add the kernel's op to `core`; an absent or unusable kernel is an error naming why and the fix."""
    s = status(extra_flags)
    if not s.available:
        raise MirrorDeployError(f"this graph runs mirror-deploy's 4-bit kernel, which is not usable here: {s.why}",
                                FIX)
    core.add_extension(str(s.path))
    return s
