"""Run methods over prompts, interleaved, and summarise: the `mirror-deploy bench` engine.

Each prompt is run by every method in turn, the order rotated on each repeat, so slow drifts of a shared
machine hit all methods alike. Every run is appended to results.jsonl as it finishes, so an interrupted
run keeps what it measured.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .methods import Method
from .specbench import BenchPrompt

REFERENCE = "ar"


@dataclass
class BenchSettings:
    max_new_tokens: int = 64
    repeats: int = 1
    temperature: float = 0.0
    seed: int = 0


def run(methods: list[Method], prompts: list[BenchPrompt], settings: BenchSettings, out_dir: Path,
        console=None, peers: list[tuple[str, Callable[[], Method]]] = ()) -> list[dict]:
    """`methods` stay loaded and are interleaved prompt by prompt. `peers` are (name, factory): each holds
    its own copy of the models, so each is loaded once, run over the same prompts, and freed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    total = len(prompts) * settings.repeats * (len(methods) + len(peers))
    with open(out_dir / "results.jsonl", "a") as sink, Progress(*columns, console=console) as progress:
        bar = progress.add_task("bench", total=total)

        def one(method, p, rep):
            progress.update(bar, description=f"{p.task} q{p.question_id} {method.name}")
            result = method.generate(p.ids, settings.max_new_tokens, settings.temperature, settings.seed)
            record = {"task": p.task, "question_id": p.question_id, "repeat": rep, "method": method.name,
                      "tokens": result.tokens, "seconds": result.seconds, "prefill_seconds": result.prefill_seconds,
                      "tokens_per_s": result.tokens_per_s, "figures": result.figures}
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            records.append(record)
            progress.advance(bar)

        for p in prompts:
            for rep in range(settings.repeats):
                shift = rep % max(len(methods), 1)
                for method in methods[shift:] + methods[:shift]:
                    one(method, p, rep)
        for name, factory in peers:
            progress.update(bar, description=f"loading {name}")
            method = factory()
            try:
                for p in prompts:
                    for rep in range(settings.repeats):
                        one(method, p, rep)
            finally:
                method.close()
    return records


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _by_repeat(groups: list[list[dict]]) -> dict[int, float]:
    """Repeat -> mean tok/s over the prompts of one method's groups in that repeat."""
    rounds: dict[int, list[float]] = {}
    for g in groups:
        for r in g:
            rounds.setdefault(r.get("repeat", 0), []).append(r["tokens_per_s"])
    return {rep: statistics.fmean(v) for rep, v in rounds.items()}


def summarise(records: list[dict]) -> dict:
    """Per task and overall: speedup = mean tok/s of a method ÷ mean tok/s of `ar` (SpecBench's
    definition), each prompt's tok/s being the median over repeats. `speedup_range`: the lowest and
    highest of the same ratio taken within each repeat (the runs of one repeat ran side by side), so a
    reader sees how far one run of the command can land from another."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    reference = {}
    for r in records:
        if r["method"] == REFERENCE:
            reference.setdefault((r["task"], r["question_id"]), r["tokens"])
    per_prompt: dict[tuple, list[dict]] = {}
    for r in records:
        per_prompt.setdefault((r["task"], r["question_id"], r["method"]), []).append(r)
    tasks = list(dict.fromkeys(r["task"] for r in records))

    def block(task_filter) -> dict:
        rows, rounds = {}, {}
        for m in methods:
            groups = [g for (task, _, meth), g in per_prompt.items() if meth == m and task_filter(task)]
            if not groups:
                continue
            tps = [_median([r["tokens_per_s"] for r in g]) for g in groups]
            fig = lambda key: _median([r["figures"].get(key) for g in groups for r in g])
            # a prompt counts as equal only if every repeat's output is ar's (first repeat's)
            same = [all(r["tokens"] == reference.get((r["task"], r["question_id"])) for r in g) for g in groups]
            rounds[m] = _by_repeat(groups)
            rows[m] = {"tokens_per_s": statistics.fmean(tps), "prompts": len(groups),
                       "mean_accepted_tokens": fig("mean_accepted_tokens"), "reuse_rate": fig("reuse_rate"),
                       "fallback_frequency": fig("fallback_frequency"), "t_exposed_ms": fig("t_exposed_ms"),
                       "exit_hit_rate": fig("exit_hit_rate"), "acceptance": fig("acceptance"),
                       "draft_tokens_per_call": fig("draft_tokens_per_call"),
                       "acceptance_by_stream": _median_each([r["figures"].get("acceptance_by_stream")
                                                             for g in groups for r in g]),
                       "equal_to_ar": f"{sum(same)}/{len(same)}" if reference else "–"}
        base = rows.get(REFERENCE, {}).get("tokens_per_s")
        for m, row in rows.items():
            row["speedup_vs_ar"] = row["tokens_per_s"] / base if base else None
            ratios = [v / rounds[REFERENCE][rep] for rep, v in rounds[m].items()
                      if REFERENCE in rounds and rounds[REFERENCE].get(rep)]
            row["speedup_range"] = [min(ratios), max(ratios)] if len(ratios) > 1 else None
        return rows

    return {"tasks": {t: block(lambda x, t=t: x == t) for t in tasks}, "overall": block(lambda x: True)}


def _median_each(lists: list) -> list[float] | None:
    """Position-wise medians of equal-purpose lists (acceptance per stream position), Nones skipped."""
    lists = [x for x in lists if x]
    if not lists:
        return None
    width = max(map(len, lists))
    return [_median([x[i] for x in lists if i < len(x)]) for i in range(width)]


def _fmt(value, pattern):
    if pattern == "range":
        return "–" if value is None else f"{value[0]:.2f}–{value[1]:.2f}"
    if isinstance(value, list):
        return "/".join("–" if v is None else pattern.format(v) for v in value)
    return "–" if value is None else pattern.format(value)


COLUMNS = [("tokens_per_s", "tok/s", "{:.2f}"), ("speedup_vs_ar", "× ar", "{:.2f}"),
           ("speedup_range", "× ar, lowest–highest repeat", "range"),
           ("mean_accepted_tokens", "accepted/fwd", "{:.2f}"), ("reuse_rate", "reuse", "{:.0%}"),
           ("fallback_frequency", "fallback", "{:.0%}"), ("t_exposed_ms", "exposed ms", "{:.0f}"),
           ("draft_tokens_per_call", "draft tok/call", "{:.2f}"),
           ("acceptance_by_stream", "acc. own/streams", "{:.0%}"), ("equal_to_ar", "= ar", "{}")]


def markdown(summary: dict) -> str:
    lines = []
    for title, rows in [("overall", summary["overall"]), *summary["tasks"].items()]:
        lines += [f"### {title}", "", "| method | " + " | ".join(c[1] for c in COLUMNS) + " |",
                  "|---|" + "---|" * len(COLUMNS)]
        for name, row in rows.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(row.get(k), f) for k, _, f in COLUMNS) + " |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(summary: dict, out_dir: Path) -> list[Path]:
    written = [out_dir / "summary.json", out_dir / "summary.md"]
    written[0].write_text(json.dumps(summary, indent=2))
    written[1].write_text(markdown(summary))
    chart = _chart(summary, out_dir / "speedup.png")
    return written + ([chart] if chart else [])


def _chart(summary: dict, path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None  # the caller says so: the chart needs the `bench` extra
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(summary["tasks"]) + ["overall"]
    methods = [m for m in summary["overall"] if m != REFERENCE]
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 2, 4))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        values = [(summary["tasks"].get(t) or summary["overall"]).get(m, {}).get("speedup_vs_ar") or 0
                  for t in tasks[:-1]] + [summary["overall"][m].get("speedup_vs_ar") or 0]
        ax.bar([x + i * width for x in range(len(tasks))], values, width, label=m)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(tasks))], tasks, rotation=20)
    ax.set_ylabel("speedup over autoregressive (tok/s ratio)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
