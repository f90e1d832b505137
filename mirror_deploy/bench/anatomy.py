"""The anatomy of a step on an artifact's own devices: `mirror-deploy bench DIR --anatomy`.

Every figure is a median over interleaved repeats (each round times every item once, in rotated order,
so drift and other load hit all items alike), at a given KV context:
- each target segment per call at 1 and γ+1 rows, the head and the exit head at 1 and γ+1 rows;
- the composed target step (all segments + head) at 1 and γ+1 rows, and their ratio;
- the draft call at widths 1, 4 and 8 over the same context (tree calls from the committed prefix);
- prefill per token, sequential against the two-stage pipeline, on the same chunk.
"""
from __future__ import annotations

import numpy as np

from ..decoding.engine import Engine
from ..errors import MirrorDeployError
from ..runtimes.loader import draft_graph_name
from ..timing import (Timed, draft_call_items, draft_items, draft_key, head_key, interleaved,  # noqa: F401
                      running_beside, segment_key, target_items)


def prefill_items(engine: Engine, tokens: int, rng) -> Timed:
    from ..decoding.target import TargetRunner
    ids = [int(t) for t in rng.integers(0, engine.manifest.target["vocab_size"], tokens)]
    runners = {"sequential": TargetRunner(engine.target.graphs, engine.manifest, pipeline_prefill=False),
               "pipelined": TargetRunner(engine.target.graphs, engine.manifest, pipeline_prefill=True)}

    def prefill(runner):
        runner.reset()
        runner.prefill(ids)
    return {f"prefill {tokens} tokens, {name}": (lambda r=r: prefill(r)) for name, r in runners.items()}


def anatomy(engine: Engine, context: int = 500, rounds: int = 7, prefill_tokens: int = 512,
            seed: int = 0) -> dict[str, float]:
    """Median milliseconds per item (prefill items: per token)."""
    rng = np.random.default_rng(seed)
    gamma, capacity = engine.manifest.gamma, engine.manifest.max_context
    if context + 2 * (gamma + 1) + 8 > capacity:
        raise MirrorDeployError(f"--context {context} does not fit the artifact's KV capacity {capacity}",
                                f"use --context {capacity - 2 * (gamma + 1) - 8} or less")
    prefill_tokens = min(prefill_tokens, capacity - 1)
    rows = tuple(sorted({1, 2, 4, gamma + 1}))
    step = interleaved({**target_items(engine, context, rows, rng),
                        **(draft_items(engine, context, (1, 4, 8), rng) if engine.draft is not None else {})},
                       rounds)
    fill = interleaved(prefill_items(engine, prefill_tokens, rng), max(1, rounds // 3), warmup=0)
    out = {k: v * 1e3 for k, v in step.items()}
    out.update({k: v * 1e3 / prefill_tokens for k, v in fill.items()})
    return out


def graph_kernels(engine: Engine) -> dict[str, str]:
    """The matrix kernel each target graph runs: ours (mirror_deploy::Q4MatMul) or the runtime's own."""
    graphs = [*engine.target.graphs.segments, engine.target.graphs.head]
    names = [*engine.manifest.target_segments(), "target_head"]
    weights = engine.manifest.target_weights
    stock = {"onnxruntime": "ONNX Runtime MatMulNBits" if weights in ("int8", "int4", "gguf") else "ONNX Runtime MatMul",
             "openvino": "OpenVINO's MatMul" + (" (compressed)" if weights in ("int8", "int4", "gguf") else "")}
    return {n: "ours: mirror_deploy::Q4MatMul" if getattr(g, "kernel", False) else stock[engine.profile.target.backend]
            for n, g in zip(names, graphs)}


def print_anatomy(figures: dict[str, float], engine: Engine, context: int, console) -> None:
    from rich.table import Table

    gamma = engine.manifest.gamma
    draft = draft_graph_name(engine.manifest, engine.profile)
    table = Table(title=f"step anatomy at context {context} (medians, interleaved); target "
                        f"{engine.manifest.target_weights}, draft {draft} {engine.manifest.graphs[draft].weights}")
    table.add_column("item")
    table.add_column("ms", justify="right")
    for name, ms in figures.items():
        table.add_row(name + (" (per token)" if name.startswith("prefill") else ""), f"{ms:.2f}")
    one, window = figures.get("target step × 1"), figures.get(f"target step × {gamma + 1}")
    if one and window:
        table.add_row(f"window ÷ 1-token step (γ+1 = {gamma + 1})", f"{window / one:.2f}×")
    if one and figures.get(draft_key(1)):   # Mirror hides the draft only while its calls fit in the suffix
        table.add_row("draft call × 1 ÷ target step × 1", f"{figures[draft_key(1)] / one:.2f}×")
    learned = (engine.manifest.draft or {}).get("learned")
    if learned:   # learn-draft's held-out figures (greedy agreement with the target's argmax)
        held = learned["held_out"]
        table.add_row(f"learned draft: {len(learned['layers_kept'])} of {learned['of_layers']} layers, held-out "
                      "agreement (full draft)", f"{held['learned']:.2f} ({held['full_draft']:.2f})")
    for rows in (1, gamma + 1):   # what the step adds to its graphs: feeds, bindings, Python
        keys = [segment_key(a, b, rows) for a, b in engine.target.graphs.layers] + [head_key(rows)]
        if figures.get(f"target step × {rows}") and all(k in figures for k in keys):
            table.add_row(f"target step ÷ its graphs (segments + head), × {rows}",
                          f"{figures[f'target step × {rows}'] / sum(figures[k] for k in keys):.2f}×")
    for name, kernel in graph_kernels(engine).items():
        table.add_row(f"{name}: matrix kernel", kernel)
    seq = next((v for k, v in figures.items() if k.startswith("prefill") and k.endswith("sequential")), None)
    pipe = next((v for k, v in figures.items() if k.startswith("prefill") and k.endswith("pipelined")), None)
    if seq and pipe:
        table.add_row("prefill sequential ÷ pipelined", f"{seq / pipe:.2f}×")
    console.print(table)
