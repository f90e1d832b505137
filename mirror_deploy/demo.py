"""`make demo`: pull the default real pair, export it for the default profile, and run one prompt with
Mirror-SD next to autoregressive decoding of the same prompt."""
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
# An int4 draft is what an NPU runs; the int4 exit head costs 5 ms a row where the fp32 head costs 27
# (bench --anatomy); γ = 7 and 4 branches are the most a run may use: `tune` picks within them.
DEMO_EXPORT = ExportOptions(gamma=7, kappa=8, max_context=1536, branch_batch=4, draft_weights="int4",
                            exit_head_weights="int4")


def ensure_artifact(target: Path, draft: Path, out: Path, opts: ExportOptions, console: Console) -> Path:
    """Export once; an artifact already exported from the same sources is reused."""
    if (out / "manifest.json").is_file():
        manifest = read_manifest(out)
        if manifest.target["path"] == str(target.resolve()) and manifest.draft["path"] == str(draft.resolve()):
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
        from .models import pull_pair
        target, draft = pull_pair()
        opts = DEMO_EXPORT
    artifact = ensure_artifact(Path(target), Path(draft), out, opts, console)
    if not (artifact / "tuning.json").is_file():   # measure this machine once: it picks ℓe, κ, γ, budget
        from .tuning.tune import TuneOptions, print_tuning, tune_artifact
        from .tuning.vocab import VocabOptions, cut_vocab, print_choice
        console.rule("[bold]tuning for this machine (once)")
        if not tiny and read_manifest(artifact).draft_vocab is None:   # the draft head cut to its frequent tokens
            print_choice(cut_vocab(artifact, VocabOptions(), console=console), console)
        small = TuneOptions(prompts=6, new_tokens=24, measure_prompts=0) if tiny else TuneOptions()
        print_tuning(tune_artifact(artifact, small, console), console)
    engine = Engine(artifact)
    tuned = engine.tuning["choice"] if engine.tuning else {}
    console.print(f"tuned configuration: {tuned}")
    results = {}
    for label, mode in (("autoregressive", "ar"), ("vanilla SD", "sd"), ("mirror", "mirror")):
        console.rule(f"[bold]{label}")
        stream = TextStream(engine.tokenizer, sys.stdout)
        result = engine.generate(prompt, GenerationConfig(max_new_tokens=max_new_tokens, mode=mode), chat=True,
                                 on_tokens=stream)
        stream.close()
        results[label] = result
    print_stats({k: r.summary for k, r in results.items()}, console, title="autoregressive, vanilla SD, mirror")
    ar = results["autoregressive"]
    same = all(r.tokens == ar.tokens for r in results.values())
    speeds = {k: r.summary["tokens_per_s"] / max(ar.summary["tokens_per_s"], 1e-9) for k, r in results.items()}
    console.print(f"outputs identical: [bold]{'yes' if same else 'NO'}[/]   speed ÷ autoregressive: "
                  + ", ".join(f"{k} [bold]{v:.2f}×[/]" for k, v in speeds.items()))
    return {"identical": same, "speedup": speeds["mirror"], "speedups": speeds}
