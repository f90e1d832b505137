"""Where one fused target segment's time goes, op type by op type: ONNX Runtime's own profiler.

    python -m mirror_deploy.bench.op_profile ART [--graph target_seg1] [--context 500] [--rows 2] [--runs 30]

The segment runs as a step does: its K/V buffers bound in place at the attention's span
(`axes.attention_slots`), `rows` new positions after `context` filled ones, the profile's thread and
spinning settings for the target. Prints the call's median time, the kernels' sum and each op type's
share (ms per call and nodes per call). A whole-step A/B on this machine moves by more than a few percent
between processes; an op's share does not, which is what tells a graph change from the noise.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from ..artifact import read_manifest
from ..errors import MirrorDeployError
from ..runtimes.kv import InPlaceKV
from ..runtimes.onnxruntime import OrtGraph
from ..targets import Profile


def profile_segment(folder: Path, graph: str, context: int, rows: int, runs: int) -> tuple[float, dict]:
    """(median ms of the call, {op type: (ms per call, nodes per call)})."""
    manifest = read_manifest(folder)
    entry = manifest.graphs.get(graph)
    if entry is None or not any(spec["name"].startswith("past_key.") for spec in entry.inputs):
        raise MirrorDeployError(f"{graph} is not a fused target segment of {folder}",
                                f"use one of: {', '.join(manifest.target_segments())}")
    if context + rows > manifest.max_context:
        raise MirrorDeployError(f"context {context} + {rows} rows exceeds the artifact's {manifest.max_context} "
                                "positions", "lower --context")
    target = Profile.from_dict(manifest.profile).target
    first, stop = entry.layers
    kv = InPlaceKV(range(first, stop), manifest.max_context, manifest.target["kv_heads"], manifest.target["head_dim"])
    kv.fit(context + rows)                       # the buffers a step at this context binds
    rng = np.random.default_rng(0)
    for buf in kv.buffers.values():
        buf[...] = rng.standard_normal(buf.shape)
    feeds = {"input_ids": np.full((1, rows), 100, np.int64),
             "hidden_states": rng.standard_normal((1, rows, manifest.target["hidden_size"])).astype(np.float32),
             **kv.window_feeds(context, rows, manifest.max_context)}
    with tempfile.TemporaryDirectory() as scratch:
        segment = OrtGraph(folder / entry.file, graph, "cpu", target.threads or 0, target.spinning,
                           profile_prefix=str(Path(scratch) / "op"))
        binding = segment.bind(feeds, kv.bound)      # as a step binds it: the K/V in place
        for _ in range(runs):
            segment.session.run_with_iobinding(binding)
        events = json.loads(Path(segment.session.end_profiling()).read_text())
    calls = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    spent, count = collections.defaultdict(float), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            spent[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    ops = {op: (spent[op] / 1e3 / runs, count[op] / runs) for op in sorted(spent, key=spent.get, reverse=True)}
    return statistics.median(calls) / 1e3, ops


def main(argv=None) -> None:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--graph", default="target_seg1")
    parser.add_argument("--context", type=int, default=500)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args(argv)
    call_ms, ops = profile_segment(args.artifact, args.graph, args.context, args.rows, args.runs)
    kernels = sum(ms for ms, _ in ops.values())
    table = Table(title=f"{args.graph} of {args.artifact}, {args.rows} rows after {args.context} positions: "
                        f"call {call_ms:.2f} ms (median), kernels {kernels:.2f} ms (mean), "
                        f"{sum(n for _, n in ops.values()):.0f} nodes")
    for col in ("op type", "ms per call", "share", "nodes"):
        table.add_column(col, justify="left" if col == "op type" else "right")
    for op, (ms, nodes) in ops.items():
        table.add_row(op, f"{ms:.3f}", f"{ms / kernels:.1%}", f"{nodes:.0f}")
    Console().print(table)


if __name__ == "__main__":
    from . import command
    command(main)
