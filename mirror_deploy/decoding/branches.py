"""Which branches the draft rolls out while the target suffix runs (our DECISION in mirror-sd.md).

Branch (r, v): the target accepts r-1 draft tokens and corrects at depth r with v (r = γ+1 is the bonus
position). Its probability is estimated as P(reach r) · P(reject at r | reached) · P(v | rejected at r).
The chance of accepting the draft token at each depth blends the early exit's probability of that token
with the acceptance rate seen so far in this run (the logit lens is often poorly calibrated); which
token corrects is the exit's distribution without the draft's own token. The top `budget` branches are
rolled out; a candidate equal to the draft token at depth r ≤ γ needs no branch.
"""
from __future__ import annotations

import numpy as np


class AcceptanceHistory:
    """Per-depth acceptance rate given the depth was reached, with a Beta(1, 1) prior and decay so it
    follows the text as it changes."""

    def __init__(self, gamma: int, decay: float = 0.9):
        self.accepted = np.zeros(gamma)
        self.reached = np.zeros(gamma)
        self.decay = decay

    def observe(self, accepted: int) -> None:
        gamma = len(self.reached)
        depth = np.arange(1, gamma + 1)
        self.reached = self.decay * self.reached + (depth <= accepted + 1)
        self.accepted = self.decay * self.accepted + (depth <= accepted)

    def rates(self) -> np.ndarray:
        return (self.accepted + 1.0) / (self.reached + 2.0)


def rank_branches(exit_ids: np.ndarray, exit_logprobs: np.ndarray, drafts: list[int], budget: int,
                  history: np.ndarray | None = None) -> list[tuple[int, int]]:
    """exit_ids/exit_logprobs: [γ+1, κ] for window positions 0..γ; history: per-depth acceptance rates.
    Returns [(depth r, token v)], most likely first."""
    if budget <= 0:
        return []
    gamma = len(drafts)
    probs = np.exp(exit_logprobs.astype(np.float64))
    hit = exit_ids[:gamma] == np.asarray(drafts)[:, None]
    # The exit's probability of each draft token; outside the top-κ it is below the κ-th: take half.
    p_draft = np.where(hit.any(axis=1), (probs[:gamma] * hit).sum(axis=1), probs[:gamma, -1] * 0.5)
    accept = p_draft if history is None else 0.5 * (p_draft + history[:gamma])
    reach = np.concatenate([[1.0], np.cumprod(accept)])                  # reach[r-1] = P(depth r reached)
    reject = np.append(1.0 - accept, 1.0)                                 # the bonus depth always "corrects"
    given_reject = probs.copy()
    given_reject[:gamma] /= np.maximum(1.0 - p_draft, 1e-6)[:, None]
    scores = (reach * reject)[:, None] * given_reject
    scores[:gamma][hit] = -1.0                                            # the draft's own token: no branch
    order = np.argsort(-scores, axis=None, kind="stable")[:budget]
    return [(int(i // probs.shape[1]) + 1, int(exit_ids.flat[i])) for i in order if scores.flat[i] > 0]


def exit_hits(exit_ids: np.ndarray, target_tokens: np.ndarray) -> np.ndarray:
    """Per window position: is the target's final choice inside the early-exit top-κ?"""
    return (exit_ids == np.asarray(target_tokens)[:, None]).any(axis=1)
