"""Position-indexed KV state (gpt-fast style): preallocated buffers of the compiled capacity.

A graph reads a contiguous slice `buffer[:, :used]` (or the whole buffer when its shape is static) and
returns K/V for its new positions only; committing copies just those rows in, and rolling back is a
length change. The draft's slot tree lives in `draft_cache.py`.
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


def causal_mask(committed: int, seq: int, past_len: int) -> np.ndarray:
    """Window mask for the target: all committed slots, then causal inside the new positions."""
    mask = np.full((1, 1, seq, past_len + seq), MASK_MIN, np.float32)
    mask[..., :committed] = 0.0
    new = mask[0, 0, :, past_len:]
    new[np.tril_indices(seq)] = 0.0
    return mask
