"""Read access to `tune`'s measured cost curves (tuning.json's curves_ms), apart from the code that
measures them (tuning/measure.py), so decoding can use them without importing the runtimes or the tuner."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Curves:
    """Read access to measured curves: milliseconds at arrays of contexts (linear between the two)."""
    data: dict

    def _at(self, state: str, part: str, index: int, context: np.ndarray, segment: int | None = None) -> np.ndarray:
        tables = self.data[state]
        values = [t[part][segment][index] if segment is not None else t[part][index] for t in tables]
        if len(values) == 1:
            return np.full(np.shape(context), values[0], np.float64)
        (c0, c1), (v0, v1) = self.data["contexts"], values
        return np.maximum(v0 + (v1 - v0) * (np.asarray(context, np.float64) - c0) / (c1 - c0), 0.0)

    def segments(self, state: str, first: int, stop: int, rows: int, context) -> np.ndarray:
        """Segments [first, stop) on `rows` rows."""
        return sum((self._at(state, "segments", rows - 1, context, i) for i in range(first, stop)),
                   np.zeros(np.shape(context)))

    def head(self, state: str, rows: int, context, exit_head: bool = False) -> np.ndarray:
        return self._at(state, "exit_head" if exit_head else "head", rows - 1, context)

    def draft(self, state: str, width: int, context) -> np.ndarray:
        return self._at(state, "draft", width - 1, context)

    @property
    def split_of(self) -> dict[int, int]:
        """Exit layer -> number of segments before it."""
        return {a: i for i, (a, _) in enumerate(self.data["layers"]) if i > 0}

    @property
    def n_segments(self) -> int:
        return len(self.data["layers"])
