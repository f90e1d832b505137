"""Several artifacts of one target, side by side: AR speed per weight format, and whether every speculative
mode equals that artifact's own AR (greedy, SpecBench prompts).

    python -m mirror_deploy.bench.formats artifacts/qwen-int4 artifacts/qwen-gguf [--modes sd,mirror] ...

All artifacts stay loaded; each prompt runs AR on every artifact in turn (rounds interleaved, so load and
clock drift fall on all alike), and the table reports median tokens/s and the ratio to the first artifact.
Then each speculative mode runs once per prompt and artifact and is compared with that artifact's AR.
"""
from __future__ import annotations

import argparse
import statistics
import time
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
    parser.add_argument("--rounds", type=int, default=3, help="AR runs per prompt and artifact (median)")
    parser.add_argument("--modes", default="sd,mirror-serial,mirror",
                        help="speculative modes compared with each artifact's AR ('' for none)")
    args = parser.parse_args(argv)
    console = Console()
    engines = {str(a): load(a) for a in args.artifacts}
    first = next(iter(engines.values()))
    room = min(prompt_room(e.manifest, args.max_new_tokens) for e in engines.values())
    prompts, _ = load_prompts(first.tokenizer, args.per_task, max_tokens=room)
    ar = GenerationConfig(max_new_tokens=args.max_new_tokens, mode="ar", stop_at_eos=False)
    speed: dict[str, list[float]] = {name: [] for name in engines}
    outputs: dict[tuple[str, int], list[int]] = {}
    for i, prompt in enumerate(prompts):
        console.print(f"[dim]AR {i + 1}/{len(prompts)} ({prompt.task}, {len(prompt.ids)} prompt tokens)[/]")
        for _ in range(args.rounds):
            for name, engine in engines.items():
                t0 = time.perf_counter()
                result = engine.generate(prompt.ids, ar)
                speed[name].append(len(result.tokens) / (time.perf_counter() - t0))
                outputs[name, i] = result.tokens
    table = Table(title=f"AR, {len(prompts)} SpecBench prompts × {args.rounds} rounds, {args.max_new_tokens} tokens")
    for column in ("artifact", "weights", "tok/s (median)", "× first", *args.modes.split(",")):
        if column:
            table.add_column(column)
    base = statistics.median(speed[str(args.artifacts[0])])
    for name, engine in engines.items():
        row = [name, engine.manifest.target_weights, f"{statistics.median(speed[name]):.1f}",
               f"{statistics.median(speed[name]) / base:.2f}"]
        for mode in filter(None, args.modes.split(",")):
            console.print(f"[dim]{mode} on {name}[/]")
            kind, schedule = EngineMethod.MODES[mode]
            config = GenerationConfig(max_new_tokens=args.max_new_tokens, mode=kind, schedule=schedule,
                                      stop_at_eos=False)
            equal = sum(engine.generate(p.ids, config).tokens == outputs[name, i] for i, p in enumerate(prompts))
            row.append(f"= AR on {equal}/{len(prompts)}")
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
