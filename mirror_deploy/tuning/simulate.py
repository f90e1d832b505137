"""Replay greedy speculative runs on calibration sequences, without running the models again.

Greedy SD and Mirror-SD commit the target's own greedy text, and a window's k-th draft token, given the
k-1 before it were accepted, is the draft's greedy choice on the true context. So the steps of a run
with window γ on a sequence (where each starts, how many drafts it accepts) follow exactly from the
teacher-forced agreement of the draft (teacher.Sequence.agree).

Branch coverage replays the draft worker's ranking (decoding/branches.rank_branches, with its own
acceptance history) on each step and asks where the needed branch (A+1, c) stands. The window rows up
to the rejection lie on the true context and are exact; rows after it follow a rejected draft token,
which the replay approximates by the true context's rows (they only rank branches deeper than the one
needed, whose weight falls geometrically with depth).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..decoding.branches import AcceptanceHistory, DraftView, rank_branches
from ..decoding.worker import needed_rank
from .teacher import Sequence

ALL = 1 << 30    # a budget that ranks every candidate


@dataclass
class Steps:
    """The steps of one replayed run over several sequences (concatenated)."""
    sequence: np.ndarray     # index of the sequence each step belongs to
    start: np.ndarray        # committed length n before the step (the root is at n-1)
    accepted: np.ndarray     # A
    committed: np.ndarray    # tokens the step adds to the output (A+1, cut at the sequence end)

    @property
    def tokens(self) -> int:
        return int(self.committed.sum())

    def subset(self, sequences: set[int]) -> "Steps":
        keep = np.isin(self.sequence, list(sequences))
        return Steps(self.sequence[keep], self.start[keep], self.accepted[keep], self.committed[keep])


def replay(sequences: list[Sequence], gamma: int) -> Steps:
    seq_idx, starts, accepted, committed = [], [], [], []
    for i, s in enumerate(sequences):
        agree, end, n = s.agree, len(s.tokens), s.prompt_len
        while n < end:
            a = 0
            while a < gamma and n + a < end and agree[n + a - s.prompt_len]:
                a += 1
            seq_idx.append(i), starts.append(n), accepted.append(a), committed.append(min(a + 1, end - n))
            n += a + 1
    return Steps(*(np.asarray(x, np.int64) for x in (seq_idx, starts, accepted, committed)))


def acceptance_per_depth(steps: Steps, gamma: int) -> list[float]:
    """P(draft token at depth d accepted | depth d reached), d = 1..γ."""
    out = []
    for d in range(1, gamma + 1):
        reached = steps.accepted >= d - 1
        out.append(float((steps.accepted[reached] >= d).mean()) if reached.any() else 0.0)
    return out


def needed_ranks(sequences: list[Sequence], steps: Steps, exit_layer: int, kappa: int, gamma: int) -> np.ndarray:
    """Per step: rank of the needed branch in the worker's ranking at (ℓe, κ, γ); -1 when absent."""
    ranks = np.full(len(steps.start), -1, np.int64)
    history: AcceptanceHistory | None = None
    for k, (i, n, a) in enumerate(zip(steps.sequence, steps.start, steps.accepted)):
        s = sequences[i]
        if k == 0 or steps.sequence[k - 1] != i:
            history = AcceptanceHistory(gamma)      # the worker starts each run afresh
        last = s.new - 1
        rows = np.minimum(np.arange(n, n + gamma + 1) - s.prompt_len, last)   # rows predicting n..n+γ
        drafts_rows = rows[:gamma]
        drafts = s.draft_top[drafts_rows].tolist()
        view = DraftView(s.draft_alt_ids[drafts_rows], s.draft_alt_probs[drafts_rows], s.draft_own[drafts_rows])
        ranked = rank_branches(s.exit_ids[exit_layer][rows, :kappa], s.exit_logprobs[exit_layer][rows, :kappa],
                               drafts, ALL, history, view, continuation=True)
        guess = int(s.draft_top[rows[gamma]]) if a == gamma else None
        if n + a < len(s.tokens):
            correction = s.tokens[n + a]
            ranks[k] = needed_rank(ranked, int(a), correction, gamma, guess)
        history.observe(int(a), None if a < gamma or guess is None else guess == s.tokens[min(n + a, len(s.tokens) - 1)])
    return ranks


def coverage(ranks: np.ndarray, budgets: list[int]) -> dict[int, float]:
    """Budget -> share of steps whose needed branch is among the first `budget` ranked."""
    return {b: float(((ranks >= 0) & (ranks < b)).mean()) if len(ranks) else 0.0 for b in budgets}
