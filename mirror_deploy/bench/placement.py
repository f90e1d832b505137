"""Thread placement on a CPU-only machine: which runtime settings win when target and draft run at once
(a Mirror step) and one after the other (AR, SD).

    python -m mirror_deploy.bench.placement ARTIFACT [--segment target_seg1] [--context 500] [--rounds 9]

One target segment (ONNX Runtime) and the draft (OpenVINO) are opened under several settings in one
process; every round times, in rotated order, each target setting alone, each draft setting alone, each
pair back to back on one thread (serial: SD's verify then draft) and each pair started together on two
threads (overlapped: Mirror's suffix beside the draft), medians in ms. The last table is RSS for two
sessions of one segment: separate, and sharing its weights (add_initializer), with prepacking on and off.
"""
from __future__ import annotations

import argparse
import gc
import os
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..artifact import read_manifest
from ..decoding.draft import DraftRunner
from ..decoding.drive import DraftDriver
from ..runtimes import openvino as ovrt
from ..runtimes.kv import COMMITTED
from ..timing import interleaved

ALL = os.cpu_count() or 1
TARGETS = {  # name -> (intra-op threads, spinning, prepacked weights)
    "ort 1t": (1, False, True), f"ort {ALL}t spin": (ALL, True, True), f"ort {ALL}t no-spin": (ALL, False, True),
    f"ort {ALL}t no-spin no-prepack": (ALL, False, False)}
DRAFTS = {  # name -> OpenVINO CPU config beyond precision/quantization (None: the plugin's defaults)
    "ov 1t": {"INFERENCE_NUM_THREADS": "1", "NUM_STREAMS": "1", "ENABLE_CPU_PINNING": "NO"},
    f"ov {ALL}t": {"INFERENCE_NUM_THREADS": str(ALL), "NUM_STREAMS": "1", "ENABLE_CPU_PINNING": "NO"},
    f"ov {ALL}t pinned": {"INFERENCE_NUM_THREADS": str(ALL), "NUM_STREAMS": "1", "ENABLE_CPU_PINNING": "YES"},
    "ov defaults": {},
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def ort_session(path: Path, threads: int, spin: bool, prepack: bool = True, initializers=None):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    for name, value in (initializers or {}).items():
        opts.add_initializer(name, value)
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def segment_feeds(session, context: int, rows: int, rng) -> dict:
    feeds = {}
    for i in session.get_inputs():
        if i.name == "hidden_states":
            feeds[i.name] = rng.standard_normal((1, rows, i.shape[2])).astype(np.float32)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(context, context + rows, dtype=np.int64)[None]
        elif i.name == "attention_mask":
            feeds[i.name] = np.zeros((1, 1, rows, context + rows), np.float32)
        else:   # past_key.L / past_value.L [1, past, heads, dim]
            feeds[i.name] = rng.standard_normal((1, context, i.shape[2], i.shape[3])).astype(np.float32)
    return feeds


def draft_call(folder: Path, manifest, config: dict, context: int, width: int, rng):
    """A draft call of `width` committed-chain tokens at `context`, rolled back after each call."""
    base = ovrt.compile_config
    ovrt.compile_config = lambda *a, **k: {**{k2: v for k2, v in base(*a, **k).items()
                                              if k2 not in ("INFERENCE_NUM_THREADS", "NUM_STREAMS",
                                                            "ENABLE_CPU_PINNING")}, **config}
    try:
        graph = ovrt.OvGraph(folder / manifest.graphs["draft_stateful"].file, "draft", "CPU", threads=1,
                             precision="f32", int8_activations=manifest.graphs["draft_stateful"].weights != "fp32")
    finally:
        ovrt.compile_config = base
    driver = DraftDriver(DraftRunner(graph, manifest))
    vocab = manifest.draft["vocab_size"]
    driver.commit([int(t) for t in rng.integers(0, vocab, context)])
    tokens = [int(t) for t in rng.integers(0, vocab, width)]

    def call():
        driver.cache.ensure_room(width)
        driver.call(tokens, [COMMITTED] + [driver.call_slot(j) for j in range(width - 1)])
        driver.rollback()
    return call


def together(a, b):
    """Start `a` on another thread and `b` here; done when both are (a Mirror step's overlap)."""
    def run():
        t = threading.Thread(target=a)
        t.start()
        b()
        t.join()
    return run


def sharing_rss(path: Path) -> dict[str, float]:
    """RSS growth (MB) of two 1-thread sessions of one segment: separate, and sharing its weights."""
    import onnx
    from onnx import numpy_helper
    out = {}
    for label, prepack in (("prepack on", True), ("prepack off", False)):
        gc.collect()
        before = rss_mb()
        pair = [ort_session(path, 1, False, prepack) for _ in range(2)]
        out[f"two separate sessions, {label}"] = rss_mb() - before
        del pair
        gc.collect()
        before = rss_mb()
        model = onnx.load(str(path))
        values = {t.name: ort.OrtValue.ortvalue_from_numpy(numpy_helper.to_array(t)) for t in model.graph.initializer
                  if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2}
        del model
        pair = [ort_session(path, 1, False, prepack, values) for _ in range(2)]
        out[f"two sessions sharing weights, {label}"] = rss_mb() - before
        del pair, values
        gc.collect()
    return out


def measure(folder: Path, segment: str, context: int, rounds: int, rows: int, width: int) -> dict[str, float]:
    manifest = read_manifest(folder)
    rng = np.random.default_rng(0)
    path = folder / manifest.graphs[segment].file
    targets, feeds = {}, None
    for name, (threads, spin, prepack) in TARGETS.items():
        session = ort_session(path, threads, spin, prepack)
        feeds = feeds or segment_feeds(session, context, rows, rng)
        targets[name] = lambda s=session: s.run(None, feeds)
    drafts = {name: draft_call(folder, manifest, config, context, width, rng) for name, config in DRAFTS.items()}
    items = {**{f"{t} alone": f for t, f in targets.items()}, **{f"{d} alone": f for d, f in drafts.items()}}
    for t, tf in targets.items():
        for d, df in drafts.items():
            if "prepack" in t:
                continue
            items[f"{t} then {d}"] = lambda tf=tf, df=df: (tf(), df())
            items[f"{t} beside {d}"] = together(df, tf)
    return {k: v * 1e3 for k, v in interleaved(items, rounds).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--segment", default="target_seg1")
    parser.add_argument("--context", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--rows", type=int, default=3, help="target window rows (γ+1)")
    parser.add_argument("--width", type=int, default=5, help="draft call width (branches + 1)")
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args()
    figures = measure(args.artifact, args.segment, args.context, args.rounds, args.rows, args.width)
    print(f"| {args.segment} × {args.rows} rows, draft × {args.width}, context {args.context} | ms (median) |")
    print("|---|---|")
    for name, ms in figures.items():
        print(f"| {name} | {ms:.1f} |")
    if not args.skip_rss:
        print("\n| RSS growth | MB |\n|---|---|")
        for name, mb in sharing_rss(args.artifact / read_manifest(args.artifact).graphs[args.segment].file).items():
            print(f"| {name} | {mb:.0f} |")


if __name__ == "__main__":
    from . import command
    command(main)
