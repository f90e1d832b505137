"""One target segment, fused vs eager, interleaved: `python -m mirror_deploy.bench.target_attention --checkpoint DIR`.

Cuts the checkpoint to its first `--layers` + 1 layers (real widths, real weights) and writes layers
1..N as a segment (hidden states in, so no embedding table: per-layer figures) both ways (the traced HF layers, and the fused graph built from the weights), each in fp32 and int8, opens them
on ONNX Runtime CPU with one thread, prefills `--context` positions into each one's K/V the way
TargetRunner does, then times windows of 1 and 8 rows at that context: all variants in one loop, order
rotating every round, medians. (The fused K/V is bound at the attention's span whatever the artifact's
capacity, `runtimes/kv.py`, so a larger capacity no longer needs timing apart.)
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ..export.architectures import arch_for
from ..export.fused_target import build_fused_segment
from ..export.graphs import TargetSegment
from ..export.onnx_export import export_graph, quantize_matmuls
from ..export.shapes import ModelShape, graph_io
from ..runtimes.kv import InPlaceKV, KVCache
from ..runtimes.onnxruntime import OrtGraph

ROWS = (1, 8)


def cut_model(checkpoint: Path, layers: int):
    from transformers import AutoModelForCausalLM
    from ..export.loading import open_source
    open_source(checkpoint, "target")     # a clear error for a path that is no checkpoint, before any load
    return AutoModelForCausalLM.from_pretrained(checkpoint, num_hidden_layers=layers, dtype="float32",
                                                attn_implementation="eager").eval()


def write_variants(model, folder: Path, capacity: int, weights: tuple[str, ...]) -> dict[tuple[str, str], Path]:
    """(attention, weights) -> segment file for layers [1, N) of the cut model."""
    arch, shape = arch_for(model.config.model_type), ModelShape.from_config(model.config)
    layers = range(1, shape.num_layers)
    base = {"eager": export_graph(TargetSegment(arch, model, 1, layers.stop),
                                  *graph_io("target_segment", shape, layers), shape, folder / "eager.onnx"),
            "fused": build_fused_segment(model, arch, shape, layers, capacity, folder / "fused.onnx")}
    paths = {}
    for kind, path in base.items():
        for w in weights:
            if w == "fp32":
                paths[kind, w] = path
                continue
            copy = folder / f"{kind}-{w}.onnx"
            copy.write_bytes(path.read_bytes())   # its weights, if external, stay in path's side file
            quantize_matmuls(copy, int(w[3:]))
            paths[kind, w] = copy
    return paths


def prefill(graph, kv, hidden: np.ndarray, chunk: int = 128) -> None:
    for at in range(0, hidden.shape[1], chunk):
        seq = hidden[:, at:at + chunk].shape[1]
        out = kv.run(graph, {"hidden_states": hidden[:, at:at + seq], **kv.window_feeds(at, seq, kv.capacity)})
        kv.write(out, at, slice(0, seq))
        kv.used = at + seq


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--context", type=int, default=500)
    ap.add_argument("--capacity", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--weights", default="fp32,int8")
    args = ap.parse_args(argv)
    model = cut_model(args.checkpoint, args.layers + 1)
    shape = ModelShape.from_config(model.config)
    n = args.layers
    # Hidden states on the scale of a real residual stream after layer 0.
    hidden = np.random.default_rng(0).standard_normal((1, args.context + max(ROWS), shape.hidden_size),
                                                      np.float32)
    with tempfile.TemporaryDirectory(dir="/tmp") as scratch:
        paths = write_variants(model, Path(scratch), args.capacity, tuple(args.weights.split(",")))
        del model
        calls, outputs = {}, {}
        for (kind, w), path in paths.items():
            graph = OrtGraph(path, f"{kind}-{w}", "cpu", 1)
            kv = (InPlaceKV if kind == "fused" else KVCache)(range(1, n + 1), args.capacity, shape.kv_heads,
                                                              shape.head_dim)
            prefill(graph, kv, hidden[:, :args.context])
            for r in ROWS:
                feeds = {"hidden_states": hidden[:, args.context:args.context + r],
                         **kv.window_feeds(args.context, r, args.capacity)}
                name = f"{kind} {w} × {r}"
                calls[name] = lambda graph=graph, kv=kv, feeds=feeds: kv.run(graph, feeds)
                outputs[name] = calls[name]()["hidden_out"]
        samples = {k: [] for k in calls}
        names = list(calls)
        for i in range(args.rounds):
            for name in names[i % len(names):] + names[:i % len(names)]:
                t0 = time.perf_counter()
                calls[name]()
                samples[name].append(time.perf_counter() - t0)
    ms = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
    table = Table(title=f"{args.checkpoint.name}: layers 1..{n}, context {args.context}, "
                        f"ORT CPU 1 thread, {args.rounds} interleaved rounds, medians")
    for col in ("weights", "rows", "eager ms/layer", "fused ms/layer", "fused ÷ eager",
                "max |fused − eager| ÷ max |eager|"):
        table.add_column(col)
    for w in args.weights.split(","):
        for r in ROWS:
            e, f = (ms[f"{k} {w} × {r}"] for k in ("eager", "fused"))
            eager = outputs[f"eager {w} × {r}"]
            diff = float(np.abs(outputs[f"fused {w} × {r}"] - eager).max() / np.abs(eager).max())
            table.add_row(w, str(r), f"{e / n:.2f}", f"{f / n:.2f}", f"{f / e:.2f}", f"{diff:.1e}")
        for k in ("eager", "fused"):
            print(f"{k} {w}: 8 rows ÷ 1 row = {ms[f'{k} {w} × 8'] / ms[f'{k} {w} × 1']:.2f}")
    Console().print(table)


if __name__ == "__main__":
    from . import command
    command(main)
