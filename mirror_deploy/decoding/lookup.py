"""Prompt lookup: drafts that cost nothing. The next window is what followed the most recent earlier
occurrence of the context's last n tokens (n = max_ngram down to min_ngram), in the prompt or the output
so far; no draft model runs.

`LookupDraft` stands where the draft runner stands in the speculative loop (loops.py), so the target
verifies lookup windows exactly as it verifies a model's: a proposal is a draft whose distribution is
one-hot (its `probs` are None, which the rejection rule reads as one-hot), so greedy output equals
autoregressive decoding and sampling keeps the target's distribution. Where nothing matches the window
is empty: a plain autoregressive step.

How much of a proposal to verify is `LookupWindow`'s choice: a window of L tokens is worth its expected
tokens (1 + the run's acceptance per depth, kept per match length n, since a 4-gram match is copied far
more reliably than a 1-gram one) over what a step of L+1 rows costs, measured on the run's own steps
(prior: `tune`'s curves on a tuned artifact, else a per-row slope). On a target whose rows are dear (a
CPU at 4 bits: 8 rows cost ~2.3x one), a weak match is worth no window at all.
"""
from __future__ import annotations

import time

import numpy as np

from ..costs import latency
from ..costs.curves import Curves
from .config import GenerationConfig
from .draft import Window
from .policy import DecayedRate, Plan

MAX_NGRAM, MIN_NGRAM = 4, 1
# Prior acceptance of a lookup token given the one before it was accepted, by match length n (1..4):
# replays of the real 1.5B's own greedy text (SpecBench, 12 prompts) accepted about 1.5 tokens per call
# at k=8 overall, far more where the answer copies the prompt. The run's own counts take over quickly.
PRIOR_ACCEPTANCE = {1: 0.25, 2: 0.4, 3: 0.55, 4: 0.65}
# Prior cost of one more verified row, as a share of a one-row step, where nothing was tuned: the real
# pair's fp32 target (8 rows 1.95x one) and int4 target (2.28x).
PRIOR_ROW_COST = 0.15


class NgramIndex:
    """For every n-gram (min_n..max_n) of the history, the position just after its latest occurrence,
    kept up to date as tokens are appended (O(max_n) per token). The context's own last n-gram is
    registered only once a token follows it, so a lookup never matches itself."""

    def __init__(self, max_n: int = MAX_NGRAM, min_n: int = MIN_NGRAM):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n (got {min_n}, {max_n})")
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []
        self.after: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.tokens)             # the n-grams ending just before `token` now have a follower
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self.after[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(token)

    def propose(self, length: int) -> tuple[list[int], int]:
        """Up to `length` tokens that followed the longest matching suffix, and that suffix's n (0: none)."""
        if length <= 0:
            return [], 0
        size = len(self.tokens)
        for n in range(min(self.max_n, size), self.min_n - 1, -1):
            start = self.after.get(tuple(self.tokens[size - n:]))
            if start is not None:
                return self.tokens[start:start + length], n
        return [], 0


class StepCosts:
    """Seconds of a step that verifies L draft tokens (L = 0: autoregressive), from the run's own steps:
    decayed means, each starting from a prior with the weight of two observations: the tuned curves' seconds
    (`absolute`), else a ratio to the one-row step (a per-row slope)."""

    def __init__(self, gamma: int, prior_ratio: np.ndarray | None = None, decay: float = 0.9, weight: float = 2.0,
                 absolute: bool = False):
        self.prior = np.asarray(prior_ratio if prior_ratio is not None
                                else 1.0 + PRIOR_ROW_COST * np.arange(gamma + 1), np.float64)
        self.absolute = absolute   # the prior is in seconds (tune's curves), not only a ratio
        self.sums, self.seen = np.zeros(gamma + 1), np.zeros(gamma + 1)
        self.decay, self.weight = decay, weight

    def add(self, length: int, seconds: float) -> None:
        if 0 <= length < len(self.sums) and seconds > 0:
            self.sums[length] = self.decay * self.sums[length] + seconds
            self.seen[length] = self.decay * self.seen[length] + 1.0

    def seconds(self) -> np.ndarray:
        """[L] a step's seconds: measured where the run has seen that length, elsewhere the prior scaled to
        what the measured lengths imply (before any step: the prior itself, seconds only if `absolute`)."""
        if not self.seen.any():
            return self.prior.copy()
        base = self.sums.sum() / (self.seen * self.prior).sum()
        return (self.sums + self.weight * self.prior * base) / (self.seen + self.weight)

    def relative(self) -> np.ndarray:
        """[L] a step's cost over a one-row step's."""
        seconds = self.seconds()
        return seconds / seconds[0]


def tuned_step_seconds(tuning: dict, gamma: int) -> np.ndarray:
    """[L] seconds of a step verifying L tokens (the target alone), from `tune`'s curves at the middle of
    the contexts it measured; lengths past the rows it measured grow by its last row's cost."""
    c = Curves(tuning["curves_ms"])
    ctx = np.asarray(float(np.mean(c.data["contexts"])))
    over = tuning["overhead_ms_per_step"]
    rows = len(c.data["alone"][0]["head"])            # the most rows measured
    ms = [float(latency.ar_step_ms(c, ctx)) + over["ar"]]
    for length in range(1, min(gamma, rows - 1) + 1):
        ms.append(float(latency.target_window_ms(c, length, ctx)) + over["sd"])
    step = ms[-1] - ms[-2] if len(ms) > 1 else PRIOR_ROW_COST * ms[0]
    ms += [ms[-1] + step * k for k in range(1, gamma + 2 - len(ms))]
    return np.asarray(ms) / 1000.0


class LookupWindow:
    """The window policy of lookup windows (the speculative loop's policy interface): the loop's plan
    only caps the window at γ; `choose` cuts each proposal to the length with the most expected tokens
    per second, by match length n and the run's measured step costs (0: an autoregressive step)."""

    def __init__(self, gamma: int, prior_ratio: np.ndarray | None = None, prior_seconds: np.ndarray | None = None):
        self.gamma, self.budget = gamma, 0
        self.costs = (StepCosts(gamma, prior_seconds, absolute=True) if prior_seconds is not None
                      else StepCosts(gamma, prior_ratio))
        self.accept = {n: DecayedRate(np.full(gamma, p)) for n, p in PRIOR_ACCEPTANCE.items()}
        self.last_n = 0

    def plan(self, context: int) -> Plan:
        return Plan(self.gamma, 0)

    def expected_tokens(self, n: int) -> np.ndarray:
        """L -> 1 + E[accepted] for a window of L from a match of length n."""
        return self.accept[min(n, MAX_NGRAM)].expected_tokens()

    def choose(self, proposal: list[int], n: int) -> int:
        """How many of the proposal's tokens to verify."""
        self.last_n = n
        if not proposal:
            return 0
        upto = len(proposal) + 1
        value = self.expected_tokens(n)[:upto] / self.costs.relative()[:upto]
        return int(np.argmax(value))

    def observe(self, accepted: int, drafted: int) -> None:
        if drafted and self.last_n:
            self.accept[min(self.last_n, MAX_NGRAM)].observe_window(accepted, drafted)

    def observe_rank(self, rank: int) -> None:
        pass

    def observe_time(self, drafted: int, plan: Plan, reused: bool | None, step_s: float, target_s: float,
                     context: int) -> None:
        self.costs.add(drafted, step_s)


class LookupDraft:
    """The draft runner's interface (prefill, rollout_fresh, advance, take_busy, pending), backed by an
    n-gram index instead of a model: the speculative loop runs it unchanged, in series. `window` (a
    LookupWindow) cuts each proposal; without one the whole proposal up to the planned length is verified."""

    static_seq = None
    can_branch = False

    def __init__(self, window: LookupWindow | None = None, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
        self.window, self.max_ngram, self.min_ngram = window, max_ngram, min_ngram
        self.reset()

    def reset(self) -> None:
        self.index = NgramIndex(self.max_ngram, self.min_ngram)
        self.pending: list[int] = []   # the loop sets it when the run starts without a window
        self.busy = 0.0
        self.proposed = self.accepted = self.windows = 0

    def take_busy(self) -> float:
        busy, self.busy = self.busy, 0.0
        return busy

    def observe_step(self, record) -> None:
        pass   # lookup mode: the loop's policy (a LookupWindow) times the steps

    def prefill(self, tokens: list[int], start: int = 0) -> None:
        self.index.extend(list(tokens))

    def propose(self, length: int) -> tuple[Window, int]:
        """The next window from the committed history (the index holds it through the root), and the
        length n of the match it came from (0: none)."""
        t0 = time.perf_counter()
        tokens, n = self.index.propose(length)
        if self.window is not None:
            tokens = tokens[:self.window.choose(tokens, n)]
        self.busy += time.perf_counter() - t0
        if tokens:
            self.windows += 1
            self.proposed += len(tokens)
        return Window(tokens=list(tokens), probs=[None] * len(tokens), source="lookup"), n

    def rollout_fresh(self, root: int, root_pos: int, gamma: int, cfg: GenerationConfig, window_id: int,
                      missing: list[int] = ()) -> Window:
        self.index.extend([*missing, root])
        return self.propose(gamma)[0]

    def commit(self, accepted: int, correction: int, drafts: list[int]) -> None:
        """The step's verdict: its accepted drafts and the correction join the history."""
        self.accepted += accepted
        self.index.extend([*self.pending, *drafts[:accepted], correction])
        self.pending = []

    def advance(self, accepted: int, correction: int, drafts: list[int], root_pos: int, length: int,
                cfg: GenerationConfig, window_id: int, run=None) -> tuple[Window, bool]:
        """Commit the accepted proposals and the correction, then look up the next window."""
        self.commit(accepted, correction, drafts)
        return self.propose(length)[0], False
