"""The target side: prefix and suffix graphs over position-indexed KV."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..artifact import Manifest
from ..runtimes.kv import KVCache, causal_mask
from ..runtimes.loader import TargetGraphs

NO_ROWS = np.zeros(0, np.int64)


@dataclass
class PrefixPass:
    """One window through layers [0, ℓe): what the suffix and the draft need."""
    feeds: dict
    outputs: dict
    seconds: float

    @property
    def exit_ids(self) -> np.ndarray:
        return self.outputs["exit_ids"][0]

    @property
    def exit_logprobs(self) -> np.ndarray:
        return self.outputs["exit_logprobs"][0]


class TargetRunner:
    def __init__(self, graphs: TargetGraphs, manifest: Manifest, prefill_chunk: int = 256):
        t, le = manifest.target, manifest.exit_layer
        self.graphs = graphs
        self.prefix_kv = KVCache(range(0, le), manifest.max_context, t["kv_heads"], t["head_dim"])
        self.suffix_kv = KVCache(range(le, t["num_layers"]), manifest.max_context, t["kv_heads"], t["head_dim"])
        self.capacity = manifest.max_context
        self.prefill_chunk = prefill_chunk

    @property
    def length(self) -> int:
        return self.prefix_kv.used

    def reset(self) -> None:
        self.prefix_kv.used = self.suffix_kv.used = 0

    def prefix(self, window: list[int], exit_rows: bool) -> PrefixPass:
        start, seq = self.length, len(window)
        feeds = {
            "input_ids": np.asarray(window, np.int64)[None],
            "position_ids": np.arange(start, start + seq, dtype=np.int64)[None],
            "attention_mask": causal_mask(start, seq, self.prefix_kv.past_len(False)),
            "output_rows": np.arange(seq, dtype=np.int64) if exit_rows else NO_ROWS,
        }
        t0 = time.perf_counter()
        outputs = self.graphs.prefix.run({**feeds, **self.prefix_kv.past_feeds(False)})
        return PrefixPass(feeds, outputs, time.perf_counter() - t0)

    def suffix(self, pp: PrefixPass, rows: np.ndarray | None = None) -> tuple[dict, float]:
        feeds = {**pp.feeds, "hidden_states": pp.outputs["hidden_states"],
                 "output_rows": np.arange(pp.feeds["input_ids"].shape[1], dtype=np.int64) if rows is None else rows}
        t0 = time.perf_counter()
        outputs = self.graphs.suffix.run({**feeds, **self.suffix_kv.past_feeds(False)})
        return outputs, time.perf_counter() - t0

    def commit(self, pp: PrefixPass, suffix_out: dict, keep: int) -> None:
        """Keep the K/V of the window's first `keep` positions (root + accepted); drop the rest."""
        at = self.length
        self.prefix_kv.write(pp.outputs, at, slice(0, keep))
        self.suffix_kv.write(suffix_out, at, slice(0, keep))
        self.prefix_kv.used = self.suffix_kv.used = at + keep

    def prefill(self, tokens: list[int]) -> None:
        """K/V for `tokens` (all but the last prompt token: that one is the first window's root)."""
        for i in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[i:i + self.prefill_chunk]
            pp = self.prefix(chunk, exit_rows=False)
            out, _ = self.suffix(pp, rows=NO_ROWS)
            self.commit(pp, out, len(chunk))
