"""Verification rules. Each returns (accepted count A, correction-or-bonus token c)."""
from __future__ import annotations

import numpy as np

from .sampling import sample


def verify_greedy(drafts: list[int], target_argmax: np.ndarray) -> tuple[int, int]:
    """Accept the longest prefix equal to the target's argmax; c is the argmax after it."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == int(target_argmax[accepted]):
        accepted += 1
    return accepted, int(target_argmax[accepted])


def verify_match(drafts: list[int], p: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """The paper's operator: sample from the target at each position, accept while it equals the draft."""
    for i in range(len(drafts) + 1):
        token = sample(p[i], rng)
        if i == len(drafts) or token != drafts[i]:
            return i, token
    raise AssertionError("unreachable")


def verify_rejection(drafts: list[int], p: np.ndarray, q: list[np.ndarray],
                     rng: np.random.Generator) -> tuple[int, int]:
    """Standard speculative sampling: accept y_j w.p. min(1, p/q); on reject sample from
    norm(max(0, p - q)); after a full accept the bonus comes from p. A q of None is a one-hot draft
    (prompt lookup): accept w.p. p(y), else sample from p without y."""
    for j, y in enumerate(drafts):
        qj = q[j]
        if qj is None:
            if rng.random() < p[j][y]:
                continue
            residual = p[j].copy()
            residual[y] = 0.0
        elif rng.random() * qj[y] < p[j][y]:  # u < p/q without dividing by a zero q
            continue
        else:
            residual = np.maximum(p[j] - qj, 0.0)
        total = residual.sum()
        return j, sample(residual / total if total > 0 else p[j], rng)
    return len(drafts), sample(p[len(drafts)], rng)
