"""What this machine can run: OpenVINO devices, ONNX Runtime providers, and which built-in profiles fit.

Fitness is decided by the same `require_device` / `require_provider` the runtimes call when they open a
graph, so `mirror-deploy devices` and a real run can never disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnxruntime as ort

from ..errors import MirrorDeployError
from ..targets import PartProfile, Profile, builtin_profiles, load_profile
from .onnxruntime import require_provider
from .openvino import available_devices, core, require_device


@dataclass(frozen=True)
class ProfileFit:
    profile: Profile
    missing: tuple[str, ...]      # "role: backend device" for each part whose device is absent

    @property
    def runs_here(self) -> bool:
        return not self.missing


def openvino_devices() -> list[tuple[str, str]]:
    """(device, FULL_DEVICE_NAME) for each device OpenVINO can compile for here."""
    return [(d, str(core().get_property(d, "FULL_DEVICE_NAME"))) for d in available_devices()]


def onnxruntime_providers() -> list[str]:
    return list(ort.get_available_providers())


def runs_here(part: PartProfile) -> bool:
    try:
        if part.backend == "onnxruntime":
            require_provider(part.device)
        else:
            require_device(part.device)
    except MirrorDeployError:
        return False
    return True


def profile_fit(profile: Profile) -> ProfileFit:
    parts = (("target", profile.target), ("draft", profile.draft))
    return ProfileFit(profile, tuple(f"{role}: {p.backend} {p.device}" for role, p in parts if not runs_here(p)))


def builtin_fits() -> list[ProfileFit]:
    return [profile_fit(load_profile(name)) for name in builtin_profiles()]


def print_devices(console) -> None:
    from rich.table import Table

    table = Table(title="devices on this machine")
    for col in ("runtime", "device", "name"):
        table.add_column(col)
    for device, full_name in openvino_devices():
        table.add_row("openvino", device, full_name)
    for provider in onnxruntime_providers():
        table.add_row("onnxruntime", provider, "")
    from ..kernels import status
    table.add_row("4-bit kernel", "CPU", status().summary())
    console.print(table)
    fits = Table(title="built-in profiles")
    for col in ("profile", "target", "draft", "runs here", "missing"):
        fits.add_column(col)
    for fit in builtin_fits():
        p = fit.profile
        fits.add_row(p.name, f"{p.target.backend} {p.target.device}", f"{p.draft.backend} {p.draft.device}"
                     + (" (static)" if p.draft.static else ""),
                     "[green]yes[/]" if fit.runs_here else "[red]no[/]", "; ".join(fit.missing))
    console.print(fits)
