"""A static (NPU-shaped) draft compiled at several shapes, each call run by the smallest that holds it.

An NPU runs static graphs only, so the artifact pins the draft to its widest call (branch_batch + 1 tokens)
over the whole KV capacity (max_context), and a call padded to that shape pays for both on every call: a
one-token chain step at position 40 of a 1024-slot capacity attends over 1033 slots for 9 rows. Here the
same IR is compiled at capacity buckets (powers of two from 128 up to max_context) and two widths (1 and the
full width); a call goes to the smallest variant its tokens and its highest live slot fit. The feeds are
built for the full shape (draft_cache.call_feeds, which also says how many rows are real and how many slots
are in use) and cut down here: rows past the real ones are padding, slots past the used ones are masked.
The draft only proposes tokens, which the target verifies, so a variant's other rounding never reaches
the output.
"""
from __future__ import annotations

import numpy as np

ROWS, USED = "_rows", "_used"   # call facts in the feeds (no graph input has these names)
SMALLEST_BUCKET = 128


def capacity_buckets(capacity: int) -> list[int]:
    sizes, size = [], SMALLEST_BUCKET
    while size < capacity:
        sizes.append(size)
        size *= 2
    return [*sizes, capacity]


def widths(width: int) -> list[int]:
    return sorted({1, width})


def variant_shapes(inputs: list[dict], width: int, slots: int) -> dict[str, list[int]]:
    """The draft's inputs pinned to `width` tokens over `slots` past slots."""
    shapes = {}
    for spec in inputs:
        name, dims = spec["name"], list(spec["shape"])
        if name.startswith("past_"):
            dims[1] = slots
        elif name == "attention_mask":
            dims[2:] = [width, slots + width]
        elif name in ("input_ids", "position_ids"):
            dims[1] = width
        elif name == "output_rows":
            dims = [width]
        shapes[name] = dims
    return shapes


def cut(feeds: dict, width: int, slots: int, capacity: int) -> dict:
    """Full-shape feeds cut to a variant: the first `width` rows, past slots [0, slots), and the mask's
    columns for those slots and for the first `width` new tokens."""
    mask = feeds["attention_mask"][:, :, :width]
    out = {"input_ids": feeds["input_ids"][:, :width], "position_ids": feeds["position_ids"][:, :width],
           "attention_mask": np.ascontiguousarray(np.concatenate([mask[..., :slots], mask[..., capacity:capacity + width]],
                                                                 axis=-1)),
           "output_rows": np.arange(width, dtype=np.int64)}
    for name, value in feeds.items():
        if name.startswith("past_"):
            out[name] = value[:, :slots]
    return out


class BucketedDraft:
    """Looks like the static draft graph (same names, static_dims, timer) to the draft runner."""

    def __init__(self, variants: dict[tuple[int, int], object], width: int, capacity: int):
        self.variants, self.width, self.capacity = variants, width, capacity
        self.buckets = tuple(sorted({slots for _, slots in variants}))   # the capacities a call may run at
        self.full = variants[(width, capacity)]
        for graph in variants.values():
            graph.timer = self.full.timer   # one timer for the draft, whichever variant ran
        self.calls: dict[tuple[int, int], int] = {key: 0 for key in variants}

    def __getattr__(self, name):   # only for names not set here
        return getattr(self.full, name)   # name, device, static_dims, input/output names, timer, ...

    def choose(self, rows: int, used: int) -> tuple[int, int]:
        width = min(w for w, _ in self.variants if w >= rows)
        slots = min(s for w, s in self.variants if w == width and s >= max(used, 1))
        return width, slots

    def run(self, feeds: dict) -> dict:
        if ROWS not in feeds:                      # a caller that does not say: the full shape
            return self.full.run(feeds)
        key = self.choose(int(feeds[ROWS]), int(feeds[USED]))
        self.calls[key] += 1
        return self.variants[key].run(cut(feeds, *key, self.capacity))
