"""The record a learned draft (`mirror-deploy learn-draft`, tuning/learn_draft.py) carries in its folder,
and the checks that read it: export and the runtime loader refuse a learned draft beside a target other
than the one that taught it, and tuning keeps the prompts it was trained on out of its held-out sets."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import MirrorDeployError

PROVENANCE = "learned_draft.json"
FORMAT = 1


def read_provenance(draft_path: Path) -> dict | None:
    """The learned draft's record, or None for an ordinary checkpoint."""
    path = Path(draft_path) / PROVENANCE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        record["target"]["weights_sha256"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise MirrorDeployError(f"{path} is not a learned draft's record",
                                "re-run `mirror-deploy learn-draft` into a new folder") from None
    return record


def retrain_command(record: dict, target_path: str | Path | None = None) -> str:
    target = target_path if target_path is not None else record["target"]["path"]
    return (f"mirror-deploy learn-draft {target} {record['base_draft']['path']} OUT "
            f"--layers {len(record['layers_kept'])}")


def require_taught_by(record: dict | None, target_sha256: str, target_path, draft_path) -> None:
    """Refuse a learned draft taught by another target: its proposals would be fitted to that one."""
    if record is None or record["target"]["weights_sha256"] == target_sha256:
        return
    raise MirrorDeployError(
        f"draft {draft_path} was taught by target {record['target']['path']} (weights sha256 "
        f"{record['target']['weights_sha256'][:12]}…), not by {target_path} ({target_sha256[:12]}…)",
        f"teach one for this target: {retrain_command(record, target_path)}")


def trained_prompts(manifest) -> set[str]:
    """sha256 of the calibration prompts an artifact's learned draft was trained on (empty if none)."""
    learned = (manifest.draft or {}).get("learned") or {}
    return set(learned.get("trained_on", []))
