"""Several artifacts of one target, side by side: each mode's speed per artifact (a weight format, a cut
draft head, ...), and whether every speculative mode equals that artifact's own AR (greedy, SpecBench).

    python -m mirror_deploy.bench.formats artifacts/qwen-int4 artifacts/qwen-gguf [--modes ar,sd,mirror] ...

All artifacts stay loaded; each prompt runs every (artifact, mode) in turn, `--rounds` times, the order
rotated per round (so load and clock drift fall on all alike). The table reports median decode tokens/s,
the ratio to the first artifact's same mode and to the artifact's own AR, and on how many prompts the
mode's output equals that artifact's AR (and, for AR, the first artifact's AR).

Compare the ratios to each artifact's own AR, not absolute speeds across artifacts: two engines in one
process do not run alike. Measured on the real pair, the engine loaded second ran AR 1.14-1.27× the first
on the very same target files (docs/results/memory-limit-step.md); run it again with the order swapped.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table


def main(argv=None) -> None:
    from ..decoding.config import GenerationConfig
    from ..decoding.engine import load
    from .methods import EngineMethod
    from .specbench import load_prompts, prompt_room

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--per-task", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="runs per prompt, artifact and mode (median)")
    parser.add_argument("--modes", default="ar,sd,mirror-serial,mirror",
                        help="modes, comma-separated (ar is always run: the others are compared with it)")
    args = parser.parse_args(argv)
    console = Console()
    engines = {str(a): load(a) for a in args.artifacts}
    first = next(iter(engines.values()))
    room = min(prompt_room(e.manifest, args.max_new_tokens) for e in engines.values())
    prompts, _ = load_prompts(first.tokenizer, args.per_task, max_tokens=room)
    modes = ["ar", *[m for m in args.modes.split(",") if m and m != "ar"]]
    configs = {}
    for mode in modes:
        kind, schedule = EngineMethod.MODES[EngineMethod.parse(mode)[0]]
        configs[mode] = GenerationConfig(max_new_tokens=args.max_new_tokens, mode=kind, schedule=schedule,
                                         stop_at_eos=False, **EngineMethod.config_fields(mode))
    runs = [(name, mode) for name in engines for mode in modes]
    speed = {run: [] for run in runs}
    outputs: dict[tuple[str, str, int], list[int]] = {}
    for i, prompt in enumerate(prompts):
        console.print(f"[dim]{i + 1}/{len(prompts)} ({prompt.task}, {len(prompt.ids)} prompt tokens)[/]")
        for r in range(args.rounds):
            for name, mode in runs[r % len(runs):] + runs[:r % len(runs)]:
                result = engines[name].generate(prompt.ids, configs[mode])
                speed[name, mode].append(len(result.tokens) / result.metrics.t_decode)
                outputs[name, mode, i] = result.tokens
    median = {run: statistics.median(s) for run, s in speed.items()}
    table = Table(title=f"{len(prompts)} SpecBench prompts × {args.rounds} rounds, {args.max_new_tokens} tokens, "
                        "decode tok/s (median)")
    for column in ("artifact", "weights", "mode", "tok/s", "× first artifact", "× own AR", "output = own AR"):
        table.add_column(column)
    base = str(args.artifacts[0])

    def same_as_first(name: str) -> int:
        return sum(outputs[name, "ar", i] == outputs[base, "ar", i] for i in range(len(prompts)))
    for name, engine in engines.items():
        cut = engine.manifest.draft_vocab
        weights = engine.manifest.target_weights + (f", draft head {cut['size']}" if cut else "")
        for mode in modes:
            equal = sum(outputs[name, mode, i] == outputs[name, "ar", i] for i in range(len(prompts)))
            table.add_row(Path(name).name, weights, mode, f"{median[name, mode]:.1f}",
                          f"{median[name, mode] / median[base, mode]:.2f}",
                          f"{median[name, mode] / median[name, 'ar']:.2f}",
                          f"{equal}/{len(prompts)}" if mode != "ar" else
                          "-" if name == base else f"= first's AR on {same_as_first(name)}/{len(prompts)}")
    console.print(table)


if __name__ == "__main__":
    from . import command
    command(main)
