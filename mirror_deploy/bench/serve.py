"""`python -m mirror_deploy.bench.serve ARTIFACT`: what the HTTP server costs over calling the engine directly.

One engine, loaded once: the server (uvicorn on a free loopback port, on a thread of this process) and the
direct `Engine.generate` calls share it, strictly one after the other, so the pair's weights are in memory
once. Pairs are interleaved (direct, server / server, direct, alternating) on the same prompts and seeds;
figures are medians. Time to first token: from the call (or the HTTP request) to the first text. Tokens/s:
completion tokens over the whole call. Then the server alone answers the rest of `--requests` sequential
requests (streamed and plain, alternating) and the process's RSS after them is compared with the RSS after
the first. The client runs in this process too, so its Python competes for the GIL with the engine thread:
the overhead measured is an upper bound on what a separate client would see.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..decoding.config import GenerationConfig
from ..decoding.engine import Engine
from ..errors import MirrorDeployError

PROMPTS = ["def fibonacci(n):", "The quick brown fox jumps over", "Summarize: the cat sat on the mat.",
           "Translate to German: good morning", "Q: what is 12 * 7? A:", "Once upon a time"]


class InProcessServer:
    """uvicorn serving `create_app(engine)` on a thread; stopped with `close()` (a graceful shutdown)."""

    def __init__(self, engine: Engine, mode: str):
        import uvicorn

        from ..serve.app import create_app
        self.name = "bench"
        app = create_app(engine, self.name, max_queue=4, mode=mode)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise MirrorDeployError("the benchmark's server did not start", "run `mirror-deploy serve` to see why")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _direct(engine: Engine, prompt: str, cfg: GenerationConfig) -> dict:
    first: list[float] = []

    def on_tokens(new: list[int]) -> None:     # returns None: a true value would end the run
        if not first:
            first.append(time.perf_counter())

    t0 = time.perf_counter()
    result = engine.generate(prompt, cfg, on_tokens=on_tokens)
    total = time.perf_counter() - t0
    return {"ttft": first[0] - t0, "total": total, "tokens": len(result.tokens), "text": result.text}


def _served(client, name: str, prompt: str, cfg: GenerationConfig, stream: bool = True) -> dict:
    kwargs = dict(model=name, prompt=prompt, max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                  seed=cfg.seed)
    t0 = time.perf_counter()
    if not stream:
        reply = client.completions.create(**kwargs)
        total = time.perf_counter() - t0
        return {"ttft": None, "total": total, "tokens": reply.usage.completion_tokens, "text": reply.choices[0].text}
    ttft, parts, tokens = None, [], 0
    for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            parts.append(chunk.choices[0].text)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - t0
    return {"ttft": ttft, "total": total, "tokens": tokens, "text": "".join(parts)}


def _rss_mib() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def _median(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) if values else float("nan")


def measure(engine: Engine, args, console: Console) -> dict:
    import openai
    cfg = lambda i: GenerationConfig(max_new_tokens=args.max_tokens, temperature=args.temperature, seed=i,
                                     mode=args.mode)
    server = InProcessServer(engine, args.mode)
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=600)
    try:
        _served(client, server.name, PROMPTS[0], cfg(0))          # warm-up, and the first request for RSS
        rss_first = _rss_mib()
        direct, served, mismatches = [], [], 0
        for i in range(args.pairs):
            prompt = PROMPTS[i % len(PROMPTS)]
            order = ("direct", "served") if i % 2 == 0 else ("served", "direct")
            got = {}
            for which in order:
                got[which] = _direct(engine, prompt, cfg(i)) if which == "direct" else \
                    _served(client, server.name, prompt, cfg(i))
            direct.append(got["direct"])
            served.append(got["served"])
            mismatches += got["direct"]["text"] != got["served"]["text"]
        done = 1 + args.pairs
        t_rest = time.perf_counter()
        half = max(done, args.requests // 2)
        rss_half = rss_first
        for i in range(done, args.requests):
            _served(client, server.name, PROMPTS[i % len(PROMPTS)], cfg(i), stream=i % 2 == 0)
            if i + 1 == half:
                rss_half = _rss_mib()
        rest_s = time.perf_counter() - t_rest
        rss_last = _rss_mib()
    finally:
        server.close()
    for runs in (direct, served):
        for r in runs:
            r["tok_s"] = r["tokens"] / r["total"]
    d_ttft, s_ttft = _median(direct, "ttft"), _median(served, "ttft")
    d_tps, s_tps = _median(direct, "tok_s"), _median(served, "tok_s")
    return {"artifact": str(args.artifact), "mode": args.mode, "pairs": args.pairs, "requests": max(args.requests, done),
            "max_tokens": args.max_tokens, "temperature": args.temperature,
            "ttft_ms": {"direct": 1e3 * d_ttft, "server": 1e3 * s_ttft},
            "tokens_per_s": {"direct": d_tps, "server": s_tps},
            "ttft_overhead": s_ttft / d_ttft - 1, "throughput_overhead": 1 - s_tps / d_tps,
            "text_mismatches": mismatches, "rss_mib": {"after_first": rss_first, "after_half": rss_half, "after_all": rss_last},
            "rss_growth_mib": rss_last - rss_first, "sequential_phase_s": rest_s}


def report(fig: dict, console: Console) -> None:
    table = Table(title=f"server vs Engine.generate, medians of {fig['pairs']} interleaved pairs "
                        f"({fig['mode']}, {fig['max_tokens']} tokens, temperature {fig['temperature']})")
    for col in ("figure", "direct", "server", "server overhead"):
        table.add_column(col, justify="right")
    table.add_row("time to first token (ms)", f"{fig['ttft_ms']['direct']:.1f}", f"{fig['ttft_ms']['server']:.1f}",
                  f"{fig['ttft_overhead']:+.1%}")
    table.add_row("tokens/s (whole call)", f"{fig['tokens_per_s']['direct']:.2f}",
                  f"{fig['tokens_per_s']['server']:.2f}", f"{fig['throughput_overhead']:+.1%} (goal ≤ 3%)")
    Console().print(table)
    rss = fig["rss_mib"]
    Console().print(f"RSS after the first request {rss['after_first']:.0f} MiB, after {fig['requests']} sequential "
                    f"requests {rss['after_all']:.0f} MiB: growth {fig['rss_growth_mib']:+.1f} MiB, of which "
                    f"{rss['after_all'] - rss['after_half']:+.1f} MiB in the second half (a leak keeps growing; "
                    "allocator warm-up levels off)")
    if fig["text_mismatches"]:
        console.print(f"[bold red]{fig['text_mismatches']} pair(s) where the server's text differs from the "
                      "engine's[/]")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--requests", type=int, default=200, help="server requests in all (for the RSS figure)")
    parser.add_argument("--pairs", type=int, default=10, help="interleaved direct/server pairs (timing figures)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--mode", default="mirror", choices=["mirror", "sd", "ar"])
    parser.add_argument("--profile", default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.requests < 1:
        parser.error("--pairs and --requests must be at least 1")
    console = Console(stderr=True)
    engine = Engine(args.artifact, args.profile)
    fig = measure(engine, args, console)
    report(fig, console)
    if args.json is not None:
        args.json.write_text(json.dumps(fig, indent=2))
    if fig["text_mismatches"]:
        raise SystemExit(1)


if __name__ == "__main__":
    from . import command
    command(main)
