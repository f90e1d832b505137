"""What every peer shares: its greedy-only guard, optional imports, the one figure all report, and the
model folders each builds once into the cache (built in a temp folder, renamed into place)."""
from __future__ import annotations

import gc
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from ...errors import MirrorDeployError
from ...models import cache_dir


def greedy_only(name: str, temperature: float) -> None:
    if temperature > 0:
        raise MirrorDeployError(f"{name} is run greedy only in the peer benchmark (got temperature={temperature})",
                                "use temperature 0 for peer methods")


def require(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise MirrorDeployError(f"{module} is not installed ({e})", "pip install -e '.[peers]'") from e


def free() -> None:
    gc.collect()  # models hold GBs; give them back before the next method loads


def per_call(n: int, target_calls: int) -> dict:
    """The one figure every method has: target forward calls, and new tokens per call (1.0 = no gain)."""
    return {"target_calls": target_calls, "tokens_per_target_call": n / target_calls if target_calls else 0.0}



# ---------------------------------------------------------------- model folders built once

def cache_entry(cache, tag: str, *model_dirs) -> Path:
    """A folder in `cache` (default <mirror-deploy cache>/peers) named for its sources and format, plus
    a hash of their full paths."""
    src = [str(Path(p).resolve()) for p in model_dirs]
    key = hashlib.sha1("|".join(src + [tag]).encode()).hexdigest()[:8]
    return Path(cache or cache_dir() / "peers") / f"{'+'.join(Path(p).name for p in src)}-{tag}-{key}"


def build_once(outs: list[Path], build) -> list[Path]:
    """Build the missing entries of `outs` with `build({index: temp folder})`, each into a temp folder
    beside it, then rename them into place: a crash never leaves a half-built entry that looks complete."""
    temps = {}
    try:
        for i, out in enumerate(outs):
            if not out.is_dir():
                out.parent.mkdir(parents=True, exist_ok=True)
                temps[i] = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        if temps:
            build(temps)
        for i, temp in temps.items():
            try:
                temp.rename(outs[i])
            except OSError:
                if not outs[i].is_dir():  # else a concurrent builder won the rename
                    raise
    finally:
        for temp in temps.values():
            shutil.rmtree(temp, ignore_errors=True)
    return outs


def run_step(cmd: list[str], what: str, env: dict | None = None) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if proc.returncode != 0:
        raise MirrorDeployError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}",
                                "rerun that step by hand to see its whole log")
