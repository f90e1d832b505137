"""Drive compiled graphs call for call, the way the decoder does: target windows (prefix then suffix)
and draft calls (committed chains and tree-masked branches, padded when the graph is static).

Thin layers over the decoder's own runners, so `check`, the tests and the runtime benchmark exercise
exactly the feeds, masks and KV writes that generation uses, on any CompiledGraph (ONNX Runtime,
OpenVINO or the eager TorchGraph reference).
"""
from __future__ import annotations

import numpy as np

from ..runtimes.kv import COMMITTED
from ..runtimes.loader import TargetGraphs
from .draft import DraftRunner
from .target import TargetRunner


class TargetDriver(TargetRunner):
    """A TargetRunner that runs whole windows at any start, rolling back first."""

    @classmethod
    def for_manifest(cls, graphs: TargetGraphs, manifest, exit_layer: int | None = None,
                     learned_exit: bool = False) -> "TargetDriver":
        """The logit-lens exit by default (what `check` compares with PyTorch)."""
        driver = cls(graphs, manifest)
        driver.configure(exit_layer or manifest.exit_layer, manifest.kappa, learned_exit)
        return driver

    @property
    def used(self) -> int:
        return self.length

    def rollback(self, used: int) -> None:
        """Keep the first `used` positions; later slots are stale and never read again."""
        for cache in self.kv:
            cache.used = used

    def window(self, ids, start: int | None = None, exit_rows: bool = True) -> dict[str, np.ndarray]:
        """Run `ids` at positions start.. (default: right after the cache); a start below the cache
        length rolls back first. Returns logits, and (`exit_rows`: Mirror's step) exit_ids and
        exit_logprobs, for every window row."""
        start = self.used if start is None else start
        if start > self.used:
            raise ValueError(f"window at {start} would leave a gap after {self.used} cached positions")
        self.rollback(start)
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        pp = self.prefix(ids, exit_rows=exit_rows)
        tail, _ = self.suffix(pp)
        self.commit(pp, tail, len(ids))
        if not exit_rows:
            return {"logits": tail["logits"][0]}
        return {"logits": tail["logits"][0], "exit_ids": pp.exit_ids, "exit_logprobs": pp.exit_logprobs}


class DraftDriver:
    """The draft over a DraftCache slot tree, with positions derived from parents. A static graph
    (one with `static_dims`) is fed padded calls of its pinned width over the whole KV buffer."""

    def __init__(self, runner: DraftRunner):
        self.runner = runner
        self.graph, self.cache, self.static_seq = runner.graph, runner.cache, runner.static_seq

    @classmethod
    def for_manifest(cls, graph, manifest) -> "DraftDriver":
        return cls(DraftRunner(graph, manifest))

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
        slots = [self.call_slot(j) for j in range(len(tokens))]
        return self.runner.call(tokens, parents, positions).full_logits(), slots

    def commit(self, tokens) -> np.ndarray:
        """Append `tokens` to the committed prefix (in calls of the static width if pinned)."""
        if len(self.cache.speculative):
            raise ValueError("commit() with speculative slots pending: keep() or rollback() first")
        width = self.static_seq or len(tokens)
        logits = []
        for at in range(0, len(tokens), width):
            chunk = list(tokens[at:at + width])
            self.cache.ensure_room(len(chunk))
            parents = [COMMITTED] + [self.call_slot(j) for j in range(len(chunk) - 1)]
            out, slots = self.call(chunk, parents)
            self.cache.commit(slots)
            logits.append(out)
        return np.concatenate(logits)

    def keep(self, slots: list[int], n_commit: int) -> None:
        """Keep one chain (flags only: its slots stay where they are)."""
        self.cache.keep_chain(slots, n_commit)

    def rollback(self) -> None:
        self.cache.rollback_speculative()

    def compact(self) -> np.ndarray:
        """Gather the live slots to the front; returns old slot -> new slot."""
        return self.cache.compact()
