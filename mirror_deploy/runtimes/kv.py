"""Position-indexed KV state (gpt-fast style): preallocated buffers of the compiled capacity.

Two kinds for the target, chosen by the graphs' inputs. `KVCache` (traced graphs): a graph reads a
contiguous slice `buffer[:, :used]` (or the whole buffer when its shape is static) and returns K/V for its
new positions only; committing copies just those rows in. `InPlaceKV` (fused graphs): head-major buffers
bound as both past and present, so the graph appends in place and committing copies nothing. Either way
rolling back is a length change. `StateKV` (OpenVINO-native graphs): K/V live in the infer request as
model state, which the graph appends to; rolling back trims the state. The draft's slot tree lives in
`draft_cache.py`.
"""
from __future__ import annotations

import time

import numpy as np

from ..axes import ATTENTION_SPAN, attention_slots
from ..errors import MirrorDeployError

MASK_MIN = np.finfo(np.float32).min
COMMITTED = -1  # parent link meaning "follows the committed prefix directly"


def capacity_error(what: str, need: int, capacity: int) -> MirrorDeployError:
    return MirrorDeployError(
        f"{what} needs {need} KV positions but the artifact was compiled for {capacity}",
        "shorten the prompt or max_new_tokens, or re-export with a larger --max-context")


class KVCache:
    """K/V buffers `[1, capacity, kv_heads, head_dim]` for one graph's layers."""
    in_place = False

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

    @staticmethod
    def window_feeds(start: int, seq: int, capacity: int) -> dict[str, np.ndarray]:
        """Feeds every segment of a window at positions [start, start + seq) shares."""
        return {"position_ids": np.arange(start, start + seq, dtype=np.int64)[None],
                "attention_mask": causal_mask(start, seq, max(start, 1))}

    def run(self, graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return graph.run({**feeds, **self.past_feeds(False)})


class InPlaceKV:
    """Head-major K/V buffers `[1, kv_heads, slots, head_dim]` for one fused graph's layers, bound as
    both past_key.i and present_key.i: the graph appends the window's K/V at slots [start, start + seq) of
    the same memory. The graph attends over the whole buffer, so before each call the buffers are sized to
    that call's span (`attention_slots`: grown, or shrunk after a rollback, once per ATTENTION_SPAN
    positions, keeping their contents). Only a linear window's prefix can be kept (rows 0..keep-1), which
    is all the target ever commits; rolling back is a smaller `used`."""
    in_place = True

    def __init__(self, layers: range, capacity: int, kv_heads: int, head_dim: int):
        self.capacity = capacity
        self.names = [f"past_{p}.{i}" for i in layers for p in ("key", "value")]
        self.head_shape = (kv_heads, head_dim)
        self.buffers: dict[str, np.ndarray] = {}
        self.used = 0
        self.fit(1)

    def fit(self, end: int) -> None:
        """Size the buffers for a call whose last row is at position end - 1 (a no-op within a span)."""
        slots = attention_slots(end, self.capacity)
        if self.buffers and next(iter(self.buffers.values())).shape[2] == slots:
            return
        kv, hd = self.head_shape
        self.bound = {}
        for name in self.names:   # one layer's buffer at a time: the old and new K/V never coexist whole
            old = self.buffers.get(name)
            self.buffers[name] = np.zeros((1, kv, slots, hd), np.float32)
            if old is not None:
                keep = min(old.shape[2], slots)
                self.buffers[name][:, :, :keep] = old[:, :, :keep]
        self.bound = {past: (past.replace("past_", "present_"), buf) for past, buf in self.buffers.items()}

    def write(self, outputs: dict[str, np.ndarray], at: int, rows) -> None:
        """The window's K/V are already in place; keeping its first rows is only a length check."""
        if not (isinstance(rows, slice) and rows.start in (0, None) and rows.step in (1, None)):
            raise ValueError(f"in-place K/V keeps a prefix of the window, not rows {rows}")
        if at + rows.stop > self.capacity:
            raise capacity_error("decoding", at + rows.stop, self.capacity)

    @staticmethod
    def window_feeds(start: int, seq: int, capacity: int, spare: int = 0) -> dict[str, np.ndarray]:
        """A fused segment's feeds besides its rows: position_ids (its causal mask is built from them), and
        seqlens_k / total_sequence_length, which every fused segment declares (kept from the
        GroupQueryAttention graphs). Refused before any call when the window would run past the buffers;
        `spare` slots past capacity hold an odd window's extra row (`_even_call`)."""
        if start + seq > capacity + spare:
            raise capacity_error("decoding", start + seq, capacity)
        return {"position_ids": np.arange(start, start + seq, dtype=np.int64)[None],
                "seqlens_k": np.array([start + seq - 1], np.int32),
                "total_sequence_length": np.array(start + seq, np.int32)}

    def run(self, graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The window as calls whose rows compute what they would alone (see axes.py): one call per
        ATTENTION_SPAN block its positions touch, each with an even number of rows."""
        positions = feeds["position_ids"][0]
        start, seq = int(positions[0]), len(positions)
        cuts = [p for p in range(start + 1, start + seq) if p % ATTENTION_SPAN == 0]
        rows = "input_ids" if "input_ids" in feeds else "hidden_states"
        outs = []
        for a, b in zip([start, *cuts], [*cuts, start + seq]):
            self.fit(b)
            part = {**feeds, rows: feeds[rows][:, a - start:b - start], **self.window_feeds(a, b - a, self.capacity)}
            outs.append(self._even_call(graph, part, rows, a, b - a))
        return outs[0] if len(outs) == 1 else {k: np.concatenate([o[k] for o in outs], axis=1) for k in outs[0]}

    def _even_call(self, graph, feeds: dict, rows: str, start: int, seq: int) -> dict[str, np.ndarray]:
        """An odd window gets one more row (its last one again, at the same position): int4 MatMulNBits
        computes rows in pairs and a lone row another way. The extra row's K/V land in the slot after the
        window (the buffers' last slot is kept for it), which no real row reads (causal) and the next token
        overwrites; its outputs are dropped."""
        if seq % 2 == 0:
            return graph.run(feeds, in_place=self.bound)
        padded = {**feeds, **self.window_feeds(start, seq + 1, self.capacity, spare=1)}
        padded[rows] = np.concatenate([feeds[rows], feeds[rows][:, -1:]], axis=1)
        padded["position_ids"] = np.concatenate([feeds["position_ids"], feeds["position_ids"][:, -1:]], axis=1)
        return {k: v[:, :seq] for k, v in graph.run(padded, in_place=self.bound).items()}


class StateKV:
    """K/V held as OpenVINO model state by one stateful segment (export/openvino_target.py): the graph appends
    each window's rows itself, so nothing is fed or copied per call. `used` is the committed length; the
    state may hold more (a window's rejected rows), and is trimmed to `used` before the next call reads it:
    a rejected row left in place would change the softmax's sum order for every later row (measured), so
    a window would no longer compute what single steps do."""
    in_place = True

    def __init__(self, graph, capacity: int):
        # The state lives in the graph's infer request, which several runners may share (check, bench's
        # anatomy): how many positions it holds is kept on the graph, the one place all of them see.
        self.graph, self.request, self.capacity = graph, graph.request, capacity
        self.used = 0                      # committed positions
        self.request.reset_state()
        graph.state_positions = 0
        self.trims, self.trim_seconds = 0, 0.0

    @property
    def held(self) -> int:
        """Positions the state holds (a window's rejected rows included until the next call trims them)."""
        return self.graph.state_positions

    def write(self, outputs: dict[str, np.ndarray], at: int, rows) -> None:
        InPlaceKV.write(self, outputs, at, rows)

    @staticmethod
    def window_feeds(start: int, seq: int, capacity: int) -> dict[str, np.ndarray]:
        if start + seq > capacity:
            raise capacity_error("decoding", start + seq, capacity)
        return {"position_ids": np.arange(start, start + seq, dtype=np.int64)[None],
                "attention_mask": causal_mask(start, seq, start), "beam_idx": np.zeros(1, np.int32)}

    def run(self, graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start, seq = int(feeds["position_ids"][0, 0]), feeds["position_ids"].shape[1]
        self.trim(start)
        out = graph.run(feeds)
        self.graph.state_positions = start + seq
        return out

    def trim(self, keep: int) -> None:
        """Make the state hold exactly positions [0, keep)."""
        if keep == self.held:
            return
        if keep > self.held:
            raise ValueError(f"window at {keep} would leave a gap after {self.held} positions in the state")
        import openvino as ov
        t0 = time.perf_counter()
        if keep == 0:
            self.request.reset_state()
        else:
            for state in self.request.query_state():   # a view of the first `keep` positions, copied in once
                _, kv, _, hd = state.state.shape
                state.state = ov.Tensor(state.state, ov.Coordinate([0, 0, 0, 0]), ov.Coordinate([1, kv, keep, hd]))
        self.graph.state_positions = keep
        self.trims += 1
        self.trim_seconds += time.perf_counter() - t0


def causal_mask(committed: int, seq: int, past_len: int) -> np.ndarray:
    """Window mask for the target: all committed slots, then causal inside the new positions."""
    mask = np.full((1, 1, seq, past_len + seq), MASK_MIN, np.float32)
    mask[..., :committed] = 0.0
    new = mask[0, 0, :, past_len:]
    new[np.tril_indices(seq)] = 0.0
    return mask
