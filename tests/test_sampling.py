"""Sampling keeps the target's distribution in every mode (a chi-square test against the exact marginals,
enumerated), and the test can fail. Apart from test_decoding.py so that the two test workers share the
load (`make test` gives each worker whole files)."""
from __future__ import annotations

import numpy as np
import pytest

from mirror_deploy.decoding.config import GenerationConfig as G
from mirror_deploy.decoding.engine import Engine
from mirror_deploy.tiny import build_tiny_pair
from test_decoding import _export


# ---- sampling keeps the target's distribution ----------------------------------------------------

V = 12
N_SAMPLES = 800


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM
    root = tmp_path_factory.mktemp("vocab")
    pair = build_tiny_pair(root, "llama", noise=0.5, vocab_size=V)
    engine = Engine(_export(pair, root / "art", 2, 6, gamma=2, branch_batch=3, max_context=64))
    model = AutoModelForCausalLM.from_pretrained(pair[0]).eval()
    return engine, model, torch


def _exact_marginals(model, torch, prompt, cfg, depth):
    """Exact marginals of the first `depth` sampled tokens, by enumerating every continuation."""
    from mirror_deploy.decoding.sampling import warp
    seqs, weights, marginals = [list(prompt)], np.ones(1), []
    for _ in range(depth):
        with torch.no_grad():
            logits = model(torch.tensor(seqs)).logits[:, -1].numpy()
        p = warp(logits, cfg)                     # [n, V]
        joint = weights[:, None] * p
        marginals.append(joint.sum(axis=0))
        seqs = [s + [v] for s in seqs for v in range(V)]
        weights = joint.reshape(-1)
    return marginals


def _chi2_pvalue(counts, probs):
    from scipy.stats import chisquare
    expected = probs * counts.sum()
    keep = expected >= 5                          # merge thin cells, as the test requires
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def _sample_counts(engine, prompt, cfg_kwargs, depth):
    counts = np.zeros((depth, V))
    for seed in range(N_SAMPLES):
        tokens = engine.generate(prompt, G(seed=seed, max_new_tokens=depth, stop_at_eos=False, **cfg_kwargs)).tokens
        for i, tok in enumerate(tokens[:depth]):
            counts[i, tok] += 1
    return counts


@pytest.mark.parametrize("mode,rule,schedule", [("mirror", "rejection", "overlapped"),
                                                ("mirror", "match", "serial"), ("sd", "rejection", "serial")])
def test_sampling_keeps_target_distribution(tiny_vocab, mode, rule, schedule):
    engine, model, torch = tiny_vocab
    prompt = [3, 5, 7, 2]
    cfg = dict(mode=mode, temperature=1.0, top_k=8, verify_rule=rule, schedule=schedule)
    exact = _exact_marginals(model, torch, prompt, G(**cfg), 3)
    counts = _sample_counts(engine, prompt, cfg, 3)
    pvalues = [_chi2_pvalue(counts[i], exact[i]) for i in range(3)]
    assert min(pvalues) > 1e-3, pvalues


def test_chi_square_catches_a_lossy_rule(tiny_vocab, monkeypatch):
    """The test above can fail: a rule that accepts every draft token gives the draft's distribution."""
    engine, model, torch = tiny_vocab
    import mirror_deploy.decoding.speculative as loops
    from mirror_deploy.decoding.sampling import sample
    monkeypatch.setattr(loops, "verify_rejection",
                        lambda drafts, p, q, rng: (len(drafts), sample(p[len(drafts)], rng)))
    prompt = [3, 5, 7, 2]
    cfg = dict(temperature=1.0, top_k=8, verify_rule="rejection", schedule="serial")
    exact = _exact_marginals(model, torch, prompt, G(**cfg), 2)
    counts = _sample_counts(engine, prompt, cfg, 2)
    assert min(_chi2_pvalue(counts[i], exact[i]) for i in range(2)) < 1e-6
