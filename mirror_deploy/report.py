"""A run at the command line: the prompt in, the text streamed as tokens commit, and the figures with
their units."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import MirrorDeployError

FIGURES = [  # key, label, unit, format
    ("mode", "mode", "", "{}"),
    ("mode_source", "mode chosen by", "", "{}"),
    ("tokens_per_s", "decode speed", "tok/s", "{:.2f}"),
    ("new_tokens", "new tokens", "", "{}"),
    ("prefill_s", "prefill (both devices)", "s", "{:.3f}"),
    ("mean_accepted_tokens", "mean accepted tokens", "tok/target fwd", "{:.2f}"),
    ("acceptance_histogram", "accepted-length histogram", "steps with A=0..γ", "{}"),
    ("mean_window", "mean window", "draft tokens/step", "{:.2f}"),
    ("draft_tokens_per_call", "draft tokens per draft call", "tok/call", "{:.2f}"),
    ("acceptance_by_stream", "acceptance: draft's own / each stream", "", "{:.0%}"),
    ("autoregressive_steps", "autoregressive steps (policy)", "steps", "{}"),
    ("accepted_from_draft", "accepted from the draft model", "tokens", "{}"),
    ("accepted_from_lookup", "accepted from prompt lookup", "tokens", "{}"),
    ("lookup_windows", "lookup windows (draft calls skipped in sd/mirror)", "steps", "{}"),
    ("reuse_rate", "reuse rate", "", "{:.1%}"),
    ("fallback_frequency", "fallback frequency", "", "{:.1%}"),
    ("exit_hit_rate", "early-exit hit rate", "", "{:.1%}"),
    ("mean_branches", "branches rolled out", "per step", "{:.1f}"),
    ("t_prefix_ms", "T_prefix", "ms/step", "{:.1f}"),
    ("t_suffix_ms", "T_suffix", "ms/step", "{:.1f}"),
    ("t_draft_ms", "T_draft (device busy)", "ms/step", "{:.1f}"),
    ("t_exposed_ms", "draft time exposed", "ms/step", "{:.1f}"),
    ("t_step_ms", "step time", "ms/step", "{:.1f}"),
    ("step_over_ideal", "step ÷ ideal (prefix+max(suffix,draft))", "", "{:.2f}"),
    ("python_ms_per_step", "Python outside runtimes", "ms/step", "{:.2f}"),
    ("peak_rss_gb", "peak resident memory (process)", "GB", "{:.2f}"),
]


class TextStream:
    """Prints the decoded text as tokens commit; decodes the whole run each time so multi-byte
    characters split across tokens come out whole."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.tokens: list[int] = []
        self.printed = 0

    def push(self, new: list[int]) -> str:
        """The text that `new` completes (empty while a character is still incomplete)."""
        self.tokens += new
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):   # an incomplete character: wait for its next byte
            return ""
        delta, self.printed = text[self.printed:], len(text)
        return delta

    def __call__(self, new: list[int]) -> None:
        delta = self.push(new)
        if delta:
            self.out.write(delta)
            self.out.flush()

    def close(self) -> None:
        self.out.write("\n")
        self.out.flush()


def stats_table(summaries: dict[str, dict], title: str = "figures") -> Table:
    """One column per run (e.g. mirror vs ar), one row per figure."""
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("unit", style="dim")
    for name in summaries:
        table.add_column(name, justify="right")
    for key, label, unit, fmt in FIGURES:
        values = [s.get(key) for s in summaries.values()]
        if all(v is None or v == [] for v in values):
            continue
        table.add_row(label, unit, *(_figure(v, fmt) for v in values))
    return table


def _figure(value, fmt: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, list) and fmt != "{}":   # one figure per position (e.g. per stream)
        return " / ".join(_figure(v, fmt) for v in value)
    return fmt.format(value)


def print_stats(summaries: dict[str, dict], console: Console | None = None, title: str = "figures") -> None:
    (console or Console(stderr=True)).print(stats_table(summaries, title))


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt from --prompt, --prompt-file or standard input (exactly one of them)."""
    if prompt is not None and prompt_file is not None:
        raise MirrorDeployError("both --prompt and --prompt-file were given", "pass one of them")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise MirrorDeployError(f"prompt file {prompt_file} does not exist", "check the path")
        return prompt_file.read_text()
    if prompt is not None:
        return prompt
    if sys.stdin.isatty():
        raise MirrorDeployError("no prompt given", "pass --prompt TEXT, --prompt-file FILE, or pipe text in")
    return sys.stdin.read()


def run_prompt(artifact: Path, profile: str | None, text: str, cfg, chat: bool, json_out: bool, stats: bool,
               trace: Path | None) -> None:
    """`mirror-deploy run`: stream the text as it commits (or print one JSON record), then the figures."""
    from .decoding.engine import Engine
    engine = Engine(artifact, profile)
    stream = None if json_out or engine.tokenizer is None else TextStream(engine.tokenizer)
    result = engine.generate(text, cfg, chat=chat, on_tokens=stream)
    if stream is not None:
        stream.close()
    if trace is not None:
        trace.write_text("".join(line + "\n" for line in result.metrics.trace_lines()))
    if json_out:
        config = {**vars(cfg), "mode": result.summary["mode"]}   # the mode it ran, tuned or named
        record = {"text": result.text, "tokens": result.tokens, "config": config, "metrics": result.summary}
        print(json.dumps(record), flush=True)
    if stats:
        print_stats({result.summary["mode"]: result.summary})
        Console(stderr=True).print(f"4-bit kernel: {kernel_line(engine)}", highlight=False)


def kernel_line(engine) -> str:
    """Which 4-bit matrix kernel this run's target used, and where ours stands on this machine."""
    from .kernels import status
    ours = status()   # built and usable, or why not
    weights = engine.manifest.target_weights
    if weights not in ("int4", "gguf"):
        ran = f"none (target weights {weights})"
    elif any(getattr(g, "kernel", False) for g in engine.target.graphs.segments):
        ran = "ours: mirror_deploy::Q4MatMul in the OpenVINO target"
    elif engine.profile.target.backend == "onnxruntime":
        ran = "stock: ONNX Runtime MatMulNBits (our kernel runs in OpenVINO-native targets only)"
    else:
        ran = "stock: OpenVINO compressed MatMul"
    return f"{ran}; on this machine {ours.summary()}"
