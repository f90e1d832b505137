"""The one interface every compiled graph is used through: `run(feeds) -> {output name: array}`."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class CompiledGraph(Protocol):
    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    static_dims: dict[str, int] | None   # pinned axis sizes for static-shape (NPU) graphs, else None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class CallTimer:
    """Wall time spent inside one graph's runtime calls (what the step figures report)."""
    calls: int = 0
    seconds: float = 0.0
    samples: list[float] = field(default_factory=list)

    def record(self, start: float) -> float:
        took = time.perf_counter() - start
        self.calls += 1
        self.seconds += took
        self.samples.append(took)
        return took


def only_known(feeds: dict[str, np.ndarray], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The TorchScript exporter drops inputs a graph never reads; feed only what the file declares."""
    return {n: feeds[n] for n in names}
