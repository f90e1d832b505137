"""Drive compiled graphs through the KV caches the way a decoder does: target windows (prefix then
suffix) and draft calls (committed chains and tree-masked branches, padded when the graph is static).

Numpy only, so the same call sequence runs on any CompiledGraph (ONNX Runtime, OpenVINO or the eager
TorchGraph reference); `check`, the tests and the benchmarks use it to compare runtimes call for call.
"""
from __future__ import annotations

import numpy as np

from ..export.shapes import SEQ
from .base import CompiledGraph
from .kv import COMMITTED, DraftCache, KVCache, causal_mask


class TargetDriver:
    """Prefix + suffix over one window per call, each with its own KV cache."""

    def __init__(self, prefix: CompiledGraph, suffix: CompiledGraph, exit_layer: int, num_layers: int,
                 kv_heads: int, head_dim: int, capacity: int):
        self.prefix, self.suffix = prefix, suffix
        self.prefix_kv = KVCache(range(0, exit_layer), capacity, kv_heads, head_dim)
        self.suffix_kv = KVCache(range(exit_layer, num_layers), capacity, kv_heads, head_dim)

    @classmethod
    def for_manifest(cls, prefix, suffix, manifest) -> "TargetDriver":
        t = manifest.target
        return cls(prefix, suffix, manifest.exit_layer, t["num_layers"], t["kv_heads"], t["head_dim"],
                   manifest.max_context)

    @property
    def used(self) -> int:
        return self.prefix_kv.used

    def rollback(self, used: int) -> None:
        """Keep the first `used` positions; later slots are stale and never read again."""
        self.prefix_kv.used = self.suffix_kv.used = used

    def window(self, ids, start: int | None = None) -> dict[str, np.ndarray]:
        """Run `ids` at positions start.. (default: right after the cache); a start below the cache
        length rolls back first. Returns logits, exit_ids, exit_logprobs for every window row."""
        start = self.used if start is None else start
        if start > self.used:
            raise ValueError(f"window at {start} would leave a gap after {self.used} cached positions")
        self.rollback(start)
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        seq = ids.shape[1]
        past_len = self.prefix_kv.past_len(static=False)
        feeds = {"input_ids": ids, "position_ids": np.arange(start, start + seq, dtype=np.int64)[None],
                 "attention_mask": causal_mask(start, seq, past_len),
                 "output_rows": np.arange(seq, dtype=np.int64)}
        head = self.prefix.run({**feeds, **self.prefix_kv.past_feeds(False)})
        tail = self.suffix.run({**feeds, "hidden_states": head["hidden_states"],
                                **self.suffix_kv.past_feeds(False)})
        self.prefix_kv.write(head, start, slice(0, seq))
        self.suffix_kv.write(tail, start, slice(0, seq))
        self.rollback(start + seq)
        return {"logits": tail["logits"][0], "exit_ids": head["exit_ids"][0],
                "exit_logprobs": head["exit_logprobs"][0]}


class DraftDriver:
    """The draft over a DraftCache slot tree. A static graph (one with `static_dims`) is fed padded
    calls of its pinned width over the whole KV buffer."""

    def __init__(self, graph: CompiledGraph, num_layers: int, kv_heads: int, head_dim: int, capacity: int):
        self.graph = graph
        self.cache = DraftCache(range(num_layers), capacity, kv_heads, head_dim)
        self.static_seq = graph.static_dims[SEQ] if graph.static_dims else None

    @classmethod
    def for_manifest(cls, graph, manifest) -> "DraftDriver":
        d = manifest.draft
        return cls(graph, d["num_layers"], d["kv_heads"], d["head_dim"], manifest.max_context)

    def call_slot(self, j: int) -> int:
        """The slot the j-th token of the next call will take (to use as a parent within the call)."""
        return self.cache.used + j

    def _position(self, parent: int, earlier: dict[int, int]) -> int:
        if parent == COMMITTED:
            return self.cache.committed
        return (earlier[parent] if parent in earlier else int(self.cache.position[parent])) + 1

    def call(self, tokens, parents) -> tuple[np.ndarray, list[int]]:
        """One draft call; `parents` follow DraftCache (COMMITTED, an existing slot, or call_slot(j) of
        an earlier token). Positions follow from the parents. Returns logits [len, vocab] and slots."""
        positions, earlier = [], {}
        for j, parent in enumerate(parents):
            positions.append(self._position(parent, earlier))
            earlier[self.call_slot(j)] = positions[-1]
        feeds, slots = self.cache.call_feeds(tokens, parents, positions, self.static_seq)
        out = self.graph.run(feeds)
        self.cache.append(out, tokens, parents, positions)
        return out["logits"][0, :len(tokens)], slots

    def commit(self, tokens) -> np.ndarray:
        """Append `tokens` to the committed prefix (in calls of the static width if pinned)."""
        if self.cache.used != self.cache.committed:
            raise ValueError("commit() with speculative slots pending: keep() or rollback() first")
        width = self.static_seq or len(tokens)
        logits = []
        for at in range(0, len(tokens), width):
            chunk = list(tokens[at:at + width])
            parents = [COMMITTED] + [self.call_slot(j) for j in range(len(chunk) - 1)]
            out, slots = self.call(chunk, parents)
            self.cache.keep_chain(slots, len(slots))
            logits.append(out)
        return np.concatenate(logits)

    def keep(self, slots: list[int], n_commit: int) -> None:
        self.cache.keep_chain(slots, n_commit)

    def rollback(self) -> None:
        self.cache.rollback_speculative()
