"""Prompt lookup beside the draft model (`sd` / `mirror` with `GenerationConfig(lookup=True)`).

After each verdict the step has two candidate next windows: the draft model's (Mirror: a branch it
already rolled out beside the suffix, free; otherwise a fresh rollout, one draft call per token) and
prompt lookup's (free, from the committed text). Where lookup's window is worth more expected tokens
per second than the model's, it is verified instead and the model idles: the tokens committed meanwhile
wait in its `pending` list and are fed in one call when it drafts again, so that step costs no draft
call. A branch the model already holds is always kept (it cost nothing on the step's path).

Both values come from the run's own figures: acceptance per depth of each source (lookup's per match
length), the target's step time per window length, and the model's time per drafted token. Mirror's steps
that branch are timed apart from the others: where draft and target share cores (the `cpu` profile) the
branches slow the suffix, so a branch already rolled out is not free, and a plain step or a lookup window
(which never branch) must not be priced at that slower time. Exactness is untouched: whichever source
proposed it, the target verifies the window with the same rule (a lookup token is a one-hot draft).

Where neither window is worth more than a plain autoregressive step (the model's drafting measured
dearer than what it saves, and no lookup match worth a window), the step is autoregressive and the model
idles; every PROBE_EVERY such steps it drafts once more, so a model that would pay again is noticed.
"""
from __future__ import annotations

import time

import numpy as np

from .config import GenerationConfig
from .draft import BranchRun, DraftRunner, Window
from .lookup import LookupDraft, StepCosts
from .policy import DecayedRate

MODEL_PRIOR_ACCEPTANCE = 0.7   # the real 0.5B draft accepts ~80% of first tokens (tune's replays)
PROBE_EVERY = 16               # autoregressive steps chosen over the model before it drafts again
IDLE_BELOW = 0.9               # the model idles when its window is worth less than this share of a plain step


class LookupBeside:
    """The draft runner's interface over the model (`model`) and prompt lookup (`lookup`, whose
    `window` policy values lookup windows); `source` says who proposed the window being verified."""

    can_branch = property(lambda self: self.source == "model")   # Mirror branches from model windows only

    def __init__(self, model: DraftRunner, lookup: LookupDraft, gamma: int):
        if lookup.window is None:
            raise ValueError("lookup beside the draft needs a LookupWindow to value its windows")
        self.model, self.lookup, self.chooser = model, lookup, lookup.window
        self.static_seq, self.graph = model.static_seq, model.graph
        self.model_accept = DecayedRate(np.full(gamma, MODEL_PRIOR_ACCEPTANCE))
        self.reset()

    def _fresh_costs(self) -> StepCosts:
        prior = self.chooser.costs.prior
        return StepCosts(len(prior) - 1, prior, absolute=self.chooser.costs.absolute)

    def reset(self) -> None:
        self.model.reset()
        self.lookup.reset()
        self.source = "model"
        self.model_token_s: float | None = None   # decayed mean seconds of one fresh draft token
        self.idle_steps = 0                         # autoregressive steps chosen over the model in a row
        self.mirror = False                         # this run's model windows branch (Mirror)
        self.branched = self._fresh_costs()         # seconds of steps that ran Mirror's branches beside them

    @property
    def pending(self) -> list[int]:
        return self.model.pending

    @pending.setter
    def pending(self, tokens: list[int]) -> None:   # the loop's: the run starts without a window
        self.model.pending, self.lookup.pending = list(tokens), list(tokens)

    def take_busy(self) -> float:
        return self.model.take_busy() + self.lookup.take_busy()

    def prefill(self, tokens: list[int], start: int = 0) -> None:
        self.lookup.prefill(tokens, start)
        self.model.prefill(tokens, start)

    def roll_out_branches(self, *args, **kwargs) -> BranchRun:
        return self.model.roll_out_branches(*args, **kwargs)

    def observe_step(self, record) -> None:
        """A finished step's time on the path, by the length of the window it verified: the target's, plus
        for a step that branched the wait for its branches."""
        if record.branches:
            self.branched.add(record.window, record.t_prefix + record.t_suffix + record.t_draft_on_path)
        else:
            self.chooser.costs.add(record.window, record.t_prefix + record.t_suffix)

    def _seconds(self, branched: bool) -> np.ndarray:
        """[L] a step's seconds, branching beside it or not. Without evidence of one kind: tune's curves
        where tuned (the target alone), else the other kind's. (A plain step priced at the branching
        steps' time made lookup lose every comparison, so no plain step was ever timed: mt_bench ran 36
        branching steps and no lookup window, where lookup alone took 19.)"""
        own, other = (self.branched, self.chooser.costs) if branched else (self.chooser.costs, self.branched)
        return (own if own.seen.any() or own.absolute or not other.seen.any() else other).seconds()

    # -- the choice ---------------------------------------------------------------------------
    def _lookup_window(self) -> tuple[Window, float]:
        """Lookup's best window (at most γ, whatever the model's next length) and its value (expected
        tokens per second; 0 without a window)."""
        window, n = self.lookup.propose(self.chooser.gamma)
        keep = len(window.tokens)
        return window, self._value(self.chooser.expected_tokens(n)[keep], keep, 0.0) if keep else 0.0

    def _model_value(self, length: int, free: bool = False) -> float:
        """The model's next window of `length`: a branch already rolled out (`free`) costs no draft time
        on the step's path, a fresh rollout one draft call per token."""
        if length == 0:
            return self._value(1.0, 0, 0.0)
        expected = self.model_accept.expected_tokens()[length]
        return self._value(expected, length, 0.0 if free else length * (self.model_token_s or 0.0), self.mirror)

    def _model_pays(self, length: int, free: bool) -> bool:
        """Is the model's window worth more than an autoregressive step (or is a probe due)? It idles
        only when clearly not (IDLE_BELOW): an idle model learns nothing until its next probe, so a
        near-tie decided by noise cost up to PROBE_EVERY steps of drafting that paid (translation). A
        branch already rolled out is weighed too: its steps are priced at the branching steps' time."""
        if not length or self._model_value(length, free) >= IDLE_BELOW * self._model_value(0):
            self.idle_steps = 0
            return True
        self.idle_steps += 1
        if self.idle_steps >= PROBE_EVERY:
            self.idle_steps = 0
            return True
        return False

    def _value(self, expected: float, length: int, draft_s: float, branched: bool = False) -> float:
        step = self._seconds(branched)
        return expected / (step[min(length, len(step) - 1)] + draft_s)

    # -- the loop's calls ---------------------------------------------------------------------
    def rollout_fresh(self, root: int, root_pos: int, gamma: int, cfg: GenerationConfig, window_id: int,
                      missing: list[int] = ()) -> Window:
        self.mirror = cfg.mode == "mirror"
        self.lookup.index.extend([*missing, root])
        window, value = self._lookup_window()
        if window.tokens and value >= self._model_value(gamma):
            self.model.pending, self.source = [*missing, root], "lookup"
            return window
        self.source = "model"
        return self.model.rollout_fresh(root, root_pos, gamma, cfg, window_id, missing)

    def advance(self, accepted: int, correction: int, drafts: list[int], root_pos: int, length: int,
                cfg: GenerationConfig, window_id: int, run: BranchRun | None = None) -> tuple[Window, bool]:
        self.mirror = cfg.mode == "mirror"
        if drafts:
            if self.source == "lookup":
                self.chooser.observe(accepted, len(drafts))
            else:
                self.model_accept.observe_window(accepted, len(drafts))
        self.lookup.commit(accepted, correction, drafts)
        branch = run.branches.get((accepted + 1, correction)) if run is not None else None
        free = self.source == "model" and branch is not None and len(branch.window.tokens) == length
        window, value = self._lookup_window()
        if window.tokens and value >= self._model_value(length, free):
            self._idle_model(accepted, correction, drafts, root_pos, cfg, window_id, run)
            self.source = "lookup"
            return window, False
        if not self._model_pays(length, free):    # an autoregressive step: the model idles
            self._idle_model(accepted, correction, drafts, root_pos, cfg, window_id, run)
            self.source = "model"
            return Window(), False
        if self.source == "lookup":       # the model idled through a lookup window: catch it up
            self.model.pending.extend([*drafts[:accepted], correction])
            self.source = "model"
            if not length:
                return Window(), False
            # Not timed: this call also feeds the tokens committed while the model idled, a cost of the
            # lookup windows already taken; counted per drafted token it made the model look dearer than
            # it is, so it idled more (translation, qa: sd+lookup ran as lookup alone).
            return self.model._resume(root_pos + accepted + 1, length, cfg, window_id), False
        t0 = time.perf_counter()
        window, reused = self.model.advance(accepted, correction, drafts, root_pos, length, cfg, window_id, run)
        if not reused and length:
            self._time_model(time.perf_counter() - t0, length)
        return window, reused

    def _idle_model(self, accepted, correction, drafts, root_pos, cfg, window_id, run) -> None:
        """Commit the verdict on the model's side without drafting: it keeps the tokens pending."""
        if self.source == "lookup":
            self.model.pending.extend([*drafts[:accepted], correction])
        else:
            self.model.advance(accepted, correction, drafts, root_pos, 0, cfg, window_id, run)

    def _time_model(self, seconds: float, tokens: int) -> None:
        per_token = seconds / tokens
        self.model_token_s = per_token if self.model_token_s is None else 0.8 * self.model_token_s + 0.2 * per_token
