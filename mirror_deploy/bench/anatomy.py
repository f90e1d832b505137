"""The anatomy of a step on an artifact's own devices: `mirror-deploy bench DIR --anatomy`.

Every figure is a median over interleaved repeats (each round times every item once, in rotated order,
so drift and other load hit all items alike), at a given KV context:
- each target segment per call at 1 and γ+1 rows, the head and the exit head at 1 and γ+1 rows;
- the composed target step (all segments + head) at 1 and γ+1 rows, and their ratio;
- the draft call at widths 1, 4 and 8 over the same context (tree calls from the committed prefix);
- prefill per token, sequential against the two-stage pipeline, on the same chunk.
"""
from __future__ import annotations

import statistics
import threading
import time
from contextlib import contextmanager
from typing import Callable

import numpy as np

from ..decoding.drive import DraftDriver, TargetDriver
from ..decoding.engine import Engine
from ..errors import MirrorDeployError
from ..runtimes.loader import draft_graph_name
from ..runtimes.kv import COMMITTED

Timed = dict[str, Callable[[], None]]


def interleaved(items: Timed, rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per item over `rounds`, each round timing every item once in a rotated order."""
    names = list(items)
    for _ in range(warmup):
        for name in names:
            items[name]()
    samples = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            items[name]()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def segment_key(first: int, stop: int, rows: int) -> str:
    return f"segment {first}-{stop - 1} ({stop - first} layers) × {rows}"


def head_key(rows: int, exit_head: bool = False) -> str:
    return f"{'exit head' if exit_head else 'head'} × {rows}"


def draft_key(width: int) -> str:
    return f"draft call × {width}"


@contextmanager
def running_beside(call: Callable[[], None]):
    """Keep `call` running in a loop on another thread (the other device busy, as in a Mirror step)
    while the body times its own items."""
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            call()
    thread = threading.Thread(target=loop, name="beside", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def target_items(engine: Engine, context: int, rows: tuple[int, ...], rng, steps: bool = True) -> Timed:
    """Each segment, the head and the exit head at each row count (`steps`: the composed step too)."""
    m, target = engine.manifest, engine.target
    driver = TargetDriver(target.graphs, m)
    ids = rng.integers(0, m.target["vocab_size"], context + max(rows))
    driver.window(ids[:context])
    items: Timed = {}
    d = m.target["hidden_size"]
    for r in rows:
        feeds = driver.window_feeds(context, r)
        hidden = rng.standard_normal((1, r, d)).astype(np.float32)
        for i, (a, b) in enumerate(target.graphs.layers):
            first = ids[None, context:context + r] if i == 0 else hidden
            items[segment_key(a, b, r)] = (
                lambda i=i, first=first, feeds=feeds: driver.run_segments(i, i + 1, first, feeds, {}))
        items[head_key(r)] = lambda hidden=hidden, r=r: driver.head(hidden, np.arange(r))
        if target.graphs.exit_head is not None:
            items[head_key(r, True)] = lambda hidden=hidden, r=r: driver.head(hidden, np.arange(r), True)
        def step(r=r):   # an AR / SD step: segments and head, no early-exit rows (Mirror's adds them)
            driver.window(ids[context:context + r], start=context, exit_rows=False)
            driver.rollback(context)          # every item runs over the same `context` positions
        if steps:
            items[f"target step × {r}"] = step
    return items


def draft_items(engine: Engine, context: int, widths: tuple[int, ...], rng) -> Timed:
    return draft_call_items(engine.draft, engine.manifest.draft["vocab_size"], context, widths, rng)


def draft_call_items(runner, vocab: int, context: int, widths: tuple[int, ...], rng, label: str = "draft call") -> Timed:
    """Tree calls of each width from a committed prefix of `context` random tokens, on `runner`."""
    driver = DraftDriver(runner)
    driver.runner.reset()
    driver.commit(list(rng.integers(0, vocab, context)))
    items: Timed = {}
    for w in widths:
        if driver.static_seq and w > driver.static_seq:
            continue
        tokens = [int(t) for t in rng.integers(0, vocab, w)]

        def call(tokens=tokens):
            # Dropped slots stay masked until compaction (draft_cache.py): repeated calls must make room
            # the way a rollout does. Only committed slots are held here, so compaction is safe.
            driver.cache.ensure_room(len(tokens))
            driver.call(tokens, [COMMITTED] * len(tokens))
            driver.rollback()
        items[f"{label} × {w}"] = call
    return items


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
    for rows in (1, gamma + 1):   # what the step adds to its graphs: feeds, bindings, Python
        keys = [segment_key(a, b, rows) for a, b in engine.target.graphs.layers] + [head_key(rows)]
        if figures.get(f"target step × {rows}") and all(k in figures for k in keys):
            table.add_row(f"target step ÷ its graphs (segments + head), × {rows}",
                          f"{figures[f'target step × {rows}'] / sum(figures[k] for k in keys):.2f}×")
    seq = next((v for k, v in figures.items() if k.startswith("prefill") and k.endswith("sequential")), None)
    pipe = next((v for k, v in figures.items() if k.startswith("prefill") and k.endswith("pipelined")), None)
    if seq and pipe:
        table.add_row("prefill sequential ÷ pipelined", f"{seq / pipe:.2f}×")
    console.print(table)
