"""Target runtimes side by side: the same model exported for several target graphs (ONNX Runtime fused,
OpenVINO-native with our kernel or OpenVINO's, traced), timed in one run.

    python -m mirror_deploy.bench.targets ART_A ART_B ... [--per-task 1] [--max-new-tokens 64]

Per artifact: autoregressive decode speed over SpecBench prompts (the artifacts take turns prompt by prompt,
in rotated order, so drift hits all alike; every artifact's text is printed equal or not), and the target's
step anatomy at a fixed context: a 1-row step and a 4-row verify window (interleaved medians), and prefill.
Ratios are to the first artifact.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from ..decoding.config import GenerationConfig
from ..decoding.drive import TargetDriver
from ..decoding.engine import Engine
from ..runtimes.kv import StateKV
from .specbench import load_prompts


def describe(engine: Engine) -> str:
    m, part = engine.manifest, engine.profile.target
    first = engine.target.graphs.segments[0]
    kind = "ours" if getattr(first, "kernel", False) else "stock"
    return f"{part.backend} {part.device} ×{part.threads or 'all'}, {m.target_attention}, {m.target_weights} ({kind})"


def decode_speeds(engines: dict[str, Engine], per_task: int, new_tokens: int) -> tuple[dict, dict, bool]:
    """tok/s and prefill seconds per artifact (medians over prompts); whether every artifact's text matched."""
    first = next(iter(engines.values()))
    prompts, _ = load_prompts(first.tokenizer, per_task, max_tokens=first.manifest.max_context - new_tokens - 8)
    speeds = {n: [] for n in engines}
    prefill = {n: [] for n in engines}
    same = True
    names = list(engines)
    for i, p in enumerate(prompts):
        texts = {}
        for name in names[i % len(names):] + names[:i % len(names)]:
            out = engines[name].generate(p.ids, GenerationConfig(max_new_tokens=new_tokens, mode="ar", stop_at_eos=False))
            stats = out.metrics.summary()
            speeds[name].append(stats["tokens_per_s"])
            prefill[name].append(stats["prefill_s"])
            texts[name] = out.tokens
        same &= len({tuple(t) for t in texts.values()}) == 1
    return ({n: statistics.median(v) for n, v in speeds.items()},
            {n: statistics.median(v) for n, v in prefill.items()}, same)


def step_anatomy(engine: Engine, context: int, rounds: int) -> dict[str, float]:
    """A 1-row step and a 4-row window at `context`, alternating (medians); the rollback between them (a state
    trim on OpenVINO-native targets) is done outside the timed call: an AR step never pays it."""
    driver = TargetDriver.for_manifest(engine.target.graphs, engine.manifest)
    ids = np.random.default_rng(0).integers(0, engine.manifest.target["vocab_size"], context + 4)
    driver.window(ids[:context])
    samples: dict[str, list[float]] = {"step": [], "window4": []}
    for r in range(rounds + 2):
        for name, rows in (("step", 1), ("window4", 4))[::1 if r % 2 else -1]:
            driver.rollback(context)
            for kv in driver.kv:
                if isinstance(kv, StateKV):
                    kv.trim(context)
            t0 = time.perf_counter()
            driver.window(ids[context:context + rows], start=context, exit_rows=False)
            if r >= 2:   # two warm-up rounds
                samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def main(artifacts: list[Path] = typer.Argument(..., help="Artifacts of the same target."),
         profile: list[str] = typer.Option([], help="Profile to open each artifact with, in order (default: its own)."),
         per_task: int = typer.Option(1, help="SpecBench prompts per task (six tasks)."),
         max_new_tokens: int = typer.Option(64),
         context: int = typer.Option(300, help="KV context of the step anatomy."),
         rounds: int = typer.Option(9, help="Interleaved rounds of the step anatomy (medians).")):
    console = Console()
    engines = {}
    for i, path in enumerate(artifacts):
        t0 = time.perf_counter()
        key = f"{path}" + (f" [{Path(profile[i]).stem}]" if i < len(profile) else "")   # one artifact, two profiles
        engines[key] = Engine(path, profile[i] if i < len(profile) else None, load_draft=False)   # the target only
        console.print(f"loaded {key} in {time.perf_counter() - t0:.1f} s: {describe(engines[key])}")
    speeds, prefill, same = decode_speeds(engines, per_task, max_new_tokens)
    steps = {n: step_anatomy(e, context, rounds) for n, e in engines.items()}
    table = Table(title=f"target AR, SpecBench {per_task}/task, {max_new_tokens} tokens; anatomy at context {context}")
    for col in ("artifact", "target", "AR tok/s", "× first", "step ms", "4-row window ms", "window ÷ step", "prefill s"):
        table.add_column(col)
    base = speeds[next(iter(engines))]
    for name, engine in engines.items():
        s = steps[name]
        table.add_row(Path(name).name, describe(engine), f"{speeds[name]:.2f}", f"{speeds[name] / base:.2f}",
                      f"{1e3 * s['step']:.1f}", f"{1e3 * s['window4']:.1f}", f"{s['window4'] / s['step']:.2f}",
                      f"{prefill[name]:.2f}")
    console.print(table)
    console.print(f"every artifact's AR text equal: {same} (each artifact's modes equal its own AR; the artifacts "
                  "differ where their int4 quantizations do)")


if __name__ == "__main__":
    typer.run(main)
