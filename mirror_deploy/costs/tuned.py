"""`tuning.json` inside an artifact, read back: verified against the manifest's hash, checked against
what the artifact can run, and turned into per-mode defaults for `generate`. Written by tuning/store.py."""
from __future__ import annotations

import json
from pathlib import Path

from ..artifact import Manifest, sha256_file
from ..errors import MirrorDeployError
from ..modes import MODES

TUNING_FILE = "tuning.json"
TUNING_VERSION = 1
RETUNE = "run `mirror-deploy tune DIR` again"


def read_tuning(folder: Path, manifest: Manifest) -> dict | None:
    """The artifact's tuning (None when it was never tuned); refuses a file that differs from the manifest."""
    if not manifest.tuning:
        return None
    try:
        path = Path(folder) / manifest.tuning["file"]
        expected = manifest.tuning["sha256"]
    except (KeyError, TypeError):
        raise MirrorDeployError(f"manifest.json's tuning entry is malformed ({manifest.tuning!r})", RETUNE) from None
    if not path.is_file():
        raise MirrorDeployError(f"the artifact's {path.name} is missing", RETUNE)
    if sha256_file(path) != expected:
        raise MirrorDeployError(f"{path} differs from the hash in manifest.json (edited by hand?)", RETUNE)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MirrorDeployError(f"{path} is not valid JSON ({err})", RETUNE) from None
    problems = tuning_problems(manifest, data)
    if problems:
        raise MirrorDeployError(f"{path}: {'; '.join(problems)}", RETUNE)
    return data


def tuning_problems(m: Manifest, data: dict) -> list[str]:
    """Choices outside what the artifact can run."""
    try:
        mirror, sd = data["choice"]["mirror"], data["choice"]["sd"]
        out = []
        if data.get("version") != TUNING_VERSION:
            out.append(f"version {data.get('version')} is not {TUNING_VERSION}")
        if mirror["exit_layer"] not in m.exit_layers:
            out.append(f"exit layer {mirror['exit_layer']} was not exported (exported: {m.exit_layers})")
        if not 1 <= mirror["kappa"] <= m.kappa:
            out.append(f"κ {mirror['kappa']} is outside 1..{m.kappa}")
        for mode, gamma in (("mirror", mirror["gamma"]), ("sd", sd["gamma"])):
            if not (isinstance(gamma, int) and 1 <= gamma <= m.gamma):
                out.append(f"{mode} γ {gamma} is outside 1..{m.gamma}")
        if data["choice"].get("best_mode") not in (None, *MODES):
            out.append(f"best mode {data['choice']['best_mode']!r} is not one of {', '.join(MODES)}")
        if not 0 <= mirror["branch_budget"] <= m.branch_batch:
            out.append(f"branch budget {mirror['branch_budget']} is outside 0..{m.branch_batch}")
        return out
    except (KeyError, TypeError) as err:
        return [f"a field is missing or has the wrong type ({type(err).__name__}: {err})"]


def tuned_for(tuning: dict | None, profile_name: str) -> bool:
    """Was the artifact tuned on this profile (so its measured costs hold here)?"""
    return bool(tuning) and tuning.get("profile") == profile_name


def tuned_best_mode(tuning: dict | None, profile_name: str) -> str | None:
    """The mode `tune` measured fastest, when it was tuned on this profile."""
    if not tuned_for(tuning, profile_name):
        return None
    return tuning["choice"].get("best_mode")


def tuned_defaults(tuning: dict | None, mode: str, profile_name: str, streams: bool | None = None) -> dict:
    """GenerationConfig fields the tuning chose for `mode`, when it was tuned on this profile. `streams`:
    the request's own setting (None: as tuned); a run with streams gets the window tune measured them at
    (SD's own tuned window may be 1, which leaves no room for a stream token)."""
    if not tuning or tuning.get("profile") != profile_name:
        return {}
    choice = tuning["choice"]
    if mode == "mirror":
        return {**choice["mirror"], "streams": False}   # tune measures streams for sd only
    if mode == "sd":
        use = streams_chosen(tuning, "sd") if streams is None else streams
        gamma = (tuning.get("streams") or {}).get("sd", {}).get("gamma") if use else None
        return {"gamma": gamma or choice["sd"]["gamma"], "lookup": lookup_beside_chosen(tuning), "streams": use}
    return {}


def streams_chosen(tuning: dict, mode: str) -> bool:
    """Did `tune` measure `mode` faster with the draft's speculative streams than without?"""
    return bool((tuning.get("streams") or {}).get(mode, {}).get("chosen", False))


def lookup_beside_chosen(tuning: dict) -> bool:
    """Did `tune` measure SD faster with prompt-lookup windows beside the draft than without?"""
    return bool((tuning.get("lookup_beside") or {}).get("sd", {}).get("chosen", False))
