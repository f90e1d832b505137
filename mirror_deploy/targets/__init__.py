"""Device profiles: data files that say where each part runs and how (one .toml per profile).

A part is `target` (both target graphs) or `draft`. Per part: backend (onnxruntime | openvino), device,
threads, precision, and `static` (NPU-style fixed shapes: fixed window, branch batch and KV capacity).
`prefix_threads` / `suffix_threads` may override the target's thread count per graph.
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
    prefix_threads: int | None = None
    suffix_threads: int | None = None
    # Prefill the prompt as a two-stage pipeline over the target's segments (two threads). Off by default:
    # on the 2-vCPU cpu-sim machine it measured 0.76x sequential (compute-bound prefill gains nothing from
    # a second vCPU there); turn it on where the target's device has idle cores.
    prefill_pipeline: bool = False

    def threads_for(self, graph: str) -> int | None:
        own = {"target_prefix": self.prefix_threads, "target_suffix": self.suffix_threads}.get(graph)
        return own or self.threads


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
            parts = {p: PartProfile(**data[p]) for p in ("target", "draft")}
            profile = cls(name=data["name"], description=data.get("description", ""), source=source, **parts)
        except (KeyError, TypeError) as err:
            raise MirrorDeployError(f"profile {source or data.get('name')} is malformed ({err})",
                                    "see mirror_deploy/targets/cpu-sim.toml for the expected keys") from None
        for part in (profile.target, profile.draft):
            if part.backend not in BACKENDS:
                raise MirrorDeployError(f"profile {profile.name}: unknown backend {part.backend!r}",
                                        f"use one of: {', '.join(BACKENDS)}")
        return profile


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
