"""Structured per-step and per-run figures (what `--stats` and `--json` print)."""
from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class StepRecord:
    accepted: int                 # draft tokens accepted (A)
    committed: int                # tokens committed this step (A + 1)
    window: int = 0               # draft tokens verified this step (γ of this window)
    source: str = ""              # who proposed them: draft (the model) or lookup; "" for none
    branches: int = 0             # branches the draft rolled out
    reused: bool = False          # next window came from a pre-computed branch
    fallback: bool = False        # next window needed a fresh rollout
    exit_hits: int = 0            # window positions whose final token was in the early-exit top-κ
    exit_positions: int = 0
    t_prefix: float = 0.0
    t_suffix: float = 0.0
    t_draft: float = 0.0          # draft device busy time for this step
    t_exposed: float = 0.0        # target side waiting on the draft after verification
    t_draft_on_path: float = 0.0  # draft runtime time that the step waited for (all of it when serial)
    t_step: float = 0.0
    stream_checked: tuple[int, ...] = ()   # per kind of window token (0: a draft row's own, j: stream j),
    stream_accepted: tuple[int, ...] = ()  # how many the target checked / accepted this step
    needed_rank: int | None = None  # mirror: rank of the needed branch (A+1, c) in the draft's ranked list
                                    # (-1: not in it); `mirror-deploy tune` measures branch coverage with it


@dataclass
class RunMetrics:
    mode: str
    schedule: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    t_prefill: float = 0.0
    t_decode: float = 0.0
    gamma: int = 0
    steps: list[StepRecord] = field(default_factory=list)

    def add(self, step: StepRecord) -> None:
        self.steps.append(step)

    def summary(self) -> dict:
        s = self.steps
        n = max(len(s), 1)
        total = lambda attr: float(sum(getattr(x, attr) for x in s))
        positions = total("exit_positions")
        windows = max(sum(x.reused or x.fallback for x in s), 1)
        hist = np.bincount([x.accepted for x in s], minlength=self.gamma + 1).tolist() if s else []
        ideal = sum(x.t_prefix + max(x.t_suffix, x.t_draft) for x in s)
        on_path = total("t_prefix") + total("t_suffix") + total("t_draft_on_path")
        return {
            "mode": self.mode, "schedule": self.schedule,
            "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "tokens_per_s": self.new_tokens / self.t_decode if self.t_decode else 0.0,
            "prefill_s": self.t_prefill, "decode_s": self.t_decode,
            "steps": len(s),
            "mean_accepted_tokens": total("committed") / n,   # tokens per target forward
            "acceptance_histogram": hist,
            # Over the steps that produced a window: autoregressive steps (the policy's choice) neither
            # reuse nor fall back.
            "reuse_rate": total("reused") / windows if self.mode == "mirror" else None,
            "fallback_frequency": total("fallback") / windows if self.mode == "mirror" else None,
            "autoregressive_steps": sum(x.window == 0 for x in s) if self.mode != "ar" else None,
            "mean_window": total("window") / n if self.mode != "ar" else None,
            # Accepted tokens by who proposed them; a lookup window in sd/mirror is a draft call skipped.
            "accepted_from_draft": sum(x.accepted for x in s if x.source == "draft"),
            "accepted_from_lookup": sum(x.accepted for x in s if x.source == "lookup"),
            "lookup_windows": sum(x.source == "lookup" for x in s),
            "exit_hit_rate": total("exit_hits") / positions if positions else None,
            "acceptance_by_stream": _by_kind(s),   # [the draft's own tokens, stream 1, ..] accepted ÷ checked
            "mean_branches": total("branches") / n if self.mode == "mirror" else None,
            "t_prefix_ms": 1e3 * total("t_prefix") / n,
            "t_suffix_ms": 1e3 * total("t_suffix") / n,
            "t_draft_ms": 1e3 * total("t_draft") / n,
            "t_exposed_ms": 1e3 * total("t_exposed") / n,
            "t_step_ms": 1e3 * total("t_step") / n,
            "step_over_ideal": total("t_step") / ideal if ideal else None,
            "python_ms_per_step": 1e3 * (total("t_step") - on_path) / n,
            "peak_rss_gb": peak_rss_gb(),
        }

    def trace_lines(self):
        for i, step in enumerate(self.steps):
            yield json.dumps({"step": i, **asdict(step)})


def _by_kind(steps: list[StepRecord]) -> list[float] | None:
    width = max((len(x.stream_checked) for x in steps), default=0)
    if width < 2:
        return None
    checked, accepted = np.zeros(width), np.zeros(width)
    for x in steps:
        checked[:len(x.stream_checked)] += x.stream_checked
        accepted[:len(x.stream_accepted)] += x.stream_accepted
    return [float(a / c) if c else None for a, c in zip(accepted, checked)]


def peak_rss_gb() -> float:
    """The process's peak resident memory so far (weights, K/V and runtimes' arenas together), in GB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9   # bytes on macOS, KiB on Linux
