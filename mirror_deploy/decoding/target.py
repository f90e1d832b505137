"""The target side: layer segments and one head over position-indexed KV.

The artifact holds the target as segments cut at the exported exit layers, and one head (final norm + LM
head + top-κ). A run composes them: the prefix is the segments before its exit layer plus the head on the
exit rows (the early exit), the suffix is the remaining segments plus the head on the verified rows.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..artifact import Manifest
from ..errors import MirrorDeployError
from ..runtimes.kv import InPlaceKV, KVCache, StateKV
from ..runtimes.loader import TargetGraphs

@dataclass
class PrefixPass:
    """One window through the segments before the exit layer: what the suffix and the draft need."""
    feeds: dict                       # position_ids, attention_mask of the window
    seq: int
    hidden: np.ndarray                # hidden state at the exit layer [1, seq, d]
    segment_outputs: dict[int, dict] = field(default_factory=dict)   # segment index -> its new K/V
    exit: dict | None = None          # head outputs on the exit rows (top_ids, top_logprobs)
    kappa: int = 0
    seconds: float = 0.0

    @property
    def exit_ids(self) -> np.ndarray:
        return self.exit["top_ids"][0, :, :self.kappa]

    @property
    def exit_logprobs(self) -> np.ndarray:
        return self.exit["top_logprobs"][0, :, :self.kappa]


class TargetRunner:
    def __init__(self, graphs: TargetGraphs, manifest: Manifest, prefill_chunk: int = 256,
                 pipeline_prefill: bool = False):
        t = manifest.target
        self.graphs = graphs
        # Fused ONNX Runtime segments append K/V in place, OpenVINO-native ones into their state; traced ones
        # return new rows to copy in.
        if getattr(graphs.segments[0], "stateful", False):
            self.kv_kind = StateKV
            self.kv = [StateKV(g, manifest.max_context) for g in graphs.segments]
        else:
            self.kv_kind = InPlaceKV if "seqlens_k" in graphs.segments[0].input_names else KVCache
            self.kv = [self.kv_kind(range(a, b), manifest.max_context, t["kv_heads"], t["head_dim"])
                       for a, b in graphs.layers]
        self.capacity = manifest.max_context
        self.prefill_chunk = prefill_chunk
        self.exit_layers = [a for a, _ in graphs.layers[1:]]
        self.kappa_max = manifest.kappa
        # Prefill runs the first half of the segments and the second half on two threads at once (a
        # two-stage pipeline over prompt chunks) when each segment's runtime uses one thread.
        self._pipeline = ThreadPoolExecutor(1, thread_name_prefix="target-prefill") if pipeline_prefill else None
        self.configure(manifest.exit_layer, manifest.kappa)

    def configure(self, exit_layer: int, kappa: int, learned_exit: bool = True) -> None:
        """Choose the run's exit layer (an exported segment boundary), top-κ width, and whether the exit
        uses the learned translator at that layer when the artifact has one (else the logit lens)."""
        if exit_layer not in self.exit_layers:
            raise MirrorDeployError(f"exit layer {exit_layer} was not exported in this artifact",
                                    f"use one of {', '.join(map(str, self.exit_layers))}, or re-export with "
                                    f"--exit-layers including {exit_layer}")
        if not 1 <= kappa <= self.kappa_max:
            raise MirrorDeployError(f"kappa {kappa} is outside the artifact's 1..{self.kappa_max}",
                                    f"use at most {self.kappa_max}, or re-export with a larger --kappa")
        self.split = self.exit_layers.index(exit_layer) + 1   # segments [0, split) form the prefix
        self.kappa = kappa
        self.adapter = (self.graphs.adapters or {}).get(exit_layer) if learned_exit else None

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.shutdown(wait=True)

    @property
    def length(self) -> int:
        return self.kv[0].used

    def reset(self) -> None:
        for cache in self.kv:
            cache.used = 0

    def window_feeds(self, start: int, seq: int) -> dict:
        return self.kv_kind.window_feeds(start, seq, self.capacity)

    def run_segments(self, first: int, stop: int, hidden: np.ndarray, feeds: dict, outputs: dict) -> np.ndarray:
        """Segments [first, stop) over one window; their outputs go into `outputs` by segment index (new
        K/V for traced segments; fused ones have already written theirs in place)."""
        for i in range(first, stop):
            key = "input_ids" if i == 0 else "hidden_states"
            out = self.kv[i].run(self.graphs.segments[i], {key: hidden, **feeds})
            outputs[i] = out
            hidden = out["hidden_out"]
        return hidden

    def head(self, hidden: np.ndarray, rows: np.ndarray, exit_head: bool = False) -> dict:
        graph = (self.graphs.exit_head or self.graphs.head) if exit_head else self.graphs.head
        n = len(rows)
        # ONNX Runtime: an even number of rows, as in the segments (runtimes/kv.py): a row's logits then do not
        # depend on how many rows share the call. OpenVINO-native heads are row-invariant at any count.
        pad = n % 2 == 1 and self.kv_kind is not StateKV
        hidden = np.ascontiguousarray(hidden[:, [*rows, rows[-1]] if pad else rows])
        if exit_head and self.adapter is not None:
            hidden = self.adapter.run({"hidden_states": hidden})["adapted"]
        out = graph.run({"hidden_states": hidden})
        return {k: v[:, :n] for k, v in out.items()} if pad else out

    def prefix(self, window: list[int], exit_rows: bool) -> PrefixPass:
        seq = len(window)
        feeds = self.window_feeds(self.length, seq)
        t0 = time.perf_counter()
        pp = PrefixPass(feeds, seq, np.asarray(window, np.int64)[None], kappa=self.kappa)
        pp.hidden = self.run_segments(0, self.split, pp.hidden, feeds, pp.segment_outputs)
        if exit_rows:
            pp.exit = self.head(pp.hidden, np.arange(seq), exit_head=True)
        pp.seconds = time.perf_counter() - t0
        return pp

    def suffix(self, pp: PrefixPass) -> tuple[dict, float]:
        """The remaining segments, then the head on every window row (prefill never calls it)."""
        t0 = time.perf_counter()
        hidden = self.run_segments(self.split, len(self.kv), pp.hidden, pp.feeds, pp.segment_outputs)
        return {"logits": self.head(hidden, np.arange(pp.seq))["logits"]}, time.perf_counter() - t0

    def commit(self, pp: PrefixPass, suffix_out: dict | None, keep: int) -> None:
        """Keep the K/V of the window's first `keep` positions (root + accepted); drop the rest."""
        self.commit_segments(pp.segment_outputs, range(len(self.kv)), self.length, keep)

    def commit_segments(self, outputs: dict, segments, at: int, keep: int) -> None:
        for i in segments:
            self.kv[i].write(outputs[i], at, slice(0, keep))
            self.kv[i].used = at + keep

    def prefill(self, tokens: list[int]) -> None:
        """K/V for `tokens` (all but the last prompt token: that one is the first window's root)."""
        n, half = len(self.kv), (len(self.kv) + 1) // 2
        pipelined = self._pipeline is not None and n > 1 and len(tokens) > self.prefill_chunk
        pending = None
        try:
            for at in range(0, len(tokens), self.prefill_chunk):
                chunk = np.asarray(tokens[at:at + self.prefill_chunk], np.int64)[None]
                start = self.length
                feeds, outputs = self.window_feeds(start, chunk.shape[1]), {}
                if not pipelined:
                    self.run_segments(0, n, chunk, feeds, outputs)
                    self.commit_segments(outputs, range(n), start, chunk.shape[1])
                    continue
                hidden = self.run_segments(0, half, chunk, feeds, outputs)
                self.commit_segments(outputs, range(half), start, chunk.shape[1])
                if pending is not None:
                    pending.result()        # the back half of the previous chunk, before this one's
                pending = self._pipeline.submit(self._back_half, half, hidden, feeds, start, chunk.shape[1])
        finally:
            if pending is not None:
                pending.result()

    def _back_half(self, half: int, hidden, feeds, start: int, seq: int) -> None:
        outputs: dict = {}
        self.run_segments(half, len(self.kv), hidden, feeds, outputs)
        self.commit_segments(outputs, range(half, len(self.kv)), start, seq)
