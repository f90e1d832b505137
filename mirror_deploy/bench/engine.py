"""`python -m mirror_deploy.bench.engine`: the decoding engine's own figures on a medium random pair
(cpu-sim profile): overlapped vs serial Mirror-SD step time, the overlapped step against its ideal
T_prefix + max(T_suffix, T_draft), and the Python time per step outside the runtimes.

Random weights make acceptance meaningless, so the draft is the target's own first layers (agreeing
as often as its logit lens does); what is measured here is the engine, not the models.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..decoding.config import GenerationConfig
from ..decoding.engine import Engine
from ..export.pipeline import ExportOptions, export_artifact
from ..tiny import build_tiny_pair

MODES = {"ar": ("ar", "serial"), "sd": ("sd", "serial"), "mirror-serial": ("mirror", "serial"),
         "mirror": ("mirror", "overlapped")}
PROMPTS = ["def fibonacci(n):", "The quick brown fox jumps over", "Summarize: the cat sat on the mat.",
           "Translate to German: good morning", "Q: what is 12 * 7? A:", "Once upon a time"]


def build(folder: Path, console: Console) -> Path:
    art = folder / "art"
    if (art / "manifest.json").is_file():
        return art
    target, draft = build_tiny_pair(folder, "llama", target_layers=12, draft_layers=3, hidden=512,
                                    vocab_size=8192, draft_from_target=True)
    return export_artifact(target, draft, art, ExportOptions(exit_layer=6, kappa=8, gamma=4, max_context=1024,
                                                             branch_batch=4), console)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("artifacts/bench-engine"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--branch-budget", type=int, default=2)
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    engine = Engine(build(args.folder, console))
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for rep in range(args.repeats):
        order = list(MODES)[rep % len(MODES):] + list(MODES)[:rep % len(MODES)]   # interleaved, rotated
        for prompt in PROMPTS:
            for name in order:
                mode, schedule = MODES[name]
                cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, mode=mode, schedule=schedule,
                                       branch_budget=args.branch_budget, stop_at_eos=False)
                runs[name].append(engine.generate(prompt, cfg).summary)
    med = {name: {k: statistics.median([s[k] for s in rs if s[k] is not None] or [float("nan")])
                  for k in ("tokens_per_s", "t_step_ms", "t_prefix_ms", "t_suffix_ms", "t_draft_ms",
                            "t_exposed_ms", "step_over_ideal", "python_ms_per_step", "reuse_rate")}
           for name, rs in runs.items()}
    table = Table(title=f"engine figures, medians of {args.repeats}×{len(PROMPTS)} runs (cpu-sim)")
    for col in ("mode", "tok/s", "step ms", "prefix", "suffix", "draft", "exposed", "step/ideal", "python ms",
                "reuse"):
        table.add_column(col, justify="right")
    for name, m in med.items():
        table.add_row(name, *(f"{m[k]:.2f}" for k in ("tokens_per_s", "t_step_ms", "t_prefix_ms", "t_suffix_ms",
                                                       "t_draft_ms", "t_exposed_ms", "step_over_ideal",
                                                       "python_ms_per_step", "reuse_rate")))
    Console().print(table)
    ratio = med["mirror-serial"]["t_step_ms"] / med["mirror"]["t_step_ms"]
    Console().print(f"Mirror step, serial ÷ overlapped: {ratio:.2f}   overlapped step ÷ ideal: "
                    f"{med['mirror']['step_over_ideal']:.2f} (goal ≤ 1.15)")


if __name__ == "__main__":
    from . import command
    command(main)
