"""The latency model of mirror-sd.md: the milliseconds one step of each mode costs, from measured
cost curves. Both the offline tuner (tuning/) and the run-time window policy (decoding/policy.py) read it.

Per step (ms, at the step's context; `alone`/`together` curves, see curves.py):
- AR:  all segments + head on 1 row, alone.
- SD:  all segments + head on γ+1 rows, then γ one-token draft calls, in series, alone.
- Mirror (overlapped): prefix = segments before ℓe + exit head on γ+1 rows, alone (the draft waits for
  the exit); then the suffix (the other segments + head) runs together with the draft's branch calls
  (γ calls, each as wide as the budget). At the verdict the call in flight finishes; on a hit (the needed
  branch is among the budget's best-ranked) the branch's remaining calls run one token wide, alone; on a
  miss a fresh rollout of γ one-token calls follows. The step ends when both sides are done.
With speculative streams (`DraftCalls`) a call yields 1 + S tokens, so every "γ calls" above becomes
⌈γ / (1 + S)⌉ calls, each costing the streams graph's measured ratio to a plain call.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .curves import Curves


@dataclass
class MirrorConfig:
    exit_layer: int
    kappa: int
    gamma: int
    branch_budget: int


@dataclass(frozen=True)
class DraftCalls:
    """How a window's draft tokens become draft calls: `per_call` tokens a call (1 + S with speculative
    streams), each costing `ratio` × a plain call (the curves time the plain draft)."""
    per_call: int = 1
    ratio: float = 1.0

    def calls(self, tokens: int) -> int:
        return -(-tokens // self.per_call)


PLAIN = DraftCalls()


def with_streams(acceptance: list[float], streams: dict) -> tuple[DraftCalls, list[float]]:
    """A draft with speculative streams (the manifest's `draft_streams`): its calls, and `acceptance` per
    depth with the depths its streams propose taking the streams' held-out rates instead."""
    calls = DraftCalls(1 + streams["streams"], float(streams.get("call_ratio") or 1.0))
    rates = streams["acceptance"]   # per position within a call: the draft's own, then each stream's
    return calls, [a if d % calls.per_call == 0 else rates[d % calls.per_call] for d, a in enumerate(acceptance)]


def ar_step_ms(c: Curves, context) -> np.ndarray:
    return c.segments("alone", 0, c.n_segments, 1, context) + c.head("alone", 1, context)


def target_window_ms(c: Curves, gamma: int, context) -> np.ndarray:
    return c.segments("alone", 0, c.n_segments, gamma + 1, context) + c.head("alone", gamma + 1, context)


def sd_step_ms(c: Curves, gamma: int, context, draft: DraftCalls = PLAIN) -> np.ndarray:
    return target_window_ms(c, gamma, context) + draft.calls(gamma) * draft.ratio * c.draft("alone", 1, context)


def mirror_prefix_ms(c: Curves, exit_layer: int, gamma: int, context) -> np.ndarray:
    """The segments before ℓe and the exit head on γ+1 rows, alone (the draft waits for the exit)."""
    split = c.split_of[exit_layer]
    return c.segments("alone", 0, split, gamma + 1, context) + c.head("alone", gamma + 1, context, exit_head=True)


def mirror_step_ms(c: Curves, cfg: MirrorConfig, context, hit: np.ndarray, draft: DraftCalls = PLAIN) -> np.ndarray:
    split = c.split_of[cfg.exit_layer]
    prefix = mirror_prefix_ms(c, cfg.exit_layer, cfg.gamma, context)
    suffix = c.segments("together", split, c.n_segments, cfg.gamma + 1, context) + c.head("together", cfg.gamma + 1,
                                                                                            context)
    g = draft.calls(cfg.gamma)                                      # draft calls a rollout takes
    one = draft.ratio * c.draft("alone", 1, context)
    fresh = g * one
    if cfg.branch_budget == 0:
        return prefix + suffix + fresh
    wide = draft.ratio * c.draft("together", min(cfg.branch_budget, len(c.data["widths"])), context)
    done_before = np.minimum(np.floor(suffix / wide), g)          # branch calls finished at the verdict
    in_flight_end = np.where(done_before < g, (done_before + 1) * wide, suffix)
    hit_ready = np.where(done_before >= g, suffix, in_flight_end + (g - done_before - 1) * one)
    miss_ready = np.maximum(in_flight_end, suffix) + fresh
    ready = np.where(hit, hit_ready, miss_ready)
    return prefix + np.maximum(suffix, ready)
