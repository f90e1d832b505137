"""Position-indexed KV state (gpt-fast style): preallocated buffers of the compiled capacity.

A graph reads a contiguous slice `buffer[:, :used]` (or the whole buffer when its shape is static) and
returns K/V for its new positions only; committing copies just those rows in, and rolling back is a
length change. The draft cache is a slot tree: committed slots first, then speculative slots whose
parent links say which branch each belongs to; the attention mask lets every token see the committed
prefix and its own ancestors only, so many branches decode in one batch-1 call.
"""
from __future__ import annotations

import numpy as np

from ..errors import MirrorDeployError

MASK_MIN = np.finfo(np.float32).min
COMMITTED = -1  # parent link meaning "follows the committed prefix directly"


def capacity_error(what: str, need: int, capacity: int) -> MirrorDeployError:
    return MirrorDeployError(
        f"{what} needs {need} KV positions but the artifact was compiled for {capacity}",
        "shorten the prompt or max_new_tokens, or re-export with a larger --max-context")


class KVCache:
    """K/V buffers `[1, capacity, kv_heads, head_dim]` for one graph's layers."""

    def __init__(self, layers: range, capacity: int, kv_heads: int, head_dim: int):
        self.capacity = capacity
        self.names = [(f"past_{p}.{i}", f"new_{p}.{i}") for i in layers for p in ("key", "value")]
        self.buffers = {past: np.zeros((1, capacity, kv_heads, head_dim), np.float32) for past, _ in self.names}
        self.used = 0

    def past_len(self, static: bool) -> int:
        # Zero-length tensors trip some runtimes; slot 0 is then fed but masked out.
        return self.capacity if static else max(self.used, 1)

    def past_feeds(self, static: bool) -> dict[str, np.ndarray]:
        n = self.past_len(static)
        return {past: buf[:, :n] for past, buf in self.buffers.items()}

    def write(self, outputs: dict[str, np.ndarray], at: int, rows) -> None:
        """Copy the new K/V of the given call rows into slots [at, at + len(rows))."""
        count = len(range(*rows.indices(10**9))) if isinstance(rows, slice) else len(rows)
        if at + count > self.capacity:
            raise capacity_error("decoding", at + count, self.capacity)
        for past, new in self.names:
            self.buffers[past][:, at:at + count] = outputs[new][:, rows]

    def move(self, src: list[int], dst: int) -> None:
        """Copy slots `src` (ascending) to `dst, dst+1, ...`; used for keeping one branch."""
        if list(src) == list(range(dst, dst + len(src))):
            return
        for buf in self.buffers.values():
            buf[:, dst:dst + len(src)] = buf[:, src]


def causal_mask(committed: int, seq: int, past_len: int) -> np.ndarray:
    """Window mask for the target: all committed slots, then causal inside the new positions."""
    mask = np.full((1, 1, seq, past_len + seq), MASK_MIN, np.float32)
    mask[..., :committed] = 0.0
    new = mask[0, 0, :, past_len:]
    new[np.tril_indices(seq)] = 0.0
    return mask


class DraftCache(KVCache):
    """KV slot tree for the draft: slots [0, committed) are the committed prefix; slots above are
    speculative tokens, each with a parent slot (or COMMITTED)."""

    def __init__(self, layers: range, capacity: int, kv_heads: int, head_dim: int):
        super().__init__(layers, capacity, kv_heads, head_dim)
        self.committed = 0
        self.parent = np.full(capacity, COMMITTED, np.int64)
        self.token = np.zeros(capacity, np.int64)
        self.position = np.zeros(capacity, np.int64)

    def ancestry(self, slot: int, pending_parent: dict[int, int]) -> list[int]:
        chain = []
        while slot != COMMITTED and slot >= self.committed:
            chain.append(slot)
            slot = pending_parent[slot] if slot in pending_parent else int(self.parent[slot])
        return chain

    def call_feeds(self, tokens, parents, positions, static_seq: int | None = None) -> tuple[dict, list[int]]:
        """Feeds for one draft call over new tokens; returns them and the slots the tokens will take.
        `parents[j]` is an existing slot, a slot of an earlier token of this call, or COMMITTED."""
        seq = len(tokens)
        first = self.used
        if first + seq > self.capacity:
            raise capacity_error("the draft", first + seq, self.capacity)
        slots = list(range(first, first + seq))
        static = static_seq is not None
        width = static_seq if static else seq
        if seq > width:
            raise MirrorDeployError(f"draft call of {seq} tokens exceeds the static width {width}",
                                    "re-export with a larger --branch-batch")
        past_len = self.past_len(static)
        pending = dict(zip(slots, parents))
        mask = np.full((1, 1, width, past_len + width), MASK_MIN, np.float32)
        mask[..., :self.committed] = 0.0
        for j, slot in enumerate(slots):
            for anc in self.ancestry(slot, pending):
                mask[0, 0, j, anc if anc < first else past_len + anc - first] = 0.0
        for j in range(seq, width):  # padding rows see only themselves
            mask[0, 0, j, past_len + j] = 0.0
        ids = np.zeros((1, width), np.int64)
        ids[0, :seq] = tokens
        pos = np.zeros((1, width), np.int64)
        pos[0, :seq] = positions
        feeds = {"input_ids": ids, "position_ids": pos, "attention_mask": mask,
                 "output_rows": np.arange(width if static else seq, dtype=np.int64),
                 **self.past_feeds(static)}
        return feeds, slots

    def append(self, outputs, tokens, parents, positions) -> None:
        """Store the call's K/V and slot links in the slots `call_feeds` reserved."""
        seq = len(tokens)
        first = self.used
        self.write(outputs, first, slice(0, seq))
        self.token[first:first + seq] = tokens
        self.position[first:first + seq] = positions
        self.parent[first:first + seq] = parents
        self.used = first + seq

    def keep_chain(self, slots: list[int], n_commit: int) -> None:
        """Keep one chain of speculative slots right after the committed prefix, commit its first
        `n_commit`, drop every other speculative slot."""
        base = self.committed
        self.move(slots, base)
        for name in ("token", "position"):
            arr = getattr(self, name)
            arr[base:base + len(slots)] = arr[slots]
        self.parent[base:base + len(slots)] = np.arange(base - 1, base + len(slots) - 1)
        self.committed = base + n_commit
        self.parent[base:self.committed] = COMMITTED
        if len(slots) > n_commit:
            self.parent[self.committed] = COMMITTED
        self.used = base + len(slots)

    def rollback_speculative(self) -> None:
        self.used = self.committed
