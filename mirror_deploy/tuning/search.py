"""Choose (ℓe, κ, γ, budget) for Mirror and γ for vanilla SD: the settings whose replayed calibration
runs the latency model (costs/latency.py, over replays in model.py) predicts fastest."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..costs import latency
from ..costs.curves import Curves
from ..costs.latency import MirrorConfig
from . import model
from .simulate import Steps, acceptance_per_depth, coverage, needed_ranks, replay
from .teacher import Sequence


def kappa_candidates(kappa_max: int) -> list[int]:
    return sorted({k for k in (1, 2, 4, 8, 16, 32, 64) if k <= kappa_max} | {kappa_max})


@dataclass
class Grid:
    """Every candidate's prediction, and the replays they came from."""
    steps: dict[int, Steps]                        # γ -> replayed steps (γ = 0: autoregressive)
    ranks: dict[tuple[int, int, int], np.ndarray]  # (ℓe, κ, γ) -> needed-branch rank per step
    mirror: list[tuple[float, MirrorConfig]] = field(default_factory=list)   # (tok/s, config), best first
    sd: dict[int, float] = field(default_factory=dict)                       # γ -> tok/s
    ar: float = 0.0

    @property
    def best_mirror(self) -> tuple[float, MirrorConfig]:
        return self.mirror[0]

    @property
    def best_sd(self) -> tuple[float, int]:
        gamma = max(self.sd, key=lambda g: (self.sd[g], -g))
        return self.sd[gamma], gamma


def replays(sequences: list[Sequence], exit_layers: list[int], kappa_max: int, gamma_max: int) -> Grid:
    """Replay every γ and rank branches at every (ℓe, κ, γ): all the statistics the model needs."""
    steps = {g: replay(sequences, g) for g in range(0, gamma_max + 1)}
    ranks = {(layer, k, g): needed_ranks(sequences, steps[g], layer, k, g)
             for g in range(1, gamma_max + 1) for layer in exit_layers for k in kappa_candidates(kappa_max)}
    return Grid(steps, ranks)


def predict_mirror(curves: Curves, steps: Steps, ranks: np.ndarray, cfg: MirrorConfig, overhead_ms: float) -> float:
    hit = (ranks >= 0) & (ranks < cfg.branch_budget)
    return model.tokens_per_s(steps, latency.mirror_step_ms(curves, cfg, steps.start, hit), overhead_ms)


def evaluate(grid: Grid, curves: Curves, overhead_ms: dict[str, float], branch_batch: int) -> Grid:
    """Fill in the grid's predictions; ties go to the cheaper setting (smaller γ, budget, κ)."""
    grid.ar = model.tokens_per_s(grid.steps[0], latency.ar_step_ms(curves, grid.steps[0].start), overhead_ms["ar"])
    candidates = []
    for (layer, kappa, gamma), ranks in grid.ranks.items():
        steps = grid.steps[gamma]
        grid.sd[gamma] = model.tokens_per_s(steps, latency.sd_step_ms(curves, gamma, steps.start), overhead_ms["sd"])
        for budget in range(branch_batch + 1):
            cfg = MirrorConfig(layer, kappa, gamma, budget)
            candidates.append((predict_mirror(curves, steps, ranks, cfg, overhead_ms["mirror"]), cfg))
    grid.mirror = sorted(candidates, key=lambda x: (-round(x[0], 9), x[1].gamma, x[1].branch_budget,
                                                    x[1].kappa, x[1].exit_layer))
    return grid


def statistics(grid: Grid, sequences: list[Sequence], choice: MirrorConfig, branch_batch: int,
               hit_rates: dict) -> dict:
    """What tuning.json records of the calibration text (deterministic for a seed)."""
    gamma_max = max(grid.steps)
    return {
        "acceptance_per_depth": acceptance_per_depth(grid.steps[gamma_max], gamma_max),
        "mean_accepted_tokens": {str(g): grid.steps[g].tokens / len(grid.steps[g].start) for g in grid.steps if g},
        "exit_hit_rate": {str(layer): {str(k): v for k, v in rates.items()} for layer, rates in hit_rates.items()},
        "branch_coverage_at_chosen_gamma": {
            f"{layer},{kappa}": {str(b): v for b, v in coverage(ranks, list(range(branch_batch + 1))).items()}
            for (layer, kappa, gamma), ranks in grid.ranks.items() if gamma == choice.gamma},
        "calibration_tokens": sum(s.new for s in sequences),
    }


def top(grid: Grid, n: int = 10) -> list[dict]:
    return [{**asdict(cfg), "predicted_tokens_per_s": tps} for tps, cfg in grid.mirror[:n]]
