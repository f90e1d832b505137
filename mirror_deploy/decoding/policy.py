"""How much to speculate next step: the window's length L (0 = a plain autoregressive step) and, for
Mirror, how many branches the draft rolls out. Chosen each step from the run's own acceptance; the
choice only decides how much is drafted, never what is committed, so every policy keeps the output exact.

- `HeuristicWindow`: an untuned artifact (no cost curves): +2 after a window accepted whole, −1
  otherwise, within [1, γ] (the schedule transformers calls "heuristic", which OpenVINO GenAI also uses).
- `CostAwareWindow`: a tuned artifact: `tune`'s measured cost curves and the latency model
  (costs/latency.py) predict tokens/s for every (L, budget) from the run's acceptance per depth and its
  needed-branch ranks, and the fastest wins. Text the draft cannot follow drops to autoregressive steps;
  while it runs those, the estimates relax towards the calibration prior, and when the model would leave
  it first probes with a one-token window: after 4, 8, 16 .. 64 idle steps (back to 4 as soon as a
  draft token is accepted); only an accepted probe lets it speculate again. The curves come from the
  machine and the moment `tune` ran on; the run's own step times correct them: one factor for the target
  alone (from autoregressive steps, SD's target calls and Mirror's prefix), which scales the
  autoregressive estimate, and one for whole speculative steps (contention between the two devices
  included), which scales every window's. Eight windows in a row with nothing accepted end
  speculation whatever the costs say.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..costs import latency
from ..costs.curves import Curves


@dataclass(frozen=True)
class Plan:
    length: int      # the next window's draft tokens (0: the next step is autoregressive)
    budget: int      # Mirror: branches rolled out beside the suffix


class HeuristicWindow:
    def __init__(self, gamma: int, budget: int, adaptive: bool):
        self.gamma, self.budget, self.adaptive, self.current = gamma, budget, adaptive, gamma

    def plan(self, context: int) -> Plan:
        return Plan(self.current, self.budget)

    def observe(self, accepted: int, drafted: int) -> None:
        if self.adaptive and drafted:
            step = 2 if accepted == drafted else -1
            self.current = min(self.gamma, max(1, self.current + step))

    def observe_rank(self, rank: int) -> None:
        pass

    def observe_time(self, drafted: int, plan: Plan, reused: bool | None, step_s: float, target_s: float,
                     context: int) -> None:
        pass


class DecayedRatio:
    """measured ÷ predicted as a decayed geometric mean, starting at 1 with the weight of `weight`
    steps; a single step moves it at most 2x (a stray pause must not flip the choice)."""

    def __init__(self, decay: float = 0.9, weight: float = 2.0):
        self.log_sum, self.seen, self.decay, self.weight = 0.0, 0.0, decay, weight

    def add(self, measured: float, predicted: float) -> None:
        if measured > 0 and predicted > 0:
            self.log_sum = self.decay * self.log_sum + float(np.clip(np.log(measured / predicted), -np.log(2), np.log(2)))
            self.seen = self.decay * self.seen + 1.0

    def factor(self) -> float:
        return float(np.exp(self.log_sum / (self.seen + self.weight)))


class DecayedRate:
    """Share of events that succeeded, over an exponentially decayed window, with a prior worth
    `weight` observations (so a fresh run starts from the calibration figure)."""

    def __init__(self, prior: np.ndarray, decay: float = 0.9, weight: float = 2.0):
        self.prior = np.asarray(prior, np.float64)
        self.hits = np.zeros_like(self.prior)
        self.seen = np.zeros_like(self.prior)
        self.decay, self.weight = decay, weight

    def add(self, hits: np.ndarray, seen: np.ndarray) -> None:
        self.hits = self.decay * self.hits + hits
        self.seen = self.decay * self.seen + seen

    def relax(self) -> None:
        """No observation this step: older evidence fades, the prior regains weight."""
        self.hits *= self.decay
        self.seen *= self.decay

    def rates(self) -> np.ndarray:
        return (self.hits + self.weight * self.prior) / (self.seen + self.weight)

    def observe_window(self, accepted: int, drafted: int) -> None:
        """A verified window, with rates per depth: depths up to `accepted` hit, the first rejected one
        missed, deeper ones were never reached (no evidence)."""
        depth = np.arange(1, len(self.prior) + 1)
        self.add((depth <= accepted).astype(float), (depth <= min(accepted + 1, drafted)).astype(float))

    def expected_tokens(self) -> np.ndarray:
        """L -> 1 + E[accepted] for a window of L, with rates per depth."""
        return 1.0 + np.concatenate([[0.0], np.cumsum(np.cumprod(self.rates()))])


@dataclass
class TunedCosts:
    """What `tune` wrote that the policy needs: the curves, the per-step Python time, and the
    calibration text's acceptance per depth and branch coverage per budget."""
    curves: Curves
    overhead_ms: dict[str, float]
    acceptance: list[float]
    coverage: list[float]        # budget b -> share of steps whose needed branch ranked below b
    draft_calls: latency.DraftCalls = latency.PLAIN

    @classmethod
    def from_tuning(cls, tuning: dict, exit_layer: int, kappa: int, gamma: int, budget: int,
                    streams: dict | None = None) -> "TunedCosts":
        """`streams`: the artifact's speculative streams when the run uses them ({"streams": S, "call_ratio",
        "acceptance": per window position within a call}): calls yield 1 + S tokens, and the depths their
        streams propose start from the streams' held-out acceptance instead of the draft's own."""
        stats = tuning["statistics"]
        acceptance = list(stats["acceptance_per_depth"]) or [0.5]
        acceptance += [acceptance[-1]] * (gamma - len(acceptance))
        calls = latency.PLAIN
        if streams:
            calls, acceptance = latency.with_streams(acceptance, streams)
        table = stats["branch_coverage_at_chosen_gamma"].get(f"{exit_layer},{kappa}")
        if table:
            known = {int(b): v for b, v in table.items()}
            coverage = [known.get(b, known[max(known)]) for b in range(budget + 1)]
        else:   # a run at an (ℓe, κ) the tuner did not rank: a modest prior, rising with the budget
            coverage = [min(0.8, 0.15 * b) for b in range(budget + 1)]
        return cls(Curves(tuning["curves_ms"]), tuning["overhead_ms_per_step"], acceptance[:gamma], coverage, calls)


class CostAwareWindow:
    # Entering or leaving autoregressive steps costs a serial rollout, and the model is good to ~15%
    # per prompt (tune's check): switch only for a clear gain.
    SWITCH_MARGIN = 1.10
    BUCKET = 32            # costs are recomputed when the context crosses a bucket
    MIN_WAIT, MAX_WAIT = 4, 64   # autoregressive steps before a probe window, doubling per failed probe
    MAX_REJECTED = 8       # windows in a row with nothing accepted (a draft at 30% does this 6% of the time)

    def __init__(self, mode: str, costs: TunedCosts, gamma: int, budget: int, start: int,
                 exit_layer: int | None = None, kappa: int | None = None):
        self.mode, self.costs, self.gamma, self.budget = mode, costs, gamma, budget
        self.exit_layer, self.kappa = exit_layer, kappa
        self.accept = DecayedRate(costs.acceptance)
        self.ranks = DecayedRate(np.asarray(costs.coverage), weight=4.0)
        self.target_speed, self.spec_speed = DecayedRatio(), DecayedRatio()   # measured ÷ the curves
        self.current = Plan(min(start, gamma), budget)
        self._bucket, self._table = None, None
        self.idle_steps, self.wait, self.passed, self.rejected_run = 0, self.MIN_WAIT, False, 0
        self.state = "spec" if self.current.length else "idle"   # spec, idle, probe (sent), verdict (awaited)

    # -- observations ------------------------------------------------------------------------
    def observe(self, accepted: int, drafted: int) -> None:
        if not drafted:
            self.accept.relax()
            return
        if self.state == "verdict":        # the probe's
            self.state = "idle"
            if accepted:
                self.passed, self.idle_steps = True, self.MAX_WAIT
        if accepted:
            self.wait = self.MIN_WAIT    # the draft agrees again: probing is cheap
        self.rejected_run = 0 if accepted else self.rejected_run + 1
        self.accept.observe_window(accepted, drafted)

    def observe_rank(self, rank: int) -> None:
        """The needed branch's rank in the worker's full ranking (-1: not ranked at all)."""
        budgets = np.arange(self.budget + 1)
        self.ranks.add(((rank >= 0) & (rank < budgets)).astype(float), np.ones(self.budget + 1))

    def observe_time(self, drafted: int, plan: Plan, reused: bool | None, step_s: float, target_s: float,
                     context: int) -> None:
        """A finished step: it verified `drafted` tokens and rolled out `plan` (Mirror: `reused` says
        whether a branch held the next window). Only steady steps (verified as long as rolled out)
        correct the speculative estimate: a transition's cost is in no table entry."""
        hit, miss, target = self._step_ms(context)
        if not drafted and not plan.length:
            self.target_speed.add(1e3 * step_s, hit[0, 0])
            return
        if drafted:
            # The measured call carries its Python wrapper, which the curves (graph time) lack: add the
            # autoregressive step's per-step overhead, an upper bound for it, so that on a tiny model a
            # wrapper that outweighs the graph cannot make the target look slow (it errs towards
            # autoregressive steps, by an amount a real model's step does not notice).
            self.target_speed.add(1e3 * target_s, target[drafted] + self.costs.overhead_ms["ar"])
        if drafted == plan.length:
            column = plan.budget if self.mode == "mirror" else 0
            table = miss if self.mode == "mirror" and not reused else hit
            self.spec_speed.add(1e3 * step_s, table[drafted, column])

    # -- the choice -----------------------------------------------------------------------------
    def expected_tokens(self) -> np.ndarray:
        """L -> 1 + E[accepted] for a window of L, from the run's acceptance per depth."""
        return self.accept.expected_tokens()

    def _step_ms(self, context: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[L, b] step times on a hit and on a miss at this context (L = 0: autoregressive), and [L] the
        target's time alone for a window of L (SD: the whole target; Mirror: the prefix)."""
        bucket = context // self.BUCKET
        if bucket != self._bucket:
            c = self.costs.curves
            # Within the contexts tune measured: extrapolating its two points far out amplifies their
            # noise (a 3-row suffix at 400 came out 1.5x a 2-row one on the real pair), and the choice
            # rests on ratios between lengths, which the context changes little.
            low, high = min(c.data["contexts"]), max(c.data["contexts"])
            ctx = np.asarray(float(np.clip(bucket * self.BUCKET + self.BUCKET // 2, low, high)))
            over = self.costs.overhead_ms
            hit = np.zeros((self.gamma + 1, self.budget + 1))
            miss = np.zeros_like(hit)
            target = np.zeros(self.gamma + 1)
            hit[0] = miss[0] = latency.ar_step_ms(c, ctx) + over["ar"]
            for length in range(1, self.gamma + 1):
                if self.mode == "sd":
                    hit[length] = miss[length] = latency.sd_step_ms(c, length, ctx, self.costs.draft_calls) + over["sd"]
                    target[length] = latency.target_window_ms(c, length, ctx)
                    continue
                target[length] = latency.mirror_prefix_ms(c, self.exit_layer, length, ctx)
                for b in range(self.budget + 1):
                    cfg = latency.MirrorConfig(self.exit_layer, self.kappa, length, b)
                    calls = self.costs.draft_calls
                    hit[length, b] = latency.mirror_step_ms(c, cfg, ctx, np.asarray(True), calls) + over["mirror"]
                    miss[length, b] = latency.mirror_step_ms(c, cfg, ctx, np.asarray(False), calls) + over["mirror"]
            self._bucket, self._table = bucket, (hit, miss, target)
        return self._table

    def predicted(self, context: int) -> np.ndarray:
        """[L, b] predicted tokens per second."""
        hit_ms, miss_ms, _ = self._step_ms(context)
        p = self.ranks.rates()[None, :] if self.mode == "mirror" else 1.0
        ms = p * hit_ms + (1 - p) * miss_ms
        ms[0] *= self.target_speed.factor()
        ms[1:] *= self.spec_speed.factor()
        # A window verifies the autoregressive step's row and more: however the two corrections drift
        # apart, it cannot be the cheaper step.
        ms[1:] = np.maximum(ms[1:], ms[0])
        return 1e3 * self.expected_tokens()[:, None] / ms

    def plan(self, context: int) -> Plan:
        rate = self.predicted(context)
        if self.mode != "mirror":
            rate[:, 1:] = -np.inf   # SD has no branches: one column is enough
        rate[0, 1:] = -np.inf       # an autoregressive step rolls out nothing
        best = self._argmax(rate, 0)
        idle = self.current.length == 0
        if (best[0] == 0) != idle:
            # Stay on this side of autoregressive unless the other side is clearly faster.
            stay = (0, 0) if idle else self._argmax(rate[1:], 1)
            if rate[best] < self.SWITCH_MARGIN * rate[stay]:
                best = stay
        if best[0] and self.state == "spec" and self.rejected_run >= self.MAX_REJECTED:
            # The decayed estimate keeps part of the calibration prior, and where windows cost little
            # more than an autoregressive step the model's error band would keep a draft that has
            # stopped agreeing: a run of whole rejections ends speculation (probes bring it back).
            best = (0, 0)
        best = self._gate(best, rate)
        self.idle_steps = self.idle_steps + 1 if best[0] == 0 else 0
        self.current = Plan(best[0], best[1] if self.mode == "mirror" else self.budget)
        return self.current

    def _gate(self, best: tuple[int, int], rate: np.ndarray) -> tuple[int, int]:
        """Leaving autoregressive steps goes through a probe: one one-token window, whose verdict is
        awaited idle; the next probe waits twice as long unless that one was accepted."""
        if self.state == "probe":            # the probe's verdict arrives after this plan
            self.state = "verdict"
            return 0, 0
        if self.state == "spec":
            if best[0] == 0:
                self.state = "idle"
            return best
        if best[0] == 0 or self.idle_steps < self.wait:
            return 0, 0
        if self.passed:
            self.state, self.passed = "spec", False
            return best
        self.state, self.wait = "probe", min(2 * self.wait, self.MAX_WAIT)
        return 1, int(np.argmax(rate[1]))

    @staticmethod
    def _argmax(rate: np.ndarray, offset: int) -> tuple[int, int]:
        length, budget = np.unravel_index(int(np.argmax(rate)), rate.shape)
        return int(length) + offset, int(budget)
