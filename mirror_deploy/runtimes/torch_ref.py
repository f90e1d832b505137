"""The eager PyTorch reference: the same graph modules the exporter traces, run directly."""
from __future__ import annotations

import time

import numpy as np
import torch

from .base import CallTimer


class TorchGraph:
    def __init__(self, module: torch.nn.Module, name: str, input_names, output_names):
        self.module = module.eval()
        self.name = name
        self.device = "torch-cpu"
        self.static_dims = None
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self.timer = CallTimer()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        with torch.no_grad():
            outputs = self.module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names))
        self.timer.record(start)
        return {n: o.numpy() for n, o in zip(self.output_names, outputs)}
