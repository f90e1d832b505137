"""The autoregressive loop, and what every loop shares (speculative.py holds the speculative one)."""
from __future__ import annotations

import time
from typing import Callable

from .config import GenerationConfig
from .metrics import RunMetrics, StepRecord
from .sampling import TARGET_STREAM, choose, keyed_rng
from .target import TargetRunner
from .worker import PartFailure


# Called with each step's committed tokens; a true return ends generation after this step (a stop
# string was seen, the client went away), with the loop's usual clean-up and figures.
Emit = Callable[[list[int]], bool | None]


def target_call(fn, *args, part="target"):
    try:
        return fn(*args)
    except PartFailure:
        raise
    except Exception as error:
        raise PartFailure(part, "target device", error) from error


def finish_tokens(new: list[int], produced: int, cfg: GenerationConfig, eos: set[int]) -> tuple[list[int], bool]:
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
    target_call(target.prefill, prompt[:-1])
    metrics.t_prefill = time.perf_counter() - t0
    out, root, step = [], prompt[-1], 0
    t_start = time.perf_counter()
    while True:
        t_step = time.perf_counter()
        pp = target_call(target.prefix, [root], False)
        sfx, t_suffix = target_call(target.suffix, pp)
        target.commit(pp, sfx, 1)
        token, _ = choose(sfx["logits"][0, -1], cfg, keyed_rng(cfg.seed, step, TARGET_STREAM))
        new, stop = finish_tokens([token], len(out), cfg, eos)
        out += new
        stop = bool(emit(new)) or stop
        metrics.add(StepRecord(0, 1, t_prefix=pp.seconds, t_suffix=t_suffix, t_step=time.perf_counter() - t_step))
        root, step = token, step + 1
        if stop:
            break
    metrics.t_decode, metrics.new_tokens = time.perf_counter() - t_start, len(out)
    return out, metrics
