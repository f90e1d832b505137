"""Logit warping and seeded sampling. Randomness is keyed by (seed, step, purpose) rather than drawn
from one stream, so a run is reproducible whatever the two devices' timing was."""
from __future__ import annotations

import numpy as np

from .config import GenerationConfig

TARGET_STREAM = 1 << 40
FRESH_STREAM = (1 << 40) + 1


def keyed_rng(seed: int, step: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, *key])


def warp(logits: np.ndarray, cfg: GenerationConfig) -> np.ndarray:
    """Probabilities (float64, rows sum to 1) after temperature, top-k and top-p."""
    x = logits.astype(np.float64) / cfg.temperature
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth = np.partition(x, -cfg.top_k, axis=-1)[..., -cfg.top_k, None]
        x = np.where(x < kth, -np.inf, x)
    x = x - x.max(axis=-1, keepdims=True)
    probs = np.exp(x)
    probs /= probs.sum(axis=-1, keepdims=True)
    if cfg.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        keep_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p < cfg.top_p  # always keeps the top token
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw from one probability row."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(probs) - 1))


def choose(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator | None):
    """(token, probs or None) for one logits row: argmax when greedy, else a warped sample."""
    if cfg.greedy:
        return int(np.argmax(logits)), None
    probs = warp(logits, cfg)
    return sample(probs, rng), probs
