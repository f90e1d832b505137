"""Runtime figures, measured here rather than assumed: `python -m mirror_deploy.bench.runtimes`.

(a) Wrapper overhead: OrtGraph.run / OvGraph.run against the raw ONNX Runtime session / OpenVINO infer
    request on the same prebuilt feeds, one tiny draft decode call, A/B interleaved (order alternating),
    medians. Goal: the wrapper adds ≤ 10% to a call.
(b) Overlap through our runtimes: target windows (segments + head on ONNX Runtime, 8 tokens, through
    TargetDriver) in one thread and draft calls (8 tokens on OpenVINO, through DraftDriver) in another,
    on a medium random model so each call is tens of ms. Serial time ÷ concurrent time; 2.0 is perfect
    overlap, goal ≥ 1.8.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ..artifact import read_manifest
from ..export.pipeline import ExportOptions, export_artifact
from ..decoding.drive import DraftDriver, TargetDriver
from ..runtimes.base import only_known
from ..runtimes.kv import COMMITTED
from ..runtimes.loader import open_draft, open_target
from ..runtimes.onnxruntime import OrtGraph
from ..runtimes.openvino import OvGraph
from ..targets import load_profile
from ..tiny import build_model, build_tiny_pair, perturbed, tiny_config, tiny_tokenizer

QUIET = Console(quiet=True)
WINDOW = 8


def build_medium_pair(folder: Path, vocab: int = 8000, hidden: int = 512, layers: int = 8) -> tuple[Path, Path]:
    """A llama-shaped random model (8 layers × 512, vocab 8000) big enough that a call takes tens of ms; the draft is a perturbed
    copy, so target windows and draft calls cost about the same (balanced threads)."""
    target = build_model(tiny_config("llama", layers, vocab, hidden=hidden), seed=0)
    paths = []
    for name, model in (("target", target), ("draft", perturbed(target, 0.1, 1))):
        model.save_pretrained(folder / name)
        tiny_tokenizer(vocab).save_pretrained(folder / name)
        paths.append(folder / name)
    return paths[0], paths[1]


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def _ab(wrapped, raw, calls: int) -> tuple[float, float]:
    """Median seconds of each, interleaved with alternating order so drift and cache effects hit both."""
    for _ in range(20):
        wrapped(), raw()
    a, b = [], []
    for i in range(calls):
        for fn, sink in ((wrapped, a), (raw, b)) if i % 2 == 0 else ((raw, b), (wrapped, a)):
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    return _median_us(a), _median_us(b)


def wrapper_overhead(folder: Path, calls: int) -> list[tuple[str, float, float]]:
    """(runtime, wrapper µs, raw µs) for one draft decode call after a 32-token committed prefix."""
    m = read_manifest(folder)
    ort_graph = OrtGraph(folder / "draft.onnx", "draft", "cpu", 1)
    ov_graph = OvGraph(folder / "draft.onnx", "draft", "CPU", 1, "f32")   # explicit K/V feeds, as for ORT
    driver = DraftDriver.for_manifest(ort_graph, m)
    driver.commit(np.arange(32) % m.draft["vocab_size"])
    feeds, _ = driver.cache.call_feeds([5], [COMMITTED], [32])
    ort_feeds = {n: feeds[n] for n in ort_graph.input_names}
    ov_feeds = {n: feeds[n] for n in ov_graph.input_names}
    session, request = ort_graph.session, ov_graph.request

    def raw_ov():  # the same runtime work the wrapper asks for, minus its own Python
        request.start_async(ov_feeds, share_inputs=True)
        request.wait()
        return [request.get_output_tensor(i).data for i in range(len(ov_graph.output_names))]

    return [("onnxruntime", *_ab(lambda: ort_graph.run(feeds), lambda: session.run(None, ort_feeds), calls)),
            ("openvino", *_ab(lambda: ov_graph.run(feeds), raw_ov, calls))]


def _loops(folder: Path, prefill: int = 64) -> dict[str, tuple]:
    """Step closures on the cpu-sim profile's graphs, each repeating one step on a `prefill`-token
    context: "ours" goes through TargetDriver / DraftDriver (masks, KV writes, rollback, output copies),
    "raw" calls the ORT sessions and the OpenVINO request directly on the same feeds, prebuilt."""
    m = read_manifest(folder)
    profile = load_profile("cpu-sim")
    graphs = open_target(folder, m, profile)
    target = TargetDriver.for_manifest(graphs, m)
    draft = DraftDriver.for_manifest(open_draft(folder, m, profile), m)
    ids = np.random.default_rng(0).integers(0, m.target["vocab_size"], prefill + WINDOW)
    target.window(ids[:prefill])
    draft.commit(ids[:prefill])
    window = ids[prefill:]
    chain = [COMMITTED] + [draft.call_slot(j) for j in range(WINDOW - 1)]

    def target_step():
        target.window(window, start=prefill)

    def draft_step():
        draft.call(window, chain)
        draft.rollback()

    common = {**target.window_feeds(prefill, WINDOW), "output_rows": np.arange(WINDOW)}
    # The raw target step: every segment's session, then the head's, on prebuilt feeds (fused segments:
    # on a prebuilt IOBinding over their in-place K/V buffers).
    raw_calls, hidden = [], window[None]
    for i, graph in enumerate(graphs.segments):
        kv = target.kv[i]
        feeds = {**common, "input_ids": hidden, "hidden_states": hidden}
        if kv.in_place:
            binding = graph.bind(feeds, kv.bound)
            graph.session.run_with_iobinding(binding)
            hidden = binding.get_outputs()[-1].numpy()          # hidden_out, bound last
            raw_calls.append(lambda session=graph.session, binding=binding: session.run_with_iobinding(binding))
        else:
            feeds = only_known({**feeds, **kv.past_feeds(False)}, graph.input_names)
            hidden = graph.session.run(None, feeds)[0]
            raw_calls.append(lambda session=graph.session, feeds=feeds: session.run(None, feeds))
    head_feeds = {"hidden_states": hidden}
    raw_calls.append(lambda session=graphs.head.session: session.run(None, head_feeds))
    draft_feeds = only_known(draft.cache.call_feeds(window, chain, range(prefill, prefill + WINDOW))[0],
                             draft.graph.input_names)
    request = draft.graph.request

    def raw_target():
        for call in raw_calls:
            call()

    def raw_draft():
        request.start_async(draft_feeds, share_inputs=True)
        request.wait()

    return {"raw": (raw_target, raw_draft), "ours": (target_step, draft_step)}


def _timed(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - start


def _concurrent(target_step, n_t: int, draft_step, n_d: int) -> tuple[float, float]:
    """Wall seconds and process CPU seconds; CPU ÷ wall is how many cores the two threads really got."""
    barrier = threading.Barrier(3)

    def worker(fn, n):
        barrier.wait()
        for _ in range(n):
            fn()

    threads = [threading.Thread(target=worker, args=a) for a in ((target_step, n_t), (draft_step, n_d))]
    for t in threads:
        t.start()
    barrier.wait()
    start, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    return time.perf_counter() - start, time.process_time() - cpu


def overlap(folder: Path, rounds: int, steps: int) -> dict[str, dict]:
    """Per variant: median per-call times, serial and concurrent seconds, serial ÷ concurrent. The
    variants alternate within each round so load from elsewhere hits both alike."""
    loops = _loops(folder)
    plan = {}
    for name, (target_step, draft_step) in loops.items():
        _timed(target_step, 3), _timed(draft_step, 3)  # warm-up: first calls allocate
        per_t, per_d = _timed(target_step, 10) / 10, _timed(draft_step, 10) / 10
        plan[name] = max(1, round(steps * per_t / per_d))  # balance the two threads' work
    stats = {name: {"t": [], "d": [], "serial": [], "concurrent": [], "cores": []} for name in loops}
    for _ in range(rounds):
        for name, (target_step, draft_step) in loops.items():
            n_d, st = plan[name], stats[name]
            t, d = _timed(target_step, steps), _timed(draft_step, n_d)
            st["t"].append(t / steps), st["d"].append(d / n_d), st["serial"].append(t + d)
            wall, cpu = _concurrent(target_step, steps, draft_step, n_d)
            st["concurrent"].append(wall), st["cores"].append(cpu / wall)
    med = statistics.median
    return {name: {"target_ms": med(st["t"]) * 1e3, "draft_ms": med(st["d"]) * 1e3, "calls": (steps, plan[name]),
                   "serial_s": med(st["serial"]), "concurrent_s": med(st["concurrent"]), "cores": med(st["cores"]),
                   "ratios": [s / c for s, c in zip(st["serial"], st["concurrent"])]}
            for name, st in stats.items()}


def _artifact(root: Path, name: str, build, opts: ExportOptions, console) -> Path:
    out = root / f"{name}-art"
    if not (out / "manifest.json").is_file():
        console.print(f"exporting the {name} artifact into {out} …")
        export_artifact(*build(root / name), out, opts, QUIET)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="A/B call pairs for the overhead figure")
    parser.add_argument("--rounds", type=int, default=5, help="serial/concurrent rounds for the overlap")
    parser.add_argument("--steps", type=int, default=40, help="target windows per round")
    parser.add_argument("--workdir", type=Path, help="keep the exported artifacts here and reuse them")
    args = parser.parse_args(argv)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="mirror-bench-") as tmp:
        root = args.workdir or Path(tmp)
        tiny = _artifact(root, "tiny", build_tiny_pair, ExportOptions(kappa=4, gamma=4, max_context=256,
                                                                      branch_batch=4), console)
        medium = _artifact(root, "medium", build_medium_pair, ExportOptions(max_context=256), console)
        rows = wrapper_overhead(tiny, args.calls)
        ov = overlap(medium, args.rounds, args.steps)

    table = Table(title=f"(a) wrapper overhead, tiny draft decode call, median of {args.calls} A/B pairs")
    for col in ("runtime", "wrapper µs", "raw µs", "overhead", "goal"):
        table.add_column(col, justify="right")
    for name, wrapped, raw in rows:
        share = (wrapped - raw) / wrapped
        table.add_row(name, f"{wrapped:.1f}", f"{raw:.1f}", f"{share:.1%}",
                      "[green]≤ 10%[/]" if share <= 0.10 else "[red]> 10%[/]")
    console.print(table)
    table = Table(title=f"(b) ORT target ‖ OpenVINO draft overlap, {WINDOW}-token calls, median of {args.rounds} rounds")
    for col in ("", "target ms", "draft ms", "calls t/d", "serial s", "concur. s", "cores", "ratio", "goal"):
        table.add_column(col, justify="right")
    for name, r in ov.items():
        ratio = statistics.median(r["ratios"])
        table.add_row(name, f"{r['target_ms']:.1f}", f"{r['draft_ms']:.1f}", "/".join(map(str, r["calls"])),
                      f"{r['serial_s']:.2f}", f"{r['concurrent_s']:.2f}", f"{r['cores']:.2f}", f"{ratio:.2f}",
                      "[green]≥ 1.8[/]" if ratio >= 1.8 else "[red]< 1.8[/]")
    console.print(table)
    for name, r in ov.items():
        console.print(f"{name}: ratio per round {', '.join(f'{x:.2f}' for x in r['ratios'])}")
    if min(r["cores"] for r in ov.values()) < 1.8:
        console.print("[yellow]the two threads got fewer than 1.8 cores while running together (CPU ÷ wall): "
                      "other work shared the machine, so (b) understates the overlap[/]")


if __name__ == "__main__":
    from . import command
    command(main)
