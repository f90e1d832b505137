"""The speculative loop (vanilla SD and Mirror-SD share it; SD is Mirror without the early exit and
without branches, in series), as a ladder of the step's phases in docs/mirror-sd.md's pseudo-code:
plan → prefix (+ early-exit top-κ, branches sent) → suffix → verify → reuse or advance → commit.
Each phase fills its part of the step's record."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .branches import exit_hits
from .config import GenerationConfig
from .draft import DraftRunner, Window
from .metrics import RunMetrics, StepRecord
from .policy import HeuristicWindow
from .sampling import TARGET_STREAM, keyed_rng, warp
from .target import TargetRunner
from .verify import verify_greedy, verify_match, verify_rejection
from .worker import DraftWorker, StepInputs
from .loops import Emit, finish_tokens, target_call


def verify(window: Window, logits: np.ndarray, cfg: GenerationConfig, step: int) -> tuple[int, int]:
    """(A, c): the accepted draft tokens and the correction (or bonus) token."""
    if cfg.greedy:
        return verify_greedy(window.tokens, logits.argmax(axis=-1))
    p = warp(logits, cfg)
    rng = keyed_rng(cfg.seed, step, TARGET_STREAM)
    if cfg.verify_rule == "match":
        return verify_match(window.tokens, p, rng)
    return verify_rejection(window.tokens, p, window.probs, rng)


def stream_counts(kinds: list[int], accepted: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per kind of window token (0: a row's own, j: stream j): checked (up to the first rejection) and accepted."""
    width = max(kinds) + 1
    checked, taken = [0] * width, [0] * width
    for i, kind in enumerate(kinds[:accepted + 1]):
        checked[kind] += 1
        taken[kind] += i < accepted
    return tuple(checked), tuple(taken)


@dataclass
class Step:
    """One step in flight: its window, its plan for the next one, and the record its phases fill."""
    index: int
    window: Window
    root: int
    root_pos: int
    plan: object
    branching: bool
    started: float = field(default_factory=time.perf_counter)
    verified: float = 0.0
    record: StepRecord = field(default_factory=lambda: StepRecord(0, 0))


class Speculation:
    """The state a run carries from step to step: the two runners, the draft's worker, the window policy,
    the committed tokens and the figures."""

    def __init__(self, target: TargetRunner, draft: DraftRunner, prompt: list[int], cfg: GenerationConfig,
                 gamma: int, budget: int, eos: set[int], policy=None):
        self.target, self.draft, self.prompt, self.cfg, self.eos = target, draft, prompt, cfg, eos
        self.mirror = cfg.mode == "mirror"
        self.overlapped = self.mirror and cfg.schedule == "overlapped"
        self.metrics = RunMetrics(cfg.mode, cfg.schedule if self.mirror else "serial", prompt_tokens=len(prompt),
                                  gamma=gamma)
        self.worker = DraftWorker(draft, self.overlapped)
        self.policy = policy or HeuristicWindow(gamma, budget, cfg.adaptive_gamma)
        self.out: list[int] = []
        self.context_len = len(prompt)

    # ---- before the first step ----------------------------------------------------------------------
    def prefill(self) -> Window:
        """Both models take the prompt (the draft beside the target where it has its own device), then
        the draft writes the first window."""
        t0, prompt = time.perf_counter(), self.prompt
        pending = self.worker.run_inline(self.draft.prefill, prompt[:-1])
        target_call(self.target.prefill, prompt[:-1])
        if pending is not None:
            pending.result()
        first = self.policy.plan(len(prompt)).length
        if first:
            window = self.worker.run_inline(self.draft.rollout_fresh, prompt[-1], len(prompt) - 1, first, self.cfg, 0)
            window = window.result() if self.overlapped else window
        else:
            window, self.draft.pending = Window(), [prompt[-1]]   # the draft idles from the start
        self.draft.take_busy()
        self.metrics.t_prefill = time.perf_counter() - t0
        return window

    # ---- one step, phase by phase ---------------------------------------------------------------------
    def plan(self, window: Window) -> Step:
        """The next window is planned now, before this step's verdict: Mirror's branches roll it out while
        the suffix runs. Without a window to branch from, or none wanted, the draft works after the verdict."""
        plan = self.policy.plan(self.context_len)
        branching = self.mirror and bool(window.tokens) and plan.length > 0 and self.draft.can_branch
        root = self.prompt[-1] if not self.out else self.out[-1]
        step = Step(len(self.metrics.steps), window, root, self.context_len - 1, plan, branching)
        step.record.window, step.record.source = len(window.tokens), window.source if window.tokens else ""
        return step

    def prefix(self, step: Step):
        """Layers 1..ℓe over the window (and, when branching, the early-exit top-κ)."""
        pp = target_call(self.target.prefix, [step.root, *step.window.tokens], step.branching, part="target prefix")
        step.record.t_prefix = pp.seconds
        return pp

    def send_branches(self, step: Step, pp):
        """Mirror: the draft rolls out its budgeted branches from the early-exit candidates, beside the suffix."""
        if not step.branching:
            return None
        return self.worker.start(StepInputs(pp.exit_ids, pp.exit_logprobs, step.window.tokens, step.root_pos,
                                            self.policy.gamma, step.plan.budget, step.index + 1, self.cfg,
                                            step.window, step.plan.length))

    def suffix(self, step: Step, pp):
        """Layers ℓe+1..N and the head on the window's rows."""
        sfx, step.record.t_suffix = target_call(self.target.suffix, pp, part="target suffix")
        return sfx

    def verify(self, step: Step, logits: np.ndarray) -> tuple[int, int]:
        accepted, correction = verify(step.window, logits, self.cfg, step.index)
        step.verified = time.perf_counter()   # from here, time spent is the draft's exposed time
        record = step.record
        record.accepted, record.committed = accepted, accepted + 1
        if step.window.kinds and max(step.window.kinds):
            record.stream_checked, record.stream_accepted = stream_counts(step.window.kinds, accepted)
        # Beside the model (sd/mirror + lookup) the policy sizes the model's windows: lookup's are valued
        # by their own figures (lookup_beside.py), not counted as the model's.
        if self.owns(step):
            self.policy.observe(accepted, len(step.window.tokens))
        return accepted, correction

    def reuse_or_advance(self, step: Step, handle, pp, logits: np.ndarray, accepted: int, correction: int) -> Window:
        """The next window: a pre-computed branch on a hit (reuse), else a rollout after the verdict."""
        record = step.record
        if step.branching:
            result = self.worker.finish(handle, accepted, correction)
            self.policy.observe_rank(result.needed_rank)
            record.branches, record.reused, record.fallback = result.branches, result.reused, not result.reused
            record.t_draft, record.needed_rank = result.busy, result.needed_rank
            hits = exit_hits(pp.exit_ids, logits.argmax(axis=-1))
            record.exit_hits, record.exit_positions = int(hits.sum()), len(hits)
            window = result.window
        else:
            window, _ = self.draft.advance(accepted, correction, step.window.tokens, step.root_pos, step.plan.length,
                                           self.cfg, step.index + 1, None)
            record.t_draft = self.draft.take_busy()
            record.fallback = self.mirror and step.plan.length > 0     # a fresh rollout after the verdict
        record.t_exposed = time.perf_counter() - step.verified
        # Draft runtime time the step waited for: in series all of it; overlapped, only the wait (which
        # includes the draft's Python after the verdict, a slight overcount of runtime time).
        record.t_draft_on_path = record.t_exposed if step.branching and self.overlapped else record.t_draft
        return window

    def commit(self, step: Step, pp, sfx, accepted: int, correction: int, emit: Emit) -> bool:
        """Keep ŷ1..ŷA and c (the target's K/V trimmed to them), hand them out; True ends the run."""
        self.target.commit(pp, sfx, accepted + 1)
        new, stop = finish_tokens(step.window.tokens[:accepted] + [correction], len(self.out), self.cfg, self.eos)
        self.out += new
        self.context_len += accepted + 1
        stop = bool(emit(new)) or stop
        record = step.record
        record.t_step = time.perf_counter() - step.started
        if self.owns(step):
            self.policy.observe_time(len(step.window.tokens), step.plan, record.reused if step.branching else None,
                                     record.t_step, record.t_prefix + (0.0 if self.mirror else record.t_suffix),
                                     self.context_len)
        self.draft.observe_step(record)
        self.metrics.add(record)
        return stop

    def owns(self, step: Step) -> bool:
        return self.cfg.mode == "lookup" or step.window.source != "lookup"

    def close(self) -> None:
        self.worker.close()


def speculative(target: TargetRunner, draft: DraftRunner, prompt: list[int], cfg: GenerationConfig,
                gamma: int, budget: int, eos: set[int], emit: Emit, policy=None) -> tuple[list[int], RunMetrics]:
    """`policy` chooses each next window's length (0: an autoregressive step) and Mirror's budget
    (decoding/policy.py); by default the heuristic within [1, γ]."""
    run = Speculation(target, draft, prompt, cfg, gamma, budget, eos, policy)
    try:
        window = run.prefill()
        t_start = time.perf_counter()
        while True:
            step = run.plan(window)
            pp = run.prefix(step)
            branches = run.send_branches(step, pp)
            sfx = run.suffix(step, pp)
            logits = sfx["logits"][0]
            accepted, correction = run.verify(step, logits)
            window = run.reuse_or_advance(step, branches, pp, logits, accepted, correction)
            if run.commit(step, pp, sfx, accepted, correction, emit):
                break
        run.metrics.t_decode, run.metrics.new_tokens = time.perf_counter() - t_start, len(run.out)
        return run.out, run.metrics
    finally:
        run.close()
