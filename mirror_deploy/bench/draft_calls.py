"""The draft call, old explicit graph against the stateful one: `python -m mirror_deploy.bench.draft_calls`.

Both graphs are built here from one draft checkpoint with the export's own code, with the same weight
compression (int4 by default) and run through the same DraftRunner on OpenVINO CPU, one thread, f32:
- explicit: `draft.onnx` -> IR, past K/V fed as position-major inputs every call (what the artifact's
  dynamic OpenVINO draft was before the stateful graph);
- stateful: `draft_stateful.xml`, K/V held as model state, fused ScaledDotProductAttention;
- stateful+a8: the same, with int8 dynamic activation quantization in front of the compressed weights
  (what the runtime loader enables for an int4/int8 draft).
Each timed call is one runner call (feeds, mask and graph) of WIDTH tokens branching off a committed
context of --context tokens; its slots are then dropped and compacted away outside the timer, so every
call sees the same context. Variants alternate order call by call; figures are medians. Compaction, which
the decoder pays once every many steps, is timed on its own.

(a) `--stand-in`: random weights at Qwen2.5-0.5B widths (24 layers, 896 wide, 14 heads, 2 KV heads) with a
    4096-token vocabulary (random weights: the layers' cost without the real LM head); (b) `--checkpoint DIR`: a real draft,
    real LM head included (e.g. ~/.cache/mirror-deploy/qwen2.5-coder-0.5b-instruct).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from rich.console import Console
from rich.table import Table

from ..decoding.draft import DraftRunner
from ..export.graphs import FullModel
from ..export.loading import open_source
from ..export.onnx_export import export_graph
from ..export.openvino_ir import convert_draft, convert_stateful_draft
from ..export.pipeline import trace_stateful_draft
from ..export.shapes import draft_top_m, graph_io
from ..runtimes.kv import COMMITTED
from ..runtimes.openvino import OvGraph
from ..tiny import build_model, tiny_tokenizer

WIDTHS = (1, 4, 8)
DROPPED = 96   # dropped slots left in the K/V for the cost-of-masking figure


def build_stand_in(folder: Path) -> Path:
    """Random weights at the 0.5B draft's widths (small vocabulary: the layers' cost, not the head's)."""
    from transformers import Qwen2Config
    if not (folder / "config.json").is_file():
        config = Qwen2Config(vocab_size=4096, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                             rope_theta=1e6, tie_word_embeddings=True)
        build_model(config, seed=0).save_pretrained(folder)
        tiny_tokenizer(4096).save_pretrained(folder)
    return folder


def build_graphs(checkpoint: Path, out: Path, weights: str, console: Console) -> tuple[Path, Path]:
    """(explicit IR, stateful IR) of one draft, reused from `out` when already there."""
    explicit, stateful = out / "draft_explicit.xml", out / "draft_stateful.xml"
    if explicit.is_file() and stateful.is_file():
        return explicit, stateful
    out.mkdir(parents=True, exist_ok=True)
    source = open_source(checkpoint, "draft")
    model = source.load_model()
    layers = range(source.shape.num_layers)
    console.print(f"exporting {checkpoint.name}: explicit and stateful draft, {weights} weights …")
    inputs, outputs = graph_io("draft", source.shape, layers)
    module = FullModel(source.arch, model, 0, layers.stop, draft_top_m(source.shape))
    onnx_path = export_graph(module, inputs, outputs, source.shape, out / "draft.onnx")
    convert_draft(onnx_path, explicit, weights)
    for f in out.glob("draft.onnx*"):
        f.unlink()
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        convert_stateful_draft(trace_stateful_draft(Path(scratch), source, model), stateful, weights)
    return explicit, stateful


def _runner(xml: Path, config: dict, capacity: int, int8_activations: bool = False) -> DraftRunner:
    graph = OvGraph(xml, "draft", "CPU", 1, "f32", int8_activations=int8_activations)
    shape = {"num_layers": config["num_layers"], "kv_heads": config["kv_heads"], "head_dim": config["head_dim"]}
    return DraftRunner(graph, SimpleNamespace(draft=shape, max_context=capacity))


def _call(runner: DraftRunner, tokens: list[int], context: int) -> float:
    """One timed call of len(tokens) branch roots after the committed context; then drop them."""
    start = time.perf_counter()
    runner.call(tokens, [COMMITTED] * len(tokens), [context] * len(tokens))
    took = time.perf_counter() - start
    runner.cache.rollback_speculative()
    runner.cache.compact()
    return took


def _compaction_ms(runner: DraftRunner, context: int, dead: int, repeats: int = 5) -> float:
    """Median ms to compact `dead` dropped slots away from `context` live ones."""
    samples = []
    for _ in range(repeats):
        runner.call(list(range(dead)), [COMMITTED] * dead, [context] * dead)
        runner.cache.rollback_speculative()
        start = time.perf_counter()
        runner.cache.compact()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def _with_dropped_ms(runner: DraftRunner, ids: list[int], context: int, dead: int, rounds: int) -> float:
    """Median ms of a width-1 call while `dead` dropped slots are still in the K/V (not compacted)."""
    samples = []
    for _ in range(rounds):
        runner.call(ids[:dead], [COMMITTED] * dead, [context] * dead)
        runner.cache.rollback_speculative()
        samples.append(_call(runner, ids[:1], context))   # _call compacts afterwards
    return statistics.median(samples) * 1e3


def measure(explicit: Path, stateful: Path, config: dict, context: int, rounds: int) -> dict:
    capacity = context + 128   # room for the widest call and the dropped slots
    runners = {"explicit": _runner(explicit, config, capacity), "stateful": _runner(stateful, config, capacity),
               "stateful+a8": _runner(stateful, config, capacity, int8_activations=True)}
    fused = {name: r.graph.fused_attention for name, r in runners.items()}
    ids = [int(t) for t in np.random.default_rng(0).integers(0, config["vocab_size"], context)]
    for runner in runners.values():
        runner.prefill(ids)
        for w in WIDTHS:
            _call(runner, ids[:w], context)   # warm-up: first calls of a shape allocate
    times = {(name, w): [] for name in runners for w in WIDTHS}
    for i in range(rounds):
        for w in WIDTHS:
            order = list(runners)[i % len(runners):] + list(runners)[:i % len(runners)]   # rotate
            for name in order:
                times[(name, w)].append(_call(runners[name], ids[:w], context))
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    compaction = {name: _compaction_ms(r, context, 64) for name, r in runners.items()}
    dropped = {name: _with_dropped_ms(r, ids, context, DROPPED, rounds) for name, r in runners.items()}
    return {"ms": medians, "fused": fused, "compact_ms": compaction, "dropped_ms": dropped}


def python_softmax_ms(vocab: int, rows: int = 7, repeats: int = 20) -> float:
    """What the old branch ranking paid per window: a float64 softmax + argpartition over the vocab."""
    logits = np.random.default_rng(0).standard_normal((rows, vocab)).astype(np.float32)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        x = logits.astype(np.float64)
        x -= x.max(axis=1, keepdims=True)
        p = np.exp(x)
        p /= p.sum(axis=1, keepdims=True)
        np.argpartition(-p, 4, axis=1)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def report(title: str, result: dict, console: Console) -> None:
    table = Table(title=title)
    for col in ("width", "explicit ms", "stateful ms", "÷ explicit", "stateful+a8 ms", "÷ explicit", "goal"):
        table.add_column(col, justify="right")
    for w in WIDTHS:
        a, b, c = (result["ms"][(name, w)] for name in ("explicit", "stateful", "stateful+a8"))
        table.add_row(str(w), f"{a:.1f}", f"{b:.1f}", f"{b / a:.2f}", f"{c:.1f}", f"{c / a:.2f}",
                      "[green]≤ 0.5[/]" if c / a <= 0.5 else "[red]> 0.5[/]")
    console.print(table)
    console.print(f"fused attention nodes: {result['fused']}; compacting 64 dropped slots: "
                  + ", ".join(f"{k} {v:.1f} ms" for k, v in result["compact_ms"].items()))
    console.print(f"width-1 call with {DROPPED} dropped slots still masked in: "
                  + ", ".join(f"{k} {v:.1f} ms" for k, v in result["dropped_ms"].items()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a real draft checkpoint folder")
    parser.add_argument("--stand-in", action="store_true", help="random weights at the 0.5B widths")
    parser.add_argument("--weights", default="int4", choices=("fp32", "int8", "int4"))
    parser.add_argument("--context", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--workdir", type=Path, help="keep the built graphs here and reuse them")
    args = parser.parse_args(argv)
    console = Console()
    sources = []
    if args.stand_in or not args.checkpoint:
        sources.append(("stand-in", None))
    if args.checkpoint:
        sources.append((args.checkpoint.name, args.checkpoint.expanduser()))
    with tempfile.TemporaryDirectory(prefix="mirror-draft-bench-") as tmp:
        root = args.workdir or Path(tmp)
        for name, checkpoint in sources:
            checkpoint = checkpoint or build_stand_in(root / "stand-in-model")
            explicit, stateful = build_graphs(checkpoint, root / f"{name}-{args.weights}", args.weights, console)
            config = open_source(checkpoint, "draft").shape.to_dict()
            result = measure(explicit, stateful, config, args.context, args.rounds)
            report(f"draft call at context {args.context}, {name}, {args.weights}, median of {args.rounds} "
                   "interleaved calls", result, console)
            console.print(f"old Python softmax over {config['vocab_size']} logits for a 7-token window: "
                          f"{python_softmax_ms(config['vocab_size']):.1f} ms (now TopK in the graph)")


if __name__ == "__main__":
    from . import command
    command(main)
