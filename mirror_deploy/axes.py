"""The named axes every graph's inputs and outputs use, and their sizes once a graph is pinned static.

Both sides of the artifact need this: the exporter names the dynamic axes, and the runtimes pad calls to
a static (NPU) graph's pinned sizes. It lives beside the manifest so running a deployment never imports
the export code.
"""
from __future__ import annotations

SEQ, PAST, ROWS = "seq", "past", "rows"
TOTAL = f"{PAST}+{SEQ}"
# A fused target row must compute the same bits in a verify window as alone (speculative output then equals
# autoregressive output). Two rules make it so: the attention reads the K/V buffer up to the next multiple
# of ATTENTION_SPAN positions past the window's last row, so a row's reductions have one length (the runtime
# splits a window that crosses a multiple); and every call has an even number of rows (the runtime repeats
# an odd window's last row), since int4 MatMulNBits computes rows in pairs and a lone row another way.
ATTENTION_SPAN = 256


def attention_slots(end: int, capacity: int) -> int:
    """Length of the K/V buffers bound to a fused call whose last row sits at position end - 1: its span
    (the next multiple of ATTENTION_SPAN, within the capacity) and one slot more, where an odd window's
    extra row writes. The attention reads the whole bound buffer, so the runtime sizes it per call (a
    function of position alone) and the graph slices nothing: a Slice copied the K/V every layer and step."""
    return min(-(-end // ATTENTION_SPAN) * ATTENTION_SPAN, capacity) + 1


def static_dims(seq: int, past: int, rows: int) -> dict[str, int]:
    """Axis name -> size for a graph pinned to `seq` new tokens over a `past`-slot KV buffer."""
    return {SEQ: seq, PAST: past, ROWS: rows, TOTAL: past + seq, "total": past + seq}


def static_draft_dims(branch_batch: int, max_context: int) -> dict[str, int]:
    """The static draft holds at most branch_batch + 1 tokens per call over the whole KV capacity."""
    seq = branch_batch + 1
    return static_dims(seq=seq, past=max_context, rows=seq)
