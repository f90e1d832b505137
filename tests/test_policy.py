"""The window policy: lengths down to autoregressive steps and back, Mirror's budget per step, all
chosen from the run's own acceptance and the tuned costs; output stays exactly the target's."""
from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
from rich.console import Console

from mirror_deploy.decoding.config import GenerationConfig as G
from mirror_deploy.decoding.engine import Engine
from mirror_deploy.decoding.policy import CostAwareWindow, Plan, TunedCosts
from mirror_deploy.export.pipeline import ExportOptions, export_artifact
from mirror_deploy.tiny import build_tiny_pair
from mirror_deploy.tuning import store, tune
from mirror_deploy.costs.curves import Curves

QUIET = Console(quiet=True)
PROMPTS = ["Hello world", "def f(n):", "x"]
SPEC_MODES = [("sd", "serial"), ("mirror", "serial"), ("mirror", "overlapped")]


def _curves(target_row_ms=(100, 110, 120, 130, 140), draft_ms=(20, 24, 28, 32, 36)) -> Curves:
    """Two segments (the exit at layer 2 of 4), rows 1..5, draft widths 1..5; the same at both contexts."""
    half = [t / 2 for t in target_row_ms]
    table = {"segments": [half, half], "head": [0.0] * 5, "exit_head": [0.0] * 5, "draft": list(draft_ms)}
    return Curves({"contexts": [10, 100], "rows": [1, 2, 3, 4, 5], "widths": [1, 2, 3, 4, 5],
                   "layers": [[0, 2], [2, 4]], "alone": [table, table], "together": [table, table]})


def _policy(mode="sd", acceptance=0.9, coverage=0.8, start=2, curves=None) -> CostAwareWindow:
    costs = TunedCosts(curves or _curves(), {"ar": 0.0, "sd": 0.0, "mirror": 0.0}, [acceptance] * 4,
                       [0.0] + [coverage] * 4)
    return CostAwareWindow(mode, costs, gamma=4, budget=4, start=start, exit_layer=2, kappa=4)


def test_the_policy_follows_the_latency_model():
    eager = _policy(acceptance=0.9)
    rates = eager.predicted(50)[:, 0]
    expected = [1000 / 100] + [1000 * (1 + sum(0.9 ** k for k in range(1, L + 1))) / (100 + 10 * L + 20 * L)
                               for L in range(1, 5)]
    np.testing.assert_allclose(rates, expected)
    assert eager.plan(50) == Plan(int(np.argmax(expected)), 4)
    assert _policy(acceptance=0.1).plan(50).length == 0     # a draft that rarely agrees: autoregressive


def _drive(policy, steps: int, agrees) -> list[int]:
    """Window lengths of a run whose step i accepts `agrees(i, window)` tokens; as in the decoding
    loop, each plan is for the window after the one being verified."""
    windows, window = [], policy.plan(50).length
    for i in range(steps):
        following = policy.plan(50).length
        policy.observe(agrees(i, window), window)
        windows.append(window)
        window = following
    return windows


def test_no_acceptance_drops_to_autoregressive_and_probes_back_off():
    windows = _drive(_policy(acceptance=0.8), 120, lambda i, w: 0)
    assert windows[0] > 0 and 0 in windows[:15]
    probes = [i for i in range(15, 120) if windows[i]]
    assert all(windows[i] == 1 for i in probes)               # one-token probe windows ...
    gaps = np.diff(probes)
    assert len(probes) >= 3 and list(gaps) == sorted(gaps) and gaps[-1] > 2 * gaps[0]   # ... backing off
    assert windows[15:].count(0) >= 100


def test_an_accepted_probe_brings_the_windows_back():
    windows = _drive(_policy(acceptance=0.8), 120, lambda i, w: 0 if i < 40 else w)
    back = next(i for i in range(40, 120) if windows[i] > 1)
    assert back < 40 + 2 * 64 and all(w > 1 for w in windows[back:])


def test_mirror_sizes_its_budget_from_the_needed_ranks():
    # Draft calls longer than the suffix: a branch that misses delays the fresh rollout.
    policy = _policy(mode="mirror", coverage=0.1, curves=_curves(draft_ms=(60, 70, 80, 90, 100)))
    for _ in range(20):
        policy.observe(1, 2)
        policy.observe_rank(0)                 # the needed branch always ranks first
    assert policy.plan(50).budget == 1
    for _ in range(30):
        policy.observe_rank(-1)                # never among the ranked: branches are wasted work
    assert policy.plan(50).budget == 0


def test_a_draft_that_stops_agreeing_is_dropped_even_when_windows_cost_little():
    """Windows cost 4% more than an autoregressive step, inside the switch margin: the model's error
    band alone would keep a draft that never agrees. Its vanishing gain must not."""
    policy = _policy(acceptance=0.75, start=1, curves=_curves(target_row_ms=(100, 101, 102, 103, 104),
                                                             draft_ms=(3, 3, 3, 3, 3)))
    lengths = []
    for _ in range(40):
        plan = policy.plan(50)
        lengths.append(plan.length)
        policy.observe(0, plan.length)
    spec = lengths[:CostAwareWindow.MAX_REJECTED]
    assert min(spec) > 0, lengths
    after = lengths[len(spec):]
    assert set(after) <= {0, 1} and after.count(1) <= 3, lengths   # autoregressive, but for probes


def test_measured_step_times_correct_the_tuned_curves():
    """The curves say windows of 2 pay; the run's steps take twice as long as predicted, while the
    target alone runs as predicted: the policy must see that and drop to autoregressive steps."""
    policy = _policy(acceptance=0.6)
    plan = policy.plan(50)
    assert plan.length > 0
    hit, _, target = policy._step_ms(50)
    before = policy.predicted(50)
    for _ in range(30):
        policy.observe_time(plan.length, plan, None, 2 * hit[plan.length, 0] / 1e3,
                            target[plan.length] / 1e3, 50)
    after = policy.predicted(50)
    assert after[0, 0] == pytest.approx(before[0, 0])                       # the target: as tuned
    assert after[plan.length, 0] < 0.6 * before[plan.length, 0]              # windows: slower than tuned
    assert policy.plan(50).length == 0


def test_a_faster_target_alone_raises_the_autoregressive_estimate():
    policy = _policy(mode="mirror")
    plan = policy.plan(50)
    _, _, target = policy._step_ms(50)
    before = policy.predicted(50)[0, 0]
    for _ in range(30):   # Mirror's prefix (the target alone) runs at 0.8x the curves
        policy.observe_time(plan.length, plan, True, 1.0, 0.8 * target[plan.length] / 1e3, 50)
    assert policy.predicted(50)[0, 0] == pytest.approx(before / 0.8, rel=0.1)


class Scripted:
    """A policy that walks a fixed cycle of (length, budget): every transition, AR runs included."""

    def __init__(self, plans):
        self.cycle = itertools.cycle(plans)
        self.gamma = max(p[0] for p in plans)
        self.budget = max(p[1] for p in plans)

    def plan(self, context):
        return Plan(*next(self.cycle))

    def observe(self, accepted, drafted):
        pass

    def observe_rank(self, rank):
        pass

    def observe_time(self, drafted, plan, reused, step_s, target_s, context):
        pass


SCRIPT = [(0, 0), (2, 1), (0, 0), (0, 0), (3, 4), (1, 2), (4, 0), (0, 0)] + [(0, 0)] * 7 + [(4, 3), (2, 2)]


def _each_mode_equals_ar(engine, prompts, n: int) -> list:
    """Every speculative mode's greedy output on each prompt equals AR's; returns the runs."""
    results = []
    for prompt in prompts:
        expected = engine.generate(prompt, G(max_new_tokens=n, mode="ar", stop_at_eos=False)).tokens
        for mode, schedule in SPEC_MODES:
            result = engine.generate(prompt, G(max_new_tokens=n, mode=mode, schedule=schedule, stop_at_eos=False))
            assert result.tokens == expected, (prompt, mode, schedule)
            results.append(result)
    return results


@pytest.fixture(scope="module")
def agreeing(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    pair = build_tiny_pair(root, "llama", noise=0.05)
    opts = ExportOptions(exit_layer=2, kappa=4, gamma=4, max_context=256, branch_batch=4)
    return Engine(export_artifact(*pair, root / "art", opts, QUIET))


def test_any_sequence_of_plans_keeps_greedy_exact(agreeing, monkeypatch):
    monkeypatch.setattr(Engine, "run_policy", lambda self, cfg: Scripted(SCRIPT))
    for result in _each_mode_equals_ar(agreeing, PROMPTS, 40):
        windows = [s.window for s in result.metrics.steps]
        assert 0 in windows and max(windows) > 0
        assert result.summary["autoregressive_steps"] == windows.count(0)


def test_a_long_autoregressive_run_catches_the_static_draft_up_in_chunks(static_artifact, monkeypatch):
    """The NPU-shaped draft takes 5 tokens a call: 12 idle steps are fed in several calls."""
    monkeypatch.setattr(Engine, "run_policy", lambda self, cfg: Scripted([(0, 0)] * 12 + [(3, 2)] * 3))
    engine = Engine(static_artifact)
    assert len(_each_mode_equals_ar(engine, PROMPTS[:2], 30)) == 2 * len(SPEC_MODES)


@pytest.fixture(scope="module")
def tuned_data(tiny_artifacts, tmp_path_factory):
    folder = shutil.copytree(tiny_artifacts["llama"], tmp_path_factory.mktemp("tuned") / "art")
    return tune.tune_artifact(folder, tune.TuneOptions(seed=3, prompts=6, new_tokens=16, rounds=1,
                                                       measure_prompts=1), QUIET)


def test_a_tuned_run_with_a_draft_that_never_agrees_goes_autoregressive(tuned_data, tmp_path):
    pair = build_tiny_pair(tmp_path, "llama", disagree=True)
    folder = export_artifact(*pair, tmp_path / "art", ExportOptions(kappa=4, gamma=4, max_context=256,
                                                                    branch_batch=4), QUIET)
    # The same shapes' measured costs; lookup beside the draft off, so every window is the model's.
    store.write_tuning(folder, {**tuned_data, "lookup_beside": {"sd": {"chosen": False}}})
    engine = Engine(folder)
    for result in _each_mode_equals_ar(engine, PROMPTS[:2], 48):
        windows = [s.window for s in result.metrics.steps]
        assert windows.count(0) >= len(windows) // 2, windows
    for prompt in PROMPTS[:2]:
        expected = engine.generate(prompt, G(max_new_tokens=16, mode="ar", stop_at_eos=False)).tokens
        fixed = engine.generate(prompt, G(max_new_tokens=16, mode="sd", adaptive_gamma=False, stop_at_eos=False))
        assert fixed.tokens == expected and 0 not in [s.window for s in fixed.metrics.steps]
