"""Device profiles: data files that say where each part runs and how (one .toml per profile).

A part is `target` (its segments and heads) or `draft`. Per part: backend (onnxruntime | openvino), device,
threads (0 = the runtime's default: every core), precision, `static` (NPU-style fixed shapes: fixed window,
branch batch and KV capacity), and two CPU placement switches: `spinning` (ONNX Runtime's idle workers
spin, waiting for work) and `pinning` (OpenVINO pins its threads to cores). Left unset, both are off for a
part with a fixed thread count (its threads must leave the other part's core alone) and the runtime's
default otherwise.
"""
from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import MirrorDeployError

PROFILE_DIR = Path(__file__).parent
BACKENDS = ("onnxruntime", "openvino")
DEFAULT_PROFILE = "cpu-sim"


@dataclass(frozen=True)
class PartProfile:
    backend: str
    device: str
    threads: int | None = 1
    precision: str | None = None
    static: bool = False
    spinning: bool | None = None      # onnxruntime: session.intra_op.allow_spinning
    pinning: bool | None = None       # openvino CPU: ENABLE_CPU_PINNING
    # Prefill the prompt as a two-stage pipeline over the target's segments (two threads). Off by default:
    # on the 2-vCPU cpu-sim machine it measured 0.76x sequential (compute-bound prefill gains nothing from
    # a second vCPU there); turn it on where the target's device has idle cores.
    prefill_pipeline: bool = False

    def problems(self, role: str) -> list[str]:
        out = []
        if self.backend not in BACKENDS:
            out.append(f"{role}.backend {self.backend!r} is unknown (use one of: {', '.join(BACKENDS)})")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 0):
            out.append(f"{role}.threads = {self.threads!r} is not a thread count "
                       "(use a whole number ≥ 1, or 0 for the runtime's default: every core)")
        for key in ("static", "prefill_pipeline", "spinning", "pinning"):
            value = getattr(self, key)
            if not (isinstance(value, bool) or (value is None and key in ("spinning", "pinning"))):
                out.append(f"{role}.{key} = {value!r} is not true or false")
        for key, backend in (("spinning", "onnxruntime"), ("pinning", "openvino")):
            if getattr(self, key) is not None and self.backend != backend:   # else it would be ignored
                out.append(f"{role}.{key} applies to the {backend} backend only, this part is {self.backend}")
        return out


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    target: PartProfile
    draft: PartProfile
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("source")
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "") -> "Profile":
        try:
            parts = {p: PartProfile(**_current_keys(data[p])) for p in ("target", "draft")}
            profile = cls(name=data["name"], description=data.get("description", ""), source=source, **parts)
        except (KeyError, TypeError) as err:
            raise MirrorDeployError(f"profile {source or data.get('name')} is malformed ({err})",
                                    "see mirror_deploy/targets/cpu-sim.toml for the expected keys") from None
        problems = profile.target.problems("target") + profile.draft.problems("draft")
        if problems:
            raise MirrorDeployError(f"profile {source or profile.name}: {'; '.join(problems)}",
                                    "fix those keys (see mirror_deploy/targets/cpu.toml)")
        return profile


# Keys older manifests carry: never read by any runtime (they were dropped), so unset ones are ignored.
RETIRED = ("prefix_threads", "suffix_threads")


def _current_keys(part: dict) -> dict:
    set_retired = [k for k in RETIRED if part.get(k) is not None]
    if set_retired:
        raise TypeError(f"{', '.join(set_retired)} is no longer supported: a part has one thread count")
    return {k: v for k, v in part.items() if k not in RETIRED}


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str) -> Profile:
    """A built-in profile by name, or a user's own .toml file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise MirrorDeployError(f"profile {name_or_path!r} not found",
                                f"use a built-in profile ({', '.join(builtin_profiles())}) or a .toml file path")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise MirrorDeployError(f"profile {path} is not valid TOML ({err})", "fix the file's syntax") from None
    return Profile.from_dict(data, source=str(path))
