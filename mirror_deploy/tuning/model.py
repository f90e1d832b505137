"""The latency model (costs/latency.py) over replayed calibration runs: tokens/s of a replay.

Each mode's Python time per step outside the runtimes (measured on a short probe run) is added per step.
Tokens per step come from the replay (1 + A), so tokens/s = Σ committed ÷ Σ step time: the same ratio
`tokens_per_s` reports for a real run.
"""
from __future__ import annotations

import numpy as np

from ..costs.curves import Curves
from ..costs.latency import target_window_ms
from .simulate import Steps


def tokens_per_s(steps: Steps, step_ms: np.ndarray, overhead_ms: float) -> float:
    total = float(np.sum(step_ms)) + overhead_ms * len(steps.start)
    return 1e3 * steps.tokens / total if total > 0 else 0.0


def zero_draft_bound(c: Curves, steps: Steps, gamma: int) -> float:
    """(1 + E[A]) / T_window as tokens/s: the target verifying windows with no draft time at all."""
    return 1e3 * steps.tokens / float(np.sum(target_window_ms(c, gamma, steps.start)))
