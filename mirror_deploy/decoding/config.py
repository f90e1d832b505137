"""Per-request generation settings, kept apart from construction options (openvino.genai style)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import MirrorDeployError
from ..modes import DEFAULT_MODE, MODES  # noqa: F401  (re-exported: callers read them here)

SCHEDULES = ("overlapped", "serial")
RULES = ("rejection", "match")
WINDOW_POLICIES = ("auto", "heuristic")   # decoding/policy.py


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0
    seed: int = 0
    mode: str | None = None           # None: the artifact's tuned best mode on this profile, else mirror
    schedule: str = "overlapped"      # mirror only: overlapped (two devices at once) or serial (ablation)
    verify_rule: str = "rejection"    # sampling only: rejection (uses draft q) or match (paper's operator)
    branch_budget: int | None = None  # mirror: branches the draft rolls out per step (None = artifact's batch)
    gamma: int | None = None          # window length, the most when adaptive (None = artifact's γ)
    adaptive_gamma: bool = True       # size each window from the run's acceptance (False: always γ)
    window_policy: str = "auto"       # auto: by the tuned costs, down to autoregressive steps, when the
                                      # artifact is tuned on this profile, else heuristic (within [1, γ])
    exit_layer: int | None = None     # mirror: early-exit layer, one the artifact exported (None = its default)
    kappa: int | None = None          # mirror: early-exit top-κ width (None = the artifact's κ, its most)
    learned_exit: bool = True         # mirror: use the artifact's learned exit at ℓe when it has one
    lookup: bool | None = None        # sd: prompt-lookup windows beside the draft model's, where they are
                                      # worth more (decoding/lookup_beside.py); None: as `tune` measured it
    streams: bool | None = None       # sd/mirror: the draft with speculative streams (`learn-streams`), one call
                                      # proposing 1 + S tokens; None: as `tune` measured it (off untuned)
    stop_at_eos: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def validate(self) -> "GenerationConfig":
        checks = [
            (self.mode is None or self.mode in MODES, f"mode {self.mode!r} is unknown",
             f"use one of: {', '.join(MODES)} (or leave it unset for the tuned best mode)"),
            (self.schedule in SCHEDULES, f"schedule {self.schedule!r} is unknown", f"use {' or '.join(SCHEDULES)}"),
            (self.window_policy in WINDOW_POLICIES, f"window policy {self.window_policy!r} is unknown",
             f"use {' or '.join(WINDOW_POLICIES)}"),
            (self.verify_rule in RULES, f"verify rule {self.verify_rule!r} is unknown", f"use {' or '.join(RULES)}"),
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1", "ask for 1 or more tokens"),
            (self.temperature >= 0, "temperature must be >= 0", "use 0 for greedy or e.g. 0.7"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]", "use e.g. 0.9, or 1 to turn it off"),
            (self.top_k >= 0, "top_k must be >= 0", "use 0 to turn it off"),
            (self.branch_budget is None or self.branch_budget >= 0, "branch budget must be >= 0", "use e.g. 4"),
            (self.gamma is None or self.gamma >= 1, "gamma must be >= 1", "use e.g. 4"),
            (self.kappa is None or self.kappa >= 1, "kappa must be >= 1", "use e.g. 8"),
            (not (self.lookup and self.mode in ("ar", "lookup")), f"lookup beside the draft applies to sd and "
             f"mirror, not mode {self.mode}", "use mode lookup for prompt lookup alone, or drop --lookup (lookup=True)"),
            (not (self.streams and self.mode in ("ar", "lookup")), f"speculative streams are the draft model's, for "
             f"sd and mirror, not mode {self.mode}", "use mode sd or mirror, or drop --streams (streams=True)"),
        ]
        for ok, problem, fix in checks:
            if not ok:
                raise MirrorDeployError(problem, fix)
        return self
