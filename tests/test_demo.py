"""`make demo`'s flow on the tiny pair: export, the light first tune, then AR, SD, Mirror and the tuned
default on one prompt, all with the same text; a second demo reuses the artifact and its tuning."""
from __future__ import annotations

from rich.console import Console

from mirror_deploy.demo import run_demo


def test_demo_shows_every_mode_with_the_same_text_twice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    console = Console(stderr=True, width=200)
    first = run_demo(tmp_path / "artifacts" / "demo-tiny", "def f(n):", 12, tiny=True, console=console)
    assert first["identical"]
    assert set(first["speedups"]) >= {"autoregressive", "vanilla SD", "mirror"} and len(first["speedups"]) == 4
    tuned = (tmp_path / "artifacts" / "demo-tiny" / "tuning.json").stat().st_mtime
    second = run_demo(tmp_path / "artifacts" / "demo-tiny", "def f(n):", 12, tiny=True, console=console)
    assert second["identical"]
    assert (tmp_path / "artifacts" / "demo-tiny" / "tuning.json").stat().st_mtime == tuned
