"""Which branches the draft rolls out while the target suffix runs (our DECISION in mirror-sd.md).

Branch (r, v): the target accepts r-1 draft tokens and corrects at depth r with v (r = γ+1 is the bonus
position). Its probability is estimated as P(reach r) · P(reject at r | reached) · P(v | rejected at r):
- accepting the draft token at a depth: the acceptance rate seen so far in this run at that depth, with
  the draft's own probability of its token as the prior (worth two observations). The early exit is not
  used here: it measures agreement with the draft at layer ℓe, and the logit lens can be poorly
  calibrated (16% top-8 hits at N/2 on Qwen2.5-Coder-1.5B, which made every deep branch look hopeless);
- which token corrects: the mean of the exit's and the draft's distributions without the draft token.
Besides the exit's top-κ, the draft's own runner-up tokens are candidates, and so is the
*continuation*: the bonus branch rooted at the draft's own guess for the token after y_γ (known only
once y_γ is fed, so it is chosen here by its expected value and rooted during the rollout).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONTINUATION = (-1, -1)   # stands for the continuation branch in a ranking


class AcceptanceHistory:
    """Per-depth acceptance rate given the depth was reached, and how often the draft's guess for the
    bonus token was right; Beta(1, 1) priors, with decay so it follows the text as it changes."""

    def __init__(self, gamma: int, decay: float = 0.9):
        self.accepted = np.zeros(gamma)
        self.reached = np.zeros(gamma)
        self.bonus_right = self.bonus_seen = 0.0
        self.decay = decay

    def observe(self, accepted: int, bonus_guess_right: bool | None = None, window: int | None = None) -> None:
        """`window`: the window's length, when shorter than the history (depths past it were not drafted)."""
        depth = np.arange(1, len(self.reached) + 1)
        self.reached = self.decay * self.reached + (depth <= min(accepted + 1, window or len(self.reached)))
        self.accepted = self.decay * self.accepted + (depth <= accepted)
        if bonus_guess_right is not None:
            self.bonus_seen = self.decay * self.bonus_seen + 1
            self.bonus_right = self.decay * self.bonus_right + bonus_guess_right

    def rates(self, prior: np.ndarray | None = None, weight: float = 2.0) -> np.ndarray:
        full = np.full(len(self.reached), 0.5)
        if prior is not None:   # the draft's confidence for the depths this window has
            full[:len(prior)] = prior[:len(full)]
        prior = full
        return (self.accepted + weight * prior) / (self.reached + weight)

    def bonus_rate(self) -> float:
        return (self.bonus_right + 1.0) / (self.bonus_seen + 2.0)


@dataclass
class DraftView:
    """What the draft knew when it wrote the window: its runner-up tokens at each position."""
    alt_ids: np.ndarray      # [γ, m]
    alt_probs: np.ndarray    # [γ, m]
    own: np.ndarray          # [γ] the draft's probability of its own token


def draft_view(top_ids, top_probs, tokens: list[int], sampled=None, m: int = 4) -> DraftView:
    """The draft's top-m rows as its graph returned them. Its own token's probability comes from
    them when it is among the top-m (always, greedy); otherwise from the distribution it was sampled
    from, when sampling; else 0 (it ranked below the graph's top-m)."""
    ids, probs = np.asarray(top_ids), np.asarray(top_probs, np.float64)
    own = np.zeros(len(tokens))
    for i, token in enumerate(tokens):
        hit = np.flatnonzero(ids[i] == token)
        if hit.size:
            own[i] = probs[i, hit[0]]
        elif sampled is not None and sampled[i] is not None:
            own[i] = sampled[i][token]
    return DraftView(ids[:, :m], probs[:, :m], own)


def rank_branches(exit_ids: np.ndarray, exit_logprobs: np.ndarray, drafts: list[int], budget: int,
                  history: AcceptanceHistory | None = None, view: DraftView | None = None,
                  continuation: bool = False) -> list[tuple[int, int]]:
    """exit_ids/exit_logprobs: [γ+1, κ] for window positions 0..γ. Returns up to `budget` branches,
    most likely first; `CONTINUATION` in the list stands for the continuation branch."""
    if budget <= 0:
        return []
    gamma = len(drafts)
    exit_p = np.exp(exit_logprobs.astype(np.float64))
    prior = view.own if view is not None else None
    accept = history.rates(prior)[:gamma] if history is not None else (prior if prior is not None
                                                                        else np.full(gamma, 0.5))
    reach = np.concatenate([[1.0], np.cumprod(accept)])             # reach[r-1] = P(depth r reached)

    scores: dict[tuple[int, int], float] = {}
    sources = 2 if view is not None else 1
    for r in range(1, gamma + 2):
        mix: dict[int, float] = {}
        for v, p in zip(exit_ids[r - 1].tolist(), exit_p[r - 1].tolist()):
            mix[v] = mix.get(v, 0.0) + p / sources
        if view is not None and r <= gamma:
            for v, p in zip(view.alt_ids[r - 1].tolist(), view.alt_probs[r - 1].tolist()):
                mix[v] = mix.get(v, 0.0) + p / sources
        if r <= gamma:
            own = mix.pop(drafts[r - 1], 0.0)   # the draft's own token: an acceptance, no branch
            weight = reach[r - 1] * (1.0 - accept[r - 1]) / max(1.0 - own, 1e-6)
        else:
            weight = reach[gamma] * (0.5 if continuation else 1.0)   # the guess takes the other half
        for v, p in mix.items():
            scores[(r, v)] = weight * p
    if continuation:
        scores[CONTINUATION] = reach[gamma] * (history.bonus_rate() if history is not None else 0.5)
    ranked = sorted(scores, key=scores.get, reverse=True)
    return [key for key in ranked[:budget] if scores[key] > 0]


def exit_hits(exit_ids: np.ndarray, target_tokens: np.ndarray) -> np.ndarray:
    """Per window position: is the target's final choice inside the early-exit top-κ?"""
    return (exit_ids == np.asarray(target_tokens)[:, None]).any(axis=1)
