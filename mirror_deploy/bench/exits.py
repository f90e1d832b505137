"""Mirror at several (ℓe, γ) side by side with AR, SD and the tuned Mirror on SpecBench, through the
`bench` runner (methods interleaved prompt by prompt, results.jsonl, the same summary tables):
`python -m mirror_deploy.bench.exits DIR --configs 14:4,22:2,18:3`. It answers whether a better exit (or
another tuned choice) buys speed on the benchmark, not only in the latency model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from ..decoding.engine import Engine
from ..errors import MirrorDeployError
from . import runner
from .methods import EngineMethod
from .specbench import load_prompts, prompt_room


def parse_configs(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(x) for x in item.split(":")) for item in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise MirrorDeployError(f"--configs {text!r} is not a list of EXIT:GAMMA pairs", "write it like 14:4,22:2")
    return pairs


def exit_methods(engine: Engine, configs: list[tuple[int, int]]) -> list[EngineMethod]:
    """ar (the tables' reference), sd, the tuned mirror, then mirror at each (ℓe, γ), named mirror@ℓe:γ."""
    methods = [EngineMethod(engine, name) for name in ("ar", "sd", "mirror")]
    for exit_layer, gamma in configs:
        method = EngineMethod(engine, "mirror", exit_layer=exit_layer, gamma=gamma)
        method.name = f"mirror@{exit_layer}:{gamma}"
        methods.append(method)
    return methods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mirror_deploy.bench.exits", description=__doc__.split("\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--configs", default="14:4,22:2", help="Mirror settings EXIT:GAMMA, comma-separated")
    parser.add_argument("--per-task", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench-results/exits"))
    args = parser.parse_args(argv)
    err = Console(stderr=True)
    try:
        configs = parse_configs(args.configs)
        engine = Engine(args.artifact)
        room = prompt_room(engine.manifest, args.max_new_tokens)
        prompts, skipped = load_prompts(engine.tokenizer, args.per_task, max_tokens=room)
        if skipped:
            err.print(f"note: passed over {skipped} prompt(s) longer than {room} tokens (the artifact's KV capacity)")
        methods = exit_methods(engine, configs)
        for method in methods if prompts else []:
            # One token each first: a setting the artifact cannot run (an exit it did not export, a γ past
            # its capacity) fails on the engine's own checks before anything is written.
            method.generate(prompts[0].ids, 1)
        records = runner.run(methods, prompts, runner.BenchSettings(args.max_new_tokens), args.out, err)
    except MirrorDeployError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = runner.summarise(records)
    runner.write_outputs(summary, args.out)
    print(runner.markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
