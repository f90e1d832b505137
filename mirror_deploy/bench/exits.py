"""Mirror at several (ℓe, γ) side by side with SD on SpecBench: `python -m mirror_deploy.bench.exits DIR
--configs 14:4,22:2,18:3`. Each prompt runs every configuration, the order rotating per prompt; totals
are tokens ÷ decode seconds over all prompts, printed as ratios to SD from the same run. It answers
whether a better exit (or another tuned choice) buys speed on the benchmark, not only in the latency model.
"""
from __future__ import annotations

import argparse
import sys

from ..decoding.config import GenerationConfig
from ..decoding.engine import Engine
from ..errors import MirrorDeployError
from .specbench import load_prompts


def parse_configs(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(x) for x in item.split(":")) for item in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise MirrorDeployError(f"--configs {text!r} is not a list of EXIT:GAMMA pairs", "write it like 14:4,22:2")
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mirror_deploy.bench.exits", description=__doc__.split("\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--configs", default="14:4,22:2", help="Mirror settings EXIT:GAMMA, comma-separated")
    parser.add_argument("--per-task", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        engine = Engine(args.artifact)
        n = args.max_new_tokens
        configs = {"sd": GenerationConfig(max_new_tokens=n, mode="sd"),
                   "mirror (tuned)": GenerationConfig(max_new_tokens=n, mode="mirror")}
        for exit_layer, gamma in parse_configs(args.configs):
            configs[f"mirror ℓe={exit_layer} γ={gamma}"] = GenerationConfig(
                max_new_tokens=n, mode="mirror", exit_layer=exit_layer, gamma=gamma)
        m = engine.manifest   # prompts that fit the KV capacity at the artifact's largest window and batch
        room = m.max_context - n - (m.gamma + 1) * (m.branch_batch + 2) - 1
        prompts, skipped = load_prompts(engine.tokenizer, args.per_task, max_tokens=room)
        if skipped:
            print(f"skipped {skipped} prompt(s) longer than {room} tokens (the artifact's KV capacity)",
                  file=sys.stderr)
        totals = {name: [0, 0.0] for name in configs}
        for i, prompt in enumerate(prompts):
            names = list(configs)
            names = names[i % len(names):] + names[:i % len(names)]
            for name in names:
                summary = engine.generate(prompt.ids, configs[name]).summary
                totals[name][0] += summary["new_tokens"]
                totals[name][1] += summary["decode_s"]
            print(f"{prompt.task}: done", file=sys.stderr, flush=True)
    except MirrorDeployError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sd = totals["sd"][0] / totals["sd"][1]
    for name, (tokens, seconds) in totals.items():
        print(f"{name:24s} {tokens / seconds:6.2f} tok/s  × sd {tokens / seconds / sd:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
