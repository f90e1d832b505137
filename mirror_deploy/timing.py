"""Timing a step's parts on an artifact's own devices, shared by `tune` (tuning/) and `bench` (bench/):
interleaved medians (each round times every item once, in rotated order, so drift and other load hit all
items alike), the items of a step (each target segment, the head, the composed step, the draft call at
each width) and their names, and a part kept busy beside the timed ones."""
from __future__ import annotations

import statistics
import threading
import time
from contextlib import contextmanager
from typing import Callable

import numpy as np

from .decoding.drive import DraftDriver, TargetDriver
from .decoding.engine import Engine
from .runtimes.kv import COMMITTED

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
