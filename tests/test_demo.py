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


def test_the_demo_runs_the_openvino_target_only_where_our_kernel_is_usable(monkeypatch):
    import mirror_deploy.kernels as kernels
    from mirror_deploy.demo import demo_profile
    from mirror_deploy.kernels.library import KernelStatus
    monkeypatch.setattr(kernels, "status", lambda: KernelStatus(True, None, "avx512vnni", "the CPU reports it"))
    assert demo_profile()[0] == "cpu-openvino"
    monkeypatch.setattr(kernels, "status", lambda: KernelStatus(False, None, "none", "not built"))
    profile, why = demo_profile()
    assert profile == "cpu" and "not built" in why


def test_a_demo_artifact_of_another_profile_or_weight_format_is_exported_again(tmp_path, monkeypatch):
    import mirror_deploy.demo as demo
    from mirror_deploy.export.pipeline import ExportOptions
    from mirror_deploy.tiny import build_tiny_pair
    target, draft = build_tiny_pair(tmp_path / "models", "qwen2", noise=0.05)
    out, quiet = tmp_path / "art", Console(quiet=True)
    opts = ExportOptions(kappa=4, gamma=3, max_context=256, branch_batch=2, profile="cpu-sim")
    demo.ensure_artifact(target, draft, out, opts, quiet)
    exports = []
    monkeypatch.setattr(demo, "export_artifact", lambda *a: exports.append(a[3].profile) or a[2])
    demo.ensure_artifact(target, draft, out, opts, quiet)
    assert exports == []                                   # same sources, same profile: reused
    demo.ensure_artifact(target, draft, out, ExportOptions(**{**vars(opts), "profile": "cpu"}), quiet)
    assert exports == ["cpu"]                              # another profile: exported again
    demo.ensure_artifact(target, draft, out, ExportOptions(**{**vars(opts), "draft_weights": "int8"}), quiet)
    assert exports == ["cpu", "cpu-sim"]                   # other draft weights: exported again
