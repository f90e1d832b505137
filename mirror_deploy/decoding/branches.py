"""Which branches the draft rolls out while the target suffix runs (our DECISION in mirror-sd.md).

Branch (r, v): the target accepts r-1 draft tokens and corrects at depth r with v (r = γ+1 is the bonus
position). Its probability is estimated from the early exit: the chance of reaching depth r (the exit's
probability of each accepted draft token) times the exit's probability of v there. The top `budget`
branches by that estimate are rolled out; a candidate equal to the draft's own token at depth r ≤ γ
needs no branch (if it wins it is an acceptance, not a correction).
"""
from __future__ import annotations

import numpy as np


def rank_branches(exit_ids: np.ndarray, exit_logprobs: np.ndarray, drafts: list[int],
                  budget: int) -> list[tuple[int, int]]:
    """exit_ids/exit_logprobs: [γ+1, κ] for window positions 0..γ. Returns [(depth r, token v)]."""
    if budget <= 0:
        return []
    gamma = len(drafts)
    probs = np.exp(exit_logprobs.astype(np.float64))
    # Probability the exit gives each draft token; a token outside the top-κ gets half the κ-th mass.
    hit = exit_ids[:gamma] == np.asarray(drafts)[:, None]
    p_draft = np.where(hit.any(axis=1), (probs[:gamma] * hit).sum(axis=1), probs[:gamma, -1] * 0.5)
    reach = np.concatenate([[1.0], np.cumprod(p_draft)])            # reach[r-1] = P(depth r is reached)
    scores = reach[:, None] * probs
    scores[:gamma][hit] = -1.0                                      # the draft's own token: no branch
    order = np.argsort(-scores, axis=None, kind="stable")[:budget]
    return [(int(i // probs.shape[1]) + 1, int(exit_ids.flat[i])) for i in order if scores.flat[i] > 0]


def exit_hits(exit_ids: np.ndarray, target_tokens: np.ndarray) -> np.ndarray:
    """Per window position: is the target's final choice inside the early-exit top-κ?"""
    return (exit_ids == np.asarray(target_tokens)[:, None]).any(axis=1)
