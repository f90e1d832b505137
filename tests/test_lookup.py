"""Prompt lookup (`mode="lookup"`): the n-gram index, greedy equality with autoregressive decoding, and
sampling that keeps the target's distribution."""
from __future__ import annotations

import numpy as np
import pytest

from mirror_deploy.decoding.config import GenerationConfig as G
from mirror_deploy.decoding.engine import Engine
from mirror_deploy.decoding.lookup import NgramIndex
from test_decoding import PROMPTS, agreeing_pair  # noqa: F401  (a fixture)
from test_sampling import _chi2_pvalue, _exact_marginals, _sample_counts, tiny_vocab  # noqa: F401  (a fixture)

REPEATING = ["abcabcabcab", "def f(n):\n    return n\ndef f(n):\n    ret", "x = 1\nx = 1\nx"]


def test_the_longest_latest_match_proposes_what_followed_it():
    index = NgramIndex(max_n=3, min_n=1)
    index.extend([1, 2, 3, 9, 1, 2, 3, 4, 5, 2, 3])
    # "2 3" last ended before 4 (the 3-gram "5 2 3" never occurred earlier): the 2-gram wins over "3"
    assert index.propose(3) == ([4, 5, 2], 2)
    index.extend([7])
    assert index.propose(2) == ([], 0)             # 7 never occurred before
    index.extend([1, 2, 3])
    assert index.propose(2) == ([4, 5], 3)          # "1 2 3" now matches whole, at its latest occurrence


def test_a_context_never_matches_itself_and_a_short_one_proposes_nothing():
    index = NgramIndex(max_n=4, min_n=2)
    index.extend([5])
    assert index.propose(4) == ([], 0)              # shorter than the smallest n-gram
    index.extend([6])
    assert index.propose(4) == ([], 0)              # "5 6" only occurs as the context's own end
    index.extend([5, 6])
    assert index.propose(4) == ([5, 6], 2)          # the earlier "5 6" is followed by "5 6"
    with pytest.raises(ValueError):
        NgramIndex(max_n=1, min_n=2)


def test_lookup_greedy_equals_autoregressive(tiny_artifacts):
    drafted = accepted = 0
    for arch, folder in tiny_artifacts.items():
        engine = Engine(folder)
        for prompt in PROMPTS + REPEATING:
            expected = engine.generate(prompt, G(max_new_tokens=32, mode="ar", stop_at_eos=False)).tokens
            for gamma, adaptive in [(1, True), (4, True), (4, False)]:
                result = engine.generate(prompt, G(max_new_tokens=32, mode="lookup", gamma=gamma,
                                                   adaptive_gamma=adaptive, stop_at_eos=False))
                assert result.tokens == expected, (arch, prompt, gamma, adaptive)
                drafted += sum(s.window for s in result.metrics.steps)
                accepted += sum(s.accepted for s in result.metrics.steps)
    # The comparison above means something only if lookup windows were verified, some accepted, some not.
    assert 0 < accepted < drafted, (accepted, drafted)


def test_lookup_runs_without_loading_the_draft(tiny_artifacts):
    engine = Engine(tiny_artifacts["llama"], load_draft=False)
    out = engine.generate("abcabcab", G(max_new_tokens=8, mode="lookup", stop_at_eos=False))
    assert len(out.tokens) == 8 and out.summary["mode"] == "lookup"


@pytest.mark.parametrize("rule", ["rejection", "match"])
def test_lookup_sampling_keeps_target_distribution(tiny_vocab, rule):
    engine, model, torch = tiny_vocab
    prompt = [3, 5, 7, 2, 3, 5, 7]                  # "3 5 7" recurs: lookup proposes "2 3 5 .."
    cfg = dict(mode="lookup", temperature=1.0, top_k=8, verify_rule=rule)
    exact = _exact_marginals(model, torch, prompt, G(**cfg), 3)
    counts = _sample_counts(engine, prompt, cfg, 3)
    pvalues = [_chi2_pvalue(counts[i], exact[i]) for i in range(3)]
    assert min(pvalues) > 1e-3, pvalues
    first = engine.generate(prompt, G(seed=0, max_new_tokens=3, stop_at_eos=False, **cfg))
    assert first.metrics.steps[0].window > 0        # the first step verified a lookup window


def test_the_distribution_check_catches_lookup_proposals_taken_whole(tiny_vocab, monkeypatch):
    """The test above can fail: committing every lookup proposal makes the prompt's pattern likelier."""
    engine, model, torch = tiny_vocab
    import mirror_deploy.decoding.speculative as loops
    from mirror_deploy.decoding.sampling import sample
    monkeypatch.setattr(loops, "verify_rejection",
                        lambda drafts, p, q, rng: (len(drafts), sample(p[len(drafts)], rng)))
    prompt = [3, 5, 7, 2, 3, 5, 7]
    cfg = dict(mode="lookup", temperature=1.0, top_k=8, verify_rule="rejection")
    exact = _exact_marginals(model, torch, prompt, G(**cfg), 2)
    counts = _sample_counts(engine, prompt, cfg, 2)
    assert min(_chi2_pvalue(counts[i], exact[i]) for i in range(2)) < 1e-6


BESIDE_MODES = [("sd", "serial"), ("mirror", "serial"), ("mirror", "overlapped")]


@pytest.mark.parametrize("model_prior", [None, 0.05])
def test_lookup_beside_the_draft_greedy_equals_autoregressive(tiny_artifacts, monkeypatch, model_prior):
    """sd/mirror with lookup windows beside the model's: every switch between the two sources (the model
    idling through lookup windows, then catching up in one call) keeps the output exact. A low prior for
    the model makes lookup win wherever it matches, so both directions of switching are driven."""
    import mirror_deploy.decoding.lookup_beside as beside
    if model_prior is not None:
        monkeypatch.setattr(beside, "MODEL_PRIOR_ACCEPTANCE", model_prior)
    sources = {"draft": 0, "lookup": 0}
    for arch in ("llama", "gpt2"):
        engine = Engine(tiny_artifacts[arch])
        for prompt in PROMPTS[:2] + REPEATING:
            expected = engine.generate(prompt, G(max_new_tokens=32, mode="ar", stop_at_eos=False)).tokens
            for mode, schedule in BESIDE_MODES:
                for gamma, budget in [(2, 2), (4, 4)]:
                    result = engine.generate(prompt, G(max_new_tokens=32, mode=mode, schedule=schedule, lookup=True,
                                                       gamma=gamma, branch_budget=budget, stop_at_eos=False))
                    assert result.tokens == expected, (arch, prompt, mode, schedule, gamma)
                    for step in result.metrics.steps:
                        if step.source:
                            sources[step.source] += 1
                    summary = result.summary
                    assert summary["lookup_windows"] == sum(s.source == "lookup" for s in result.metrics.steps)
    assert sources["draft"] > 0 and sources["lookup"] > 0, sources


@pytest.mark.parametrize("mode,schedule", [("sd", "serial"), ("mirror", "overlapped")])
def test_lookup_beside_the_draft_keeps_the_target_distribution(tiny_vocab, monkeypatch, mode, schedule):
    import mirror_deploy.decoding.lookup_beside as beside
    monkeypatch.setattr(beside, "MODEL_PRIOR_ACCEPTANCE", 0.05)   # lookup's windows wherever it matches
    engine, model, torch = tiny_vocab
    prompt = [3, 5, 7, 2, 3, 5, 7]
    cfg = dict(mode=mode, schedule=schedule, lookup=True, temperature=1.0, top_k=8, verify_rule="rejection")
    exact = _exact_marginals(model, torch, prompt, G(**cfg), 3)
    counts = np.zeros((3, len(exact[0])))
    for seed in range(2000):   # more than the other sampling tests: two sources, switching, in three tokens
        tokens = engine.generate(prompt, G(seed=seed, max_new_tokens=3, stop_at_eos=False, **cfg)).tokens
        counts[np.arange(len(tokens)), tokens] += 1
    assert min(_chi2_pvalue(counts[i], exact[i]) for i in range(3)) > 1e-3
    first = engine.generate(prompt, G(seed=0, max_new_tokens=3, stop_at_eos=False, **cfg))
    assert first.metrics.steps[0].source == "lookup"


def test_lookup_beside_ar_or_lookup_mode_is_refused():
    from mirror_deploy.errors import MirrorDeployError
    with pytest.raises(MirrorDeployError, match="sd and mirror"):
        G(mode="ar", lookup=True).validate()


def test_a_cost_aware_lookup_window_skips_weak_matches_when_rows_are_dear():
    from mirror_deploy.decoding.lookup import LookupWindow
    dear = LookupWindow(4, prior_ratio=[1.0, 1.9, 2.0, 2.1, 2.2])   # one verified token nearly doubles a step
    assert dear.choose([1, 2, 3, 4], 1) == 0                          # a 1-gram match is not worth it
    cheap = LookupWindow(4, prior_ratio=[1.0, 1.01, 1.02, 1.03, 1.04])
    assert cheap.choose([1, 2, 3, 4], 4) == 4
    usual = LookupWindow(4)                                           # 15% a row: a 4-gram match is worth it
    assert usual.choose([1, 2, 3, 4], 4) > 0
    for _ in range(20):                                               # until the run's own acceptance says not
        usual.choose([1, 2, 3, 4], 4)
        usual.observe(0, 4)
    assert usual.choose([1, 2, 3, 4], 4) == 0


def test_lookup_beside_a_one_token_model_window_still_verifies_long_copies(tiny_artifacts, monkeypatch):
    """A tuned SD γ of 1 sizes the model's windows, not lookup's: a long match beside it is verified up to
    the artifact's widest window (before, every lookup window beside the model was cut to γ)."""
    import mirror_deploy.decoding.lookup_beside as beside
    monkeypatch.setattr(beside, "MODEL_PRIOR_ACCEPTANCE", 0.05)
    engine = Engine(tiny_artifacts["llama"])
    prompt = REPEATING[1]
    expected = engine.generate(prompt, G(max_new_tokens=32, mode="ar", stop_at_eos=False)).tokens
    result = engine.generate(prompt, G(max_new_tokens=32, mode="sd", lookup=True, gamma=1, stop_at_eos=False))
    assert result.tokens == expected
    lookup_windows = [s.window for s in result.metrics.steps if s.source == "lookup"]
    assert max(lookup_windows) > 1, lookup_windows
    assert all(s.window <= 1 for s in result.metrics.steps if s.source == "draft")


def test_mirror_beside_lookup_prices_a_free_branch_at_the_branching_steps_time():
    """Mirror's branches run beside the suffix: on shared cores (`cpu`) they slow it, so a branch already
    rolled out is not free. Timed apart from plain steps, a model whose branching steps cost more than
    they give idles (the run goes on as lookup alone would); on its own core it keeps drafting."""
    from mirror_deploy.decoding.lookup import LookupDraft, LookupWindow
    from mirror_deploy.decoding.lookup_beside import LookupBeside
    from mirror_deploy.decoding.metrics import StepRecord

    class Model:
        static_seq, graph, pending = None, None, []

        def reset(self):
            pass

    def beside(branching_ms: float) -> LookupBeside:
        b = LookupBeside(Model(), LookupDraft(LookupWindow(4, prior_ratio=[1.0, 1.0, 1.4, 1.5, 1.6])), 4)
        b.mirror = True
        for _ in range(10):
            b.observe_step(StepRecord(0, 1, window=0, t_prefix=0.010, t_suffix=0.020))        # a plain step: 30 ms
            b.observe_step(StepRecord(1, 2, window=1, branches=3, t_prefix=0.010,
                                      t_suffix=branching_ms / 1000 - 0.010))
        return b
    assert not beside(80.0)._model_pays(1, free=True)   # ~1.7 tokens in 80 ms against 1 in 30 ms
    assert beside(32.0)._model_pays(1, free=True)
    sd = beside(80.0)
    sd.mirror = False                                    # SD's windows never branch: priced as plain steps
    assert sd._model_pays(1, free=False)


def test_mirror_beside_lookup_prices_plain_steps_from_tune_before_it_has_timed_one():
    """Tuned, a plain step (a lookup window, an autoregressive step) is priced from tune's curves until the
    run has timed one: priced at the branching steps' time instead, lookup lost every comparison and no
    plain step was ever timed (mt_bench: 36 branching steps, no lookup window; lookup alone took 19)."""
    from mirror_deploy.decoding.lookup import LookupDraft, LookupWindow
    from mirror_deploy.decoding.lookup_beside import LookupBeside
    from mirror_deploy.decoding.metrics import StepRecord

    class Model:
        static_seq, graph, pending = None, None, []

        def reset(self):
            pass

    tuned = LookupWindow(4, prior_seconds=np.array([0.030, 0.030, 0.042, 0.045, 0.048]))
    b = LookupBeside(Model(), LookupDraft(tuned), 4)
    b.mirror = True
    for _ in range(10):                                   # only branching steps, 80 ms each
        b.observe_step(StepRecord(1, 2, window=1, branches=3, t_prefix=0.010, t_suffix=0.070))
    assert b._seconds(False)[0] == pytest.approx(0.030) and b._seconds(True)[1] == pytest.approx(0.080, rel=0.1)
    assert not b._model_pays(1, free=True)
