"""A benchmarked method: anything that turns prompt token ids into new token ids, timed.

Our own modes and the peers (bench/peers/) implement the same small protocol, so the runner can
interleave them prompt by prompt on the same models and machine.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from ..decoding.config import WINDOW_POLICIES, GenerationConfig


@dataclass
class MethodRun:
    tokens: list[int]
    seconds: float                      # wall time of generation after the prompt (decode only)
    prefill_seconds: float = 0.0
    figures: dict = field(default_factory=dict)   # method-specific: acceptance, reuse, ...

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds else 0.0


class Method(Protocol):
    name: str

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> MethodRun: ...

    def close(self) -> None: ...


class EngineMethod:
    """One of our modes (ar, sd, mirror-serial, mirror, or best: the tuned best mode) on an opened Engine."""

    MODES = {"ar": ("ar", "serial"), "sd": ("sd", "serial"),
             "mirror-serial": ("mirror", "serial"), "mirror": ("mirror", "overlapped"), "lookup": ("lookup", "serial"),
             "best": (None, "overlapped")}
    # sd/mirror/mirror-serial take extras after "+": lookup (prompt-lookup windows beside the draft model),
    # streams (the draft's speculative streams); e.g. sd+streams+lookup. A column without one runs without it.
    EXTRAS = ("streams", "lookup")
    POLICY_SEPARATOR = ":"   # `sd:heuristic` runs sd with that window policy (decoding/policy.py)

    @classmethod
    def parse(cls, name: str) -> tuple[str, set[str], str]:
        """(base mode name, extras, window policy) of a column name."""
        base, _, policy = name.partition(cls.POLICY_SEPARATOR)
        mode, *extras = base.split("+")
        return mode, set(extras), policy

    @classmethod
    def known(cls, name: str) -> bool:
        mode, extras, policy = cls.parse(name)
        return (mode in cls.MODES and extras <= set(cls.EXTRAS) and (not extras or "mirror" in mode or mode == "sd")
                and (not policy or policy in WINDOW_POLICIES))

    @classmethod
    def config_fields(cls, name: str) -> dict:
        """The extras as GenerationConfig fields: named ones on, the others off (a plain column stays plain
        on an artifact tuned to take them)."""
        mode, extras, _ = cls.parse(name)
        if cls.MODES[mode][0] not in ("sd", "mirror"):
            return {}
        return {extra: extra in extras for extra in cls.EXTRAS}

    def __init__(self, engine, name: str, **overrides):
        """`overrides`: GenerationConfig fields to pin (branch_budget, gamma, exit_layer, kappa); None = default."""
        self.engine, self.name = engine, name
        base, _, policy = self.parse(name)
        self.mode, self.schedule = self.MODES[base]
        if policy:
            overrides["window_policy"] = policy
        overrides.update(self.config_fields(name))
        if self.mode is None:   # resolved once, and named in the tables (e.g. best=sd, best=sd+lookup)
            self.mode = engine.default_mode()[0]
            tuned = engine.with_tuned_defaults(GenerationConfig(mode=self.mode))
            self.name = "best=" + "+".join([self.mode, *(e for e in self.EXTRAS if getattr(tuned, e, None))])
        self.overrides = {k: v for k, v in overrides.items() if v is not None}

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, seed=0) -> MethodRun:
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, mode=self.mode,
                               schedule=self.schedule, stop_at_eos=False, **self.overrides)
        t0 = time.perf_counter()
        result = self.engine.generate(prompt_ids, cfg)
        total = time.perf_counter() - t0
        m = result.metrics
        return MethodRun(result.tokens, m.t_decode, total - m.t_decode, result.summary)

    def close(self) -> None:
        pass
