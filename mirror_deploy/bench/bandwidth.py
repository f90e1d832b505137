"""Weight bytes per graph and the bandwidth each call reaches: the memory-limit view of `bench --anatomy`.

A decoding step at batch 1 streams every weight it multiplies by once, so a graph's floor is its streamed
bytes ÷ the machine's memory bandwidth; a window of r rows costs little more while the kernel stays
memory-bound. Streamed bytes are the graph's weights without its token table (a lookup reads a few rows).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..artifact import Manifest
from ..runtimes.loader import draft_graph_name

_EMBEDDING = "embed_tokens"


def _onnx_bytes(path: Path) -> tuple[int, int]:
    """(all weight bytes, bytes without the token table) of an ONNX graph, from initializer shapes."""
    model = onnx.load(str(path), load_external_data=False)
    total = table = 0
    for t in model.graph.initializer:
        size = int(np.prod(t.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        total += size
        table += size if _EMBEDDING in t.name else 0
    return total, total - table


def _ir_bytes(path: Path) -> tuple[int, int]:
    from ..runtimes.openvino import core, load_kernel, needs_kernel
    if needs_kernel(path):   # an IR holding our kernel's op reads only once the extension is loaded
        load_kernel()
    model = core().read_model(str(path))
    total = table = 0
    for op in model.get_ops():
        if op.get_type_name() != "Constant":
            continue
        size = op.get_byte_size()
        total += size
        table += size if _EMBEDDING in op.get_friendly_name() else 0
    return total, total - table


def graph_bytes(folder: Path, manifest: Manifest, name: str) -> tuple[int, int]:
    entry = manifest.graphs[name]
    path = Path(folder) / entry.file
    return _onnx_bytes(path) if entry.format == "onnx" else _ir_bytes(path)


def bandwidth_rows(folder: Path, manifest: Manifest, profile, figures: dict[str, float], gamma: int) -> list[tuple]:
    """(graph, weight MB, streamed MB, ms at 1 row, GB/s at 1 row, {rows: ratio to 1 row}) per timed graph."""
    from ..timing import draft_key, head_key, segment_key
    rows = []
    names = manifest.target_segments()
    widths = sorted({int(k.rsplit("× ", 1)[1]) for k in figures if k.startswith("target step ×")})
    for name in names:
        a, b = manifest.graphs[name].layers
        keys = {r: segment_key(a, b, r) for r in widths}
        rows.append((name, *graph_bytes(folder, manifest, name), keys))
    rows.append(("target_head", *graph_bytes(folder, manifest, "target_head"), {r: head_key(r) for r in widths}))
    if manifest.has_draft:
        draft = draft_graph_name(manifest, profile)
        rows.append((draft, *graph_bytes(folder, manifest, draft), {w: draft_key(w) for w in (1, 4, 8)}))
    out = []
    for name, total, streamed, keys in rows:
        one = figures.get(keys.get(1))
        if not one:
            continue
        ratios = {r: figures[k] / one for r, k in keys.items() if r != 1 and k in figures}
        out.append((name, total / 1e6, streamed / 1e6, one, streamed / one / 1e6, ratios))
    return out


def print_bandwidth(rows: list[tuple], console) -> None:
    from rich.table import Table
    widths = sorted({r for *_, ratios in rows for r in ratios})
    table = Table(title="weights and bandwidth per graph (1 row; windows as a ratio to 1 row; draft: call width)")
    for col in ("graph", "weights MB", "streamed MB", "ms × 1", "GB/s × 1", *(f"× {w} ÷ × 1" for w in widths)):
        table.add_column(col, justify="right" if col != "graph" else "left")
    for name, total, streamed, one, gbs, ratios in rows:
        table.add_row(name, f"{total:.0f}", f"{streamed:.0f}", f"{one:.2f}", f"{gbs:.1f}",
                      *(f"{ratios[w]:.2f}×" if w in ratios else "-" for w in widths))
    console.print(table)
