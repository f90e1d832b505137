"""`make demo`: pull the default real pair as users deploy it (its published 4-bit GGUF files), export it
for this machine's cores (`demo_profile`), tune it lightly once, and run one prompt autoregressively, with vanilla
SD, with Mirror-SD and with the tuned best mode: the same text from each, and each one's speed.

Why this pair: the GGUF route reads the target file's own blocks (no dense fp32 copy of the target is made:
the export peaks near 6 GB instead of 13) and the target it exports is what a user runs. A fuller tune (more
prompts, the draft head cut to its frequent tokens, every mode checked) is one command away:
`mirror-deploy tune ART`."""
from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from .decoding.config import GenerationConfig
from .decoding.engine import Engine
from .artifact import read_manifest
from .export.pipeline import ExportOptions, export_artifact
from .report import TextStream, print_stats

DEMO_PROMPT = "Write a Python function that returns the n-th Fibonacci number, with a short docstring."
# The target's published GGUF blocks kept (Q4_K_M), the draft's re-quantized to int4: a draft only proposes, and
# its file is mostly Q5_0, which OpenVINO holds as 8-bit (696 MB a call against 321 at int4; SD 1.20x AR
# against 1.02x, one bench run). On the machine's own cores (`demo_profile`); γ = 7 and 4 branches are the
# most a run may use: `tune` picks within them.
DEMO_EXPORT = ExportOptions(gamma=7, kappa=8, max_context=1536, branch_batch=4,
                            profile="cpu",   # run_demo takes demo_profile()'s
                            target_weights="gguf", draft_weights="int4")

# The demo's first tune: the calibration prompts, three rounds per cost curve, no every-mode check (the demo itself
# shows every mode's text equal); `mirror-deploy tune ART` runs the full one.
DEMO_TUNE = dict(prompts=12, new_tokens=32, rounds=3, measure_prompts=0)


def demo_profile() -> tuple[str, str]:
    """The profile the demo exports for, and why. Where our 4-bit kernel is usable, `cpu-openvino`: the
    OpenVINO-native target runs the GGUF's 4-bit blocks in it (AR 1.3x the `cpu` profile's ONNX Runtime target
    here, docs/results/openvino-native-target-2026-12-07.md). Otherwise `cpu`, whose ONNX Runtime target keeps
    the blocks in its stock MatMulNBits kernel (on OpenVINO the GGUF blocks need our kernel)."""
    from .kernels import status
    kernel = status()
    if kernel.available:
        return "cpu-openvino", f"our 4-bit kernel is usable ({kernel.isa})"
    return "cpu", f"our 4-bit kernel is not usable ({kernel.why}): the stock kernels run"


def ensure_artifact(target: Path, draft: Path, out: Path, opts: ExportOptions, console: Console) -> Path:
    """Export once; an artifact already exported from the same sources, for the same profile and weight
    formats, is reused."""
    if (out / "manifest.json").is_file():
        manifest = read_manifest(out)
        draft_weights = {g.weights for name, g in manifest.graphs.items() if name.startswith("draft")}
        if (manifest.target["path"] == str(target.resolve()) and manifest.draft["path"] == str(draft.resolve())
                and manifest.profile["name"] == opts.profile and manifest.target_weights == opts.target_weights
                and draft_weights == {opts.draft_weights}):
            console.print(f"using the artifact in {out} (delete it to export again)")
            return out
        opts = ExportOptions(**{**vars(opts), "force": True})
    return export_artifact(target, draft, out, opts, console)


def run_demo(out: Path, prompt: str = DEMO_PROMPT, max_new_tokens: int = 64, tiny: bool = False,
             console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    if tiny:
        from .tiny import build_tiny_pair
        target, draft = build_tiny_pair(out.parent / f".{out.name}-models", "qwen2", noise=0.05)
        opts = ExportOptions(kappa=16, gamma=4, max_context=512, branch_batch=4)
    else:
        from .models import get_pair, pull_gguf
        pair = get_pair()
        target, draft = pull_gguf(pair.target), pull_gguf(pair.draft)
        profile, why = demo_profile()
        console.print(f"profile: [bold]{profile}[/] ({why})")
        opts = ExportOptions(**{**vars(DEMO_EXPORT), "profile": profile})
    artifact = ensure_artifact(Path(target), Path(draft), out, opts, console)
    if not (artifact / "tuning.json").is_file():   # measure this machine once: it picks ℓe, κ, γ, budget
        from .tuning.tune import TuneOptions, print_tuning, tune_artifact
        console.rule("[bold]tuning for this machine (once, lightly: `mirror-deploy tune` runs the full one)")
        print_tuning(tune_artifact(artifact, TuneOptions(**DEMO_TUNE), console), console)
    engine = Engine(artifact)
    tuned = engine.tuning["choice"] if engine.tuning else {}
    console.print(f"tuned configuration: {tuned}")
    results = {}
    # The last run names no mode: the engine takes what `tune` measured fastest here (lookup beside the
    # draft included), as `mirror-deploy run` does.
    modes = [("autoregressive", "ar"), ("vanilla SD", "sd"), ("mirror", "mirror"),
             (f"tuned default ({engine.default_mode()[0]})", None)]
    for label, mode in modes:
        console.rule(f"[bold]{label}")
        stream = TextStream(engine.tokenizer, sys.stdout)
        result = engine.generate(prompt, GenerationConfig(max_new_tokens=max_new_tokens, mode=mode), chat=True,
                                 on_tokens=stream)
        stream.close()
        results[label] = result
    print_stats({k: r.summary for k, r in results.items()}, console, title="autoregressive, vanilla SD, mirror, tuned default")
    ar = results["autoregressive"]
    same = all(r.tokens == ar.tokens for r in results.values())
    speeds = {k: r.summary["tokens_per_s"] / max(ar.summary["tokens_per_s"], 1e-9) for k, r in results.items()}
    console.print(f"outputs identical: [bold]{'yes' if same else 'NO'}[/]   speed ÷ autoregressive: "
                  + ", ".join(f"{k} [bold]{v:.2f}×[/]" for k, v in speeds.items()))
    return {"identical": same, "speedup": speeds["mirror"], "speedups": speeds}
