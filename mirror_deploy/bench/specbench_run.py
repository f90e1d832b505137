"""`mirror-deploy bench`: SpecBench over our modes and the peers on the same prompts, interleaved, or
`--anatomy`, each part of a step timed on the artifact's devices."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ..decoding.engine import Engine
from ..errors import MirrorDeployError
from . import runner
from .methods import EngineMethod
from .specbench import load_prompts, prompt_room


@dataclass
class BenchRequest:
    """What `bench` was asked for (the CLI's options, one field each)."""
    per_task: int = 1
    max_new_tokens: int = 64
    temperature: float = 0.0
    repeats: int = 1
    modes: str | None = None       # default: DEFAULT_MODES, or TARGET_ONLY_MODES on a target-only artifact
    peers: str = ""
    interleave_peers: bool = False
    max_prompt_tokens: int | None = None
    branch_budget: int | None = None
    gamma: int | None = None
    exit_layer: int | None = None
    adaptive_gamma: bool = True
    specbench: Path | None = None
    out: Path = Path("bench-results")


DEFAULT_MODES, TARGET_ONLY_MODES = "ar,sd,mirror-serial,mirror,lookup", "ar,lookup"


def our_methods(engine: Engine, req: BenchRequest) -> list[EngineMethod]:
    modes = req.modes or (DEFAULT_MODES if engine.manifest.has_draft else TARGET_ONLY_MODES)
    names = [m for m in modes.split(",") if m]
    unknown = [m for m in names if not EngineMethod.known(m)]
    if unknown:
        raise MirrorDeployError(f"unknown mode(s): {', '.join(unknown)}",
                                f"use: {', '.join(EngineMethod.MODES)}; sd and mirror take +lookup and +streams "
                                "(e.g. sd+streams), and any a window policy (e.g. sd:heuristic)")
    methods = [EngineMethod(engine, m, branch_budget=req.branch_budget, gamma=req.gamma, exit_layer=req.exit_layer,
                            adaptive_gamma=req.adaptive_gamma) for m in names]
    for method in methods:   # sd / mirror on a target-only artifact: refused before any prompt runs
        engine.require_draft(method.mode)
        if method.overrides.get("streams"):
            engine.stream_draft()   # an artifact without streams is refused here, not after other columns ran
    return methods


def run_anatomy(artifact: Path, profile: str | None, context: int, rounds: int) -> None:
    from .anatomy import anatomy, print_anatomy
    from .bandwidth import bandwidth_rows, print_bandwidth
    engine = Engine(artifact, profile)
    figures = anatomy(engine, context, rounds)
    print_anatomy(figures, engine, context, Console())
    print_bandwidth(bandwidth_rows(engine.folder, engine.manifest, engine.profile, figures, engine.manifest.gamma),
                    Console())


def run_specbench(artifact: Path, profile: str | None, req: BenchRequest, err: Console) -> None:
    engine = Engine(artifact, profile)
    methods = our_methods(engine, req)
    peer_factories = []
    if req.peers:
        from .peers import make_peers
        peer_factories = make_peers([p for p in req.peers.split(",") if p], engine.manifest)
    m = engine.manifest
    room = prompt_room(m, req.max_new_tokens, req.gamma, req.branch_budget)
    room = min(room, req.max_prompt_tokens or room)
    prompts, skipped = load_prompts(engine.tokenizer, req.per_task, req.specbench, max_tokens=room)
    if skipped:
        err.print(f"[yellow]note:[/] passed over {skipped} prompt(s) longer than {room} tokens "
                  f"(--max-prompt-tokens, or the artifact's --max-context {m.max_context} minus generation room)")
    settings = runner.BenchSettings(req.max_new_tokens, req.repeats, req.temperature)
    if req.interleave_peers:
        methods += [factory() for _, factory in peer_factories]
        peer_factories = []
    try:
        records = runner.run(methods, prompts, settings, req.out, err, peer_factories)
    finally:
        for method in methods:
            method.close()
    summary = runner.summarise(records)
    written = runner.write_outputs(summary, req.out)
    Console().print(runner.markdown(summary))
    if not any(p.suffix == ".png" for p in written):
        err.print("[yellow]note:[/] no chart: matplotlib is missing (pip install 'mirror-deploy[bench]')")
    err.print(f"[green]wrote[/] {', '.join(str(p) for p in written)} and {req.out / 'results.jsonl'}")
