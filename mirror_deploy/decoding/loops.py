"""The decoding loops (gpt-fast style ladder): autoregressive, then speculative (vanilla SD and
Mirror-SD share one loop; SD is Mirror without the early exit and without branches, in series)."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .branches import exit_hits
from .config import GenerationConfig
from .draft import DraftRunner, Window
from .metrics import RunMetrics, StepRecord
from .policy import HeuristicWindow
from .sampling import TARGET_STREAM, choose, keyed_rng, warp
from .target import TargetRunner
from .verify import verify_greedy, verify_match, verify_rejection
from .worker import DraftWorker, PartFailure, StepInputs


# Called with each step's committed tokens; a true return ends generation after this step (a stop
# string was seen, the client went away), with the loop's usual clean-up and figures.
Emit = Callable[[list[int]], bool | None]


def _target_call(fn, *args, part="target"):
    try:
        return fn(*args)
    except PartFailure:
        raise
    except Exception as error:
        raise PartFailure(part, "target device", error) from error


def _finish(new: list[int], produced: int, cfg: GenerationConfig, eos: set[int]) -> tuple[list[int], bool]:
    """Cut `new` at max_new_tokens and after an end-of-sequence token; say whether to stop."""
    room = cfg.max_new_tokens - produced
    cut = new[:room]
    if cfg.stop_at_eos:
        for i, tok in enumerate(cut):
            if tok in eos:
                return cut[:i + 1], True
    return cut, len(cut) >= room


def autoregressive(target: TargetRunner, prompt: list[int], cfg: GenerationConfig, eos: set[int],
                   emit: Emit) -> tuple[list[int], RunMetrics]:
    metrics = RunMetrics("ar", "-", prompt_tokens=len(prompt), gamma=0)
    t0 = time.perf_counter()
    _target_call(target.prefill, prompt[:-1])
    metrics.t_prefill = time.perf_counter() - t0
    out, root, step = [], prompt[-1], 0
    t_start = time.perf_counter()
    while True:
        t_step = time.perf_counter()
        pp = _target_call(target.prefix, [root], False)
        sfx, t_suffix = _target_call(target.suffix, pp)
        target.commit(pp, sfx, 1)
        token, _ = choose(sfx["logits"][0, -1], cfg, keyed_rng(cfg.seed, step, TARGET_STREAM))
        new, stop = _finish([token], len(out), cfg, eos)
        out += new
        stop = bool(emit(new)) or stop
        metrics.add(StepRecord(0, 1, t_prefix=pp.seconds, t_suffix=t_suffix, t_step=time.perf_counter() - t_step))
        root, step = token, step + 1
        if stop:
            break
    metrics.t_decode, metrics.new_tokens = time.perf_counter() - t_start, len(out)
    return out, metrics


def _verify(window, logits: np.ndarray, cfg: GenerationConfig, step: int) -> tuple[int, int]:
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


def speculative(target: TargetRunner, draft: DraftRunner, prompt: list[int], cfg: GenerationConfig,
                gamma: int, budget: int, eos: set[int], emit: Emit, policy=None) -> tuple[list[int], RunMetrics]:
    """`policy` chooses each next window's length (0: an autoregressive step) and Mirror's budget
    (decoding/policy.py); by default the heuristic within [1, γ]."""
    mirror = cfg.mode == "mirror"
    overlapped = mirror and cfg.schedule == "overlapped"
    metrics = RunMetrics(cfg.mode, cfg.schedule if mirror else "serial", prompt_tokens=len(prompt), gamma=gamma)
    worker = DraftWorker(draft, overlapped)
    policy = policy or HeuristicWindow(gamma, budget, cfg.adaptive_gamma)
    try:
        t0 = time.perf_counter()
        pending = worker.run_inline(draft.prefill, prompt[:-1])
        _target_call(target.prefill, prompt[:-1])
        if pending is not None:
            pending.result()
        first = policy.plan(len(prompt)).length
        if first:
            window = worker.run_inline(draft.rollout_fresh, prompt[-1], len(prompt) - 1, first, cfg, 0)
            window = window.result() if overlapped else window
        else:
            window, draft.pending = Window(), [prompt[-1]]   # the draft idles from the start
        draft.take_busy()
        metrics.t_prefill = time.perf_counter() - t0
        out, context_len, step = [], len(prompt), 0
        t_start = time.perf_counter()
        while True:
            t_step = time.perf_counter()
            root_pos = context_len - 1
            root = prompt[-1] if not out else out[-1]
            # The next window is planned now, before this step's verdict: Mirror's branches roll it
            # out while the suffix runs. Without a window to branch from, or none wanted, the draft
            # works after the verdict (or not at all).
            plan = policy.plan(context_len)
            branching = mirror and bool(window.tokens) and plan.length > 0 and draft.can_branch
            pp = _target_call(target.prefix, [root, *window.tokens], branching, part="target prefix")
            handle = None
            if branching:
                handle = worker.start(StepInputs(pp.exit_ids, pp.exit_logprobs, window.tokens, root_pos,
                                                 policy.gamma, plan.budget, step + 1, cfg, window, plan.length))
            sfx, t_suffix = _target_call(target.suffix, pp, part="target suffix")
            logits = sfx["logits"][0]
            accepted, correction = _verify(window, logits, cfg, step)
            t_wait = time.perf_counter()
            record = StepRecord(accepted, accepted + 1, t_prefix=pp.seconds, t_suffix=t_suffix,
                                window=len(window.tokens), source=window.source if window.tokens else "")
            if window.kinds and max(window.kinds):
                record.stream_checked, record.stream_accepted = stream_counts(window.kinds, accepted)
            # Beside the model (sd/mirror + lookup) the policy sizes the model's windows: lookup's are
            # valued by their own figures (lookup_beside.py), not counted as the model's.
            own = cfg.mode == "lookup" or window.source != "lookup"
            if own:
                policy.observe(accepted, len(window.tokens))
            if branching:
                result = worker.finish(handle, accepted, correction)
                policy.observe_rank(result.needed_rank)
                record.branches, record.reused, record.fallback = result.branches, result.reused, not result.reused
                record.t_draft, record.needed_rank = result.busy, result.needed_rank
                hits = exit_hits(pp.exit_ids, logits.argmax(axis=-1))
                record.exit_hits, record.exit_positions = int(hits.sum()), len(hits)
                next_window = result.window
            else:
                next_window, _ = draft.advance(accepted, correction, window.tokens, root_pos, plan.length, cfg,
                                               step + 1, None)
                record.t_draft = draft.take_busy()
                record.fallback = mirror and plan.length > 0     # a fresh rollout after the verdict
            record.t_exposed = time.perf_counter() - t_wait
            # Draft runtime time the step waited for: in series all of it; overlapped, only the wait
            # (which includes the draft's Python after the verdict, a slight overcount of runtime time).
            record.t_draft_on_path = record.t_exposed if branching and overlapped else record.t_draft
            target.commit(pp, sfx, accepted + 1)
            new, stop = _finish(window.tokens[:accepted] + [correction], len(out), cfg, eos)
            out += new
            context_len += accepted + 1
            stop = bool(emit(new)) or stop
            record.t_step = time.perf_counter() - t_step
            if own:
                policy.observe_time(len(window.tokens), plan, record.reused if branching else None, record.t_step,
                                    pp.seconds + (0.0 if mirror else t_suffix), context_len)
            draft.observe_step(record)
            metrics.add(record)
            window, step = next_window, step + 1
            if stop:
                break
        metrics.t_decode, metrics.new_tokens = time.perf_counter() - t_start, len(out)
        return out, metrics
    finally:
        worker.close()
