"""Cost curves on the artifact's own devices: each target segment, the head and the exit head at 1..γ+1
rows, the draft call at 1..branch_batch+1 wide, at two contexts; each alone and with the other device
busy beside it (as in an overlapped Mirror step: the suffix runs beside the draft's branch calls).
Medians of interleaved repeats (bench/anatomy.py), in milliseconds; linear in context between them."""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..timing import (draft_items, draft_key, head_key, interleaved, running_beside, segment_key,
                             target_items)
from ..decoding.engine import Engine
from ..errors import MirrorDeployError

STATES = ("alone", "together")


def curve_contexts(engine: Engine, low: int, high: int) -> list[int]:
    """Two contexts spanning the calibration steps, inside the KV capacity."""
    m = engine.manifest
    room = m.max_context - 2 * (m.gamma + 1) - m.branch_batch - 8
    if room < 8:
        raise MirrorDeployError(f"the artifact's KV capacity {m.max_context} leaves no room to time calls",
                                "re-export with a larger --max-context")
    low, high = max(8, min(low, room)), max(8, min(high, room))
    return sorted({low, high})


def _table(times: dict[str, float], layers, rows, widths, exit_head: bool) -> dict:
    ms = lambda key: round(times[key] * 1e3, 4)
    return {"segments": [[ms(segment_key(a, b, r)) for r in rows] for a, b in layers],
            "head": [ms(head_key(r)) for r in rows],
            "exit_head": [ms(head_key(r, exit_head)) for r in rows],
            "draft": [ms(draft_key(w)) for w in widths]}


def measure_curves(engine: Engine, contexts: list[int], rounds: int, seed: int,
                   advance: Callable[[], None] = lambda: None) -> dict:
    m = engine.manifest
    rows = list(range(1, m.gamma + 2))
    widths = list(range(1, m.branch_batch + 2))
    layers = engine.target.graphs.layers
    exit_head = engine.target.graphs.exit_head is not None
    rng = np.random.default_rng(seed)
    out = {"contexts": contexts, "rows": rows, "widths": widths, "layers": [list(x) for x in layers],
           "alone": [], "together": []}
    for context in contexts:
        t_items = target_items(engine, context, tuple(rows), rng, steps=False)
        d_items = draft_items(engine, context, tuple(widths), rng)
        alone = interleaved({**t_items, **d_items}, rounds)
        advance()
        # Beside the target: the draft's branch call at the full budget; beside the draft: the suffix
        # half of the segments and the head on a full window.
        branch_call = d_items[draft_key(widths[-1])]
        half = len(layers) // 2
        suffix_keys = [segment_key(a, b, rows[-1]) for a, b in layers[half:]] + [head_key(rows[-1])]
        suffix = lambda: [t_items[k]() for k in suffix_keys]
        with running_beside(branch_call):
            together = interleaved(t_items, rounds)
        with running_beside(suffix):
            together.update(interleaved(d_items, rounds))
        advance()
        out["alone"].append(_table(alone, layers, rows, widths, exit_head))
        out["together"].append(_table(together, layers, rows, widths, exit_head))
    engine.draft.reset()
    engine.target.reset()
    return out
