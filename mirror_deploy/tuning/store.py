"""`tuning.json` inside an artifact, written atomically and recorded (with its sha256) in the manifest.
Reading it back (verified on load and by `check`) is costs/tuned.py, which runs need without the tuner."""
from __future__ import annotations

import json
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from ..artifact import MANIFEST, read_manifest, sha256_file
from ..costs.tuned import TUNING_FILE


@contextmanager
def _no_interrupt():
    """Hold Ctrl-C for the two renames, so the artifact never has a tuning file its manifest disowns."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def _write_temp(path: Path, text: str) -> Path:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return temp


def replace_manifest(folder: Path, manifest) -> None:
    """Write the manifest whole under a temporary name, then rename it over the old one: an interrupted
    update leaves the old manifest (and so the artifact as it was)."""
    temp = _write_temp(Path(folder) / MANIFEST, manifest.to_json())
    try:
        with _no_interrupt():
            os.replace(temp, Path(folder) / MANIFEST)
    finally:
        temp.unlink(missing_ok=True)


def write_tuning(folder: Path, data: dict, profile: dict | None = None) -> Path:
    """Write tuning.json and point the manifest at it; both files are complete before either is
    replaced, and the replacements are renames, so an interruption leaves the artifact as it was.
    `profile` (the one it was tuned on) becomes the artifact's profile, so a run that names none uses
    the profile its tuning is for."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if profile is not None:
        manifest.profile = profile
    text = json.dumps(data, indent=2)
    temps = [_write_temp(folder / TUNING_FILE, text)]
    try:
        manifest.tuning = {"file": TUNING_FILE, "sha256": sha256_file(temps[0])}
        temps.append(_write_temp(folder / MANIFEST, json.dumps(asdict(manifest), indent=2)))
        with _no_interrupt():
            os.replace(temps[0], folder / TUNING_FILE)
            os.replace(temps[1], folder / MANIFEST)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
    return folder / TUNING_FILE
