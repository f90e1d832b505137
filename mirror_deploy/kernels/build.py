"""Build the kernel library: `python -m mirror_deploy.kernels build`. The library goes into the cache under
a key of its sources, the compiler flags and the openvino version, beside a stamp with its sha256, so a
stale or altered library is never the one loaded."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import openvino

from ..errors import MirrorDeployError

SOURCE = Path(__file__).resolve().parent
LIBRARY = "libmirror_q4.so"
ABI = 1   # src/dispatch.h kAbi


def cache_root() -> Path:
    return Path(os.environ.get("MIRROR_DEPLOY_CACHE") or Path.home() / ".cache" / "mirror-deploy") / "kernels"


def build_key(extra_flags: str = "") -> str:
    digest = hashlib.sha256()
    for path in sorted([SOURCE / "CMakeLists.txt", *(SOURCE / "src").iterdir()]):
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(f"{openvino.__version__}|{extra_flags}|abi{ABI}".encode())
    return digest.hexdigest()[:16]


def build_dir(extra_flags: str = "") -> Path:
    return cache_root() / build_key(extra_flags)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(extra_flags: str = "", force: bool = False, quiet: bool = True) -> Path:
    """Compile (or reuse) the library; returns its path. `extra_flags` go to the compiler as they are
    (the tests break a build on purpose with them). Built in a temporary folder, moved into place at the end."""
    out = build_dir(extra_flags)
    if (out / "stamp.json").is_file() and not force:
        return out / LIBRARY
    for tool in ("cmake", "g++"):
        if shutil.which(tool) is None:
            raise MirrorDeployError(f"building the 4-bit kernel needs {tool}, which is not on PATH",
                                    f"install it (Debian: apt install {'cmake' if tool == 'cmake' else 'g++'}), "
                                    "then run: python -m mirror_deploy.kernels build")
    cmake_dir = Path(openvino.__file__).resolve().parent / "cmake"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        configure = ["cmake", "-S", str(SOURCE), "-B", str(tmp / "build"), f"-DOpenVINO_DIR={cmake_dir}",
                     f"-DTBB_DIR={cmake_dir}", f"-DMIRROR_Q4_EXTRA_FLAGS={extra_flags.replace(' ', ';')}"]
        for cmd in (configure, ["cmake", "--build", str(tmp / "build"), "-j2"]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise MirrorDeployError(f"building the 4-bit kernel failed ({' '.join(cmd[:2])}):\n"
                                        + (done.stdout + done.stderr)[-3000:],
                                        "the stock kernels still run; fix the compiler set-up and run: "
                                        "python -m mirror_deploy.kernels build")
        staged = tmp / "stage"
        staged.mkdir()
        shutil.copy2(tmp / "build" / LIBRARY, staged / LIBRARY)
        (staged / "stamp.json").write_text(json.dumps({"sha256": sha256_file(staged / LIBRARY), "abi": ABI,
                                                       "openvino": openvino.__version__, "flags": extra_flags}))
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(f"built {out / LIBRARY}")
    return out / LIBRARY
