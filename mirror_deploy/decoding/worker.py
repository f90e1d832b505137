"""The draft device's side of a Mirror-SD step, run on its own thread (overlapped) or inline (serial).

Only token ids and log-probs cross: the early-exit top-κ and the window go in, the verdict (A, c) goes
in when the target has it, and the next window comes out.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import MirrorDeployError
from .branches import CONTINUATION, AcceptanceHistory, draft_view, rank_branches
from .config import GenerationConfig
from .draft import BranchRun, DraftRunner, Window

_ABORT = object()
ALL_BRANCHES = 1 << 30


class PartFailure(MirrorDeployError):
    def __init__(self, part: str, device: str, error: BaseException):
        super().__init__(f"the {part} ({device}) failed: {type(error).__name__}: {error}",
                         "check the device and the artifact (`mirror-deploy check DIR`)")
        self.part = part


@dataclass
class DraftResult:
    window: Window
    reused: bool
    branches: int
    busy: float          # draft device time this step
    resolved_at: float   # perf_counter when the verdict reached the draft side
    needed_rank: int = -1  # where the needed branch (A+1, c) stood in the ranking (-1: absent)


@dataclass
class StepInputs:
    exit_ids: np.ndarray
    exit_logprobs: np.ndarray
    drafts: list[int]
    root_pos: int
    gamma: int                           # the run's largest window (the acceptance history's depth)
    budget: int
    window_id: int
    cfg: GenerationConfig
    draft_window: object | None = None   # the Window whose tokens are verified (its draft top-m)
    length: int | None = None            # the next window's length (default: this window's)


class DraftWorker:
    def __init__(self, draft: DraftRunner, overlapped: bool):
        self.draft = draft
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="draft-device") if overlapped else None
        self._verdict = None
        self._ready = threading.Event()
        self._run: BranchRun | None = None
        self._ranked: list[tuple[int, int]] = []
        self._inputs: StepInputs | None = None
        self.history: AcceptanceHistory | None = None

    # -- called by the target side -------------------------------------------------------------
    def start(self, inputs: StepInputs):
        """Begin the branch rollouts for the next window (returns at once when overlapped)."""
        self._verdict, self._inputs = None, inputs
        self._ready.clear()
        if self.pool is not None:
            return self.pool.submit(self._guarded, self._whole_step)
        self._guarded(self._branch_phase)     # serial ablation: all branch work before the suffix
        return None

    def finish(self, handle: Future | None, accepted: int, correction: int) -> DraftResult:
        """Deliver the verdict and wait for the next window."""
        self._verdict = (accepted, correction)
        self._ready.set()
        if handle is not None:
            return handle.result()
        return self._guarded(self._advance_phase)

    def run_inline(self, fn, *args):
        """Draft work outside a step (prefill, first window), on the draft thread when overlapped."""
        if self.pool is None:
            return self._guarded(fn, *args)
        return self.pool.submit(self._guarded, fn, *args)

    def close(self) -> None:
        self._verdict = _ABORT          # wakes a worker waiting for a verdict that will never come
        self._ready.set()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    # -- draft thread --------------------------------------------------------------------------
    def _guarded(self, fn, *args):
        try:
            return fn(*args)
        except MirrorDeployError:
            raise
        except Exception as error:  # a device error must name the part, never hang the other side
            raise PartFailure("draft", getattr(self.draft.graph, "device", "?"), error) from error

    def _poll(self):
        verdict = self._verdict
        return None if verdict is None or verdict is _ABORT else verdict

    def _branch_phase(self) -> None:
        s = self._inputs
        if self.history is None or len(self.history.reached) != s.gamma:
            self.history = AcceptanceHistory(s.gamma)
        w = s.draft_window
        view = draft_view(w.top_ids, w.top_probs, w.tokens, w.probs) if w is not None and w.top_ids else None
        # The whole ranking is kept, so the needed branch's rank is known past the budget too (the
        # policy learns from it what a larger budget would have caught).
        self._ranked = rank_branches(s.exit_ids, s.exit_logprobs, s.drafts, ALL_BRANCHES, self.history, view,
                                     continuation=True)
        chosen = self._ranked[:s.budget]
        poll = self._poll if self.pool is not None else (lambda: None)
        self._run = self.draft.roll_out_branches(chosen, s.drafts, s.root_pos, s.cfg, s.window_id, poll, s.length)

    def _advance_phase(self) -> DraftResult | None:
        self._ready.wait()
        if self._verdict is _ABORT:
            return None
        resolved_at = time.perf_counter()
        s = self._inputs
        accepted, correction = self._verdict
        guess = self._run.guess if self._run is not None else None
        full = accepted == len(s.drafts)
        self.history.observe(accepted, None if not full or guess is None else guess == correction, len(s.drafts))
        window, reused = self.draft.advance(accepted, correction, s.drafts, s.root_pos, s.length or len(s.drafts),
                                            s.cfg, s.window_id, self._run)
        return DraftResult(window, reused, len(self._run.branches), self.draft.take_busy(), resolved_at,
                           needed_rank(self._ranked, accepted, correction, len(s.drafts), guess))

    def _whole_step(self) -> DraftResult | None:
        self._branch_phase()
        return self._advance_phase()


def needed_rank(ranked: list[tuple[int, int]], accepted: int, correction: int, gamma: int,
                guess: int | None) -> int:
    """Index of the branch the verdict needs in `ranked`, or -1; the continuation counts when the
    draft's guess for the bonus token was the target's."""
    needed = (accepted + 1, correction)
    for i, key in enumerate(ranked):
        if key == needed or (key == CONTINUATION and accepted == gamma and guess == correction):
            return i
    return -1
