"""The draft's KV slot tree, over one of two K/V stores.

Slots are K/V rows in the order calls wrote them; they only grow. Each slot records its token, position
and parent (another slot, or COMMITTED), and two flags: committed, and live (committed or on the kept
chain). A call's 4-D mask lets each new token see every committed slot and its own speculative
ancestors, so all branches decode in one batch-1 call, and keeping a branch flips flags: no K/V moves.
Rejected slots stay where they are, masked out for good. When a phase's calls would not fit the
capacity, `compact` gathers the live slots to the front once (a copy of the live K/V; see `ensure_room`).
Why not copy the kept branch down every step: on OpenVINO state that is a get_state/set_state of all
2 × layers tensors (17 ms at 500 positions on the 0.5B draft, as long as a whole draft call); masking
costs a few dead rows in attention, and compaction runs once per many steps.

The stores:
- `BufferStore`: numpy buffers `[1, capacity, kv, hd]` fed as explicit inputs (draft.onnx on ONNX
  Runtime, the static NPU variant, the eager reference); a call returns its new rows, copied in here.
- `StateStore`: OpenVINO model state (ReadValue/Assign, head-major `[1, kv, T, hd]`), which the stateful
  graph appends to by itself; compaction is get_state → gather → set_state, reset is `reset_state()`.
"""
from __future__ import annotations

import time

import numpy as np

from ..errors import MirrorDeployError
from .kv import COMMITTED, MASK_MIN, capacity_error
from .static_buckets import ROWS, USED

DROPPED = -2   # compaction map entry of a slot that did not survive


class BufferStore:
    """Explicit K/V inputs: one position-major buffer per layer and kind."""

    def __init__(self, layers: range, capacity: int, kv_heads: int, head_dim: int):
        self.capacity = capacity
        self.names = [(f"past_{p}.{i}", f"new_{p}.{i}") for i in layers for p in ("key", "value")]
        self.buffers = {past: np.zeros((1, capacity, kv_heads, head_dim), np.float32) for past, _ in self.names}

    def past_len(self, used: int, static: bool) -> int:
        # Zero-length tensors trip some runtimes; slot 0 is then fed but masked out.
        return self.capacity if static else max(used, 1)

    def past_feeds(self, past_len: int) -> dict[str, np.ndarray]:
        return {past: buf[:, :past_len] for past, buf in self.buffers.items()}

    def append(self, outputs: dict[str, np.ndarray], at: int, count: int) -> None:
        for past, new in self.names:
            self.buffers[past][:, at:at + count] = outputs[new][:, :count]

    def compact(self, keep: np.ndarray) -> None:
        for buf in self.buffers.values():
            buf[:, :len(keep)] = buf[:, keep]   # fancy indexing reads a copy first, so overlap is safe

    def read(self, slots) -> dict[str, np.ndarray]:
        return {past: buf[:, slots] for past, buf in self.buffers.items()}

    def reset(self) -> None:
        pass  # stale rows are never visible: their slots are not live


class StateStore:
    """K/V held by an OpenVINO infer request as model state; the graph appends each call's rows."""

    def __init__(self, request):
        self.request = request
        self.beam = np.zeros(1, np.int32)   # the state reorder input: one sequence, no reordering

    def past_len(self, used: int, static: bool) -> int:
        return used

    def past_feeds(self, past_len: int) -> dict[str, np.ndarray]:
        return {"beam_idx": self.beam}

    def append(self, outputs, at: int, count: int) -> None:
        pass  # the graph's Assign already appended them

    def compact(self, keep: np.ndarray) -> None:
        import openvino as ov
        for state in self.request.query_state():
            state.state = ov.Tensor(np.ascontiguousarray(state.state.data[:, :, keep]))

    def read(self, slots) -> dict[str, np.ndarray]:
        """Position-major copies keyed like BufferStore (variables are named input + output)."""
        out = {}
        for state in self.request.query_state():
            past = state.name.split("present_")[0]
            out[past] = state.state.data[:, :, slots].transpose(0, 2, 1, 3)
        return out

    def reset(self) -> None:
        self.request.reset_state()


def store_for(graph, layers: range, capacity: int, kv_heads: int, head_dim: int):
    if getattr(graph, "stateful", False):
        return StateStore(graph.request)
    return BufferStore(layers, capacity, kv_heads, head_dim)


class DraftCache:
    """The slot tree (see the module docstring). `committed` counts committed tokens, which hold
    positions 0..committed-1; `used` counts slots written since the last compaction or reset."""

    def __init__(self, store, capacity: int, buckets: tuple[int, ...] = ()):
        self.store, self.capacity = store, capacity
        self.buckets = sorted(b for b in buckets if b < capacity)   # a bucketed static draft's smaller capacities
        self.parent = np.full(capacity, COMMITTED, np.int64)
        self.token = np.zeros(capacity, np.int64)
        self.position = np.zeros(capacity, np.int64)
        self.is_committed = np.zeros(capacity, bool)
        self.live = np.zeros(capacity, bool)
        self.used = self.committed = 0
        self.compactions, self.compact_seconds = 0, 0.0

    def reset(self) -> None:
        self.is_committed[:] = self.live[:] = False
        self.used = self.committed = 0
        self.store.reset()

    @property
    def speculative(self) -> np.ndarray:
        """Live slots not yet committed (the kept chain)."""
        return np.flatnonzero(self.live[:self.used] & ~self.is_committed[:self.used])

    def ancestry(self, slot: int, pending: dict[int, int]) -> list[int]:
        chain = []
        while slot != COMMITTED and (slot in pending or not self.is_committed[slot]):
            chain.append(slot)
            slot = pending[slot] if slot in pending else int(self.parent[slot])
        return chain

    def call_feeds(self, tokens, parents, positions, static_seq: int | None = None) -> tuple[dict, list[int]]:
        """Feeds for one draft call over new tokens; returns them and the slots the tokens will take.
        `parents[j]` is an existing slot, a slot of an earlier token of this call, or COMMITTED."""
        seq, first = len(tokens), self.used
        if first + seq > self.capacity:
            raise capacity_error("the draft", first + seq, self.capacity)
        static = static_seq is not None
        width = static_seq if static else seq
        if seq > width:
            raise MirrorDeployError(f"draft call of {seq} tokens exceeds the static width {width}",
                                    "re-export with a larger --branch-batch")
        slots = list(range(first, first + seq))
        past_len = self.store.past_len(first, static)
        pending = dict(zip(slots, parents))
        mask = np.full((1, 1, width, past_len + width), MASK_MIN, np.float32)
        past = mask[0, 0, :, :past_len]
        past[:, self.is_committed[:past_len]] = 0.0   # slots at or past `used` are never flagged
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
                 **self.store.past_feeds(past_len)}
        if static:   # what a bucketed static draft needs to pick its variant (static_buckets.py)
            feeds.update({ROWS: seq, USED: first})
        return feeds, slots

    def append(self, outputs, tokens, parents, positions) -> None:
        """Record the call's slots (speculative until committed) and store their K/V."""
        seq, first = len(tokens), self.used
        self.store.append(outputs, first, seq)
        end = first + seq
        self.token[first:end], self.position[first:end], self.parent[first:end] = tokens, positions, parents
        self.is_committed[first:end], self.live[first:end] = False, True
        self.used = end

    def commit(self, slots) -> None:
        """Commit `slots`, which continue the committed prefix in position order."""
        self.is_committed[slots] = True
        self.committed += len(slots)

    def keep_chain(self, slots: list[int], n_commit: int) -> None:
        """Keep one chain of speculative slots, commit its first `n_commit`; every other speculative
        slot is dropped (masked out from now on). Nothing is copied."""
        self.rollback_speculative()
        slots = np.asarray(slots, np.int64)
        self.live[slots] = True
        if len(slots):
            self.parent[slots[0]] = COMMITTED
            self.parent[slots[1:]] = slots[:-1]
        self.commit(slots[:n_commit])

    def rollback_speculative(self) -> None:
        self.live[:self.used] &= self.is_committed[:self.used]

    def compact(self) -> np.ndarray:
        """Gather the live slots to the front (K/V and links). Returns old slot -> new slot
        (DROPPED for slots that did not survive)."""
        start = time.perf_counter()
        keep = np.flatnonzero(self.live[:self.used])
        where = np.full(self.used, DROPPED, np.int64)
        where[keep] = np.arange(len(keep))
        if len(keep) < self.used:
            self.store.compact(keep)
            parents = self.parent[keep]
            linked = parents != COMMITTED
            parents[linked] = where[parents[linked]]
            self.parent[:len(keep)] = parents
            for arr in (self.token, self.position, self.is_committed, self.live):
                arr[:len(keep)] = arr[keep]
            self.is_committed[len(keep):self.used] = self.live[len(keep):self.used] = False
            self.used = len(keep)
            self.compactions += 1
            self.compact_seconds += time.perf_counter() - start
        return where

    def room(self, need: int) -> int:
        """The slots `need` more may fill before a compaction: the capacity, or with buckets the smallest
        bucket that holds the live slots and `need`. A bucketed static draft runs each call at the smallest
        capacity holding its used slots (static_buckets.py), and dropped slots count there until compacted:
        without this, rejected drafts would push a 300-token context into the 1024 bucket."""
        live = int(np.count_nonzero(self.live[:self.used])) + need
        return next((b for b in self.buckets if b >= live), self.capacity)

    def ensure_room(self, need: int) -> np.ndarray | None:
        """Make room for `need` more slots, compacting if they would not fit (`room`). Call only where no slot
        ids are held outside the cache except those remapped with the returned map (None: no change)."""
        if self.used + need <= self.room(need):
            return None
        where = self.compact()
        if self.used + need > self.capacity:
            raise capacity_error("the draft", self.used + need, self.capacity)
        return where

    def committed_kv(self) -> dict[str, np.ndarray]:
        """The committed prefix's K/V in position order, position-major (for tests and checks)."""
        slots = np.flatnonzero(self.is_committed[:self.used])
        return self.store.read(slots[np.argsort(self.position[slots], kind="stable")])
