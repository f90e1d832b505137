"""`mirror-deploy tune DIR`: measure, choose, check the choice, and write tuning.json into the artifact.

1. calibration text: the deployed target's greedy continuations of a seeded, category-balanced pick of
   calibration prompts, with their teacher-forced exit and draft statistics (teacher.py);
2. cost curves on the artifact's devices, alone and side by side (measure.py), and each mode's Python
   time per step on a short probe run;
3. the choice: every (ℓe, κ, γ, budget) for Mirror and γ for SD, predicted by the latency model over
   replays of the calibration runs (simulate.py, costs/latency.py, model.py, search.py);
4. the check: each mode with its choice on a few calibration prompts, interleaved, predicted vs measured
   tokens/s, and output equal to autoregressive decoding;
5. tuning.json written (store.py). Nothing is written before step 5, so an interrupted tune leaves the
   artifact as it was.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..decoding.config import GenerationConfig
from ..decoding.engine import Engine
from ..errors import MirrorDeployError
from ..costs import latency
from ..costs.curves import Curves
from ..costs.latency import MirrorConfig
from . import model
from .measure import curve_contexts, measure_curves
from ..learned_draft import trained_prompts
from .attach import trained_on
from .calibration import prompt_sha256
from .prompts import SHIPPED, pick, read_prompts
from .simulate import acceptance_per_depth
from .search import evaluate, kappa_candidates, predict_mirror, replays, statistics, top
from ..costs.tuned import TUNING_VERSION
from .store import write_tuning
from .teacher import exit_hit_rates, measure_sequence

MODES = ("ar", "sd", "mirror")


@dataclass
class TuneOptions:
    prompts: int = 12                 # calibration prompts (two per category of the shipped file)
    new_tokens: int = 32              # target tokens generated per prompt
    calibration: Path | None = None   # a user's own prompt file (default: the shipped one)
    chat: bool | None = None          # chat template (default: when the tokenizer has one)
    seed: int = 0
    rounds: int = 5                   # interleaved rounds per cost-curve item (medians)
    measure_prompts: int = 3          # calibration prompts the final check runs every mode on (0: skip)
    probe_tokens: int = 12            # tokens of the probe run that measures Python time per step
    profile: str | None = None        # tune on this profile (it becomes the artifact's); None: the artifact's

    def validate(self) -> "TuneOptions":
        for ok, problem, fix in [(self.new_tokens >= 2, "--new-tokens must be at least 2", "use e.g. 32"),
                                 (self.rounds >= 1, "--rounds must be at least 1", "use e.g. 5"),
                                 (self.measure_prompts >= 0, "--measure-prompts must be ≥ 0", "use 0 to skip")]:
            if not ok:
                raise MirrorDeployError(problem, fix)
        return self


def encode_prompts(engine: Engine, opts: TuneOptions, source: Path, console: Console):
    """The seeded pick, encoded. A user's prompt that overruns the KV capacity is an error; the shipped
    set's long prompts (summaries) are passed over on a small-capacity artifact, with a note."""
    if engine.tokenizer is None:
        raise MirrorDeployError("this artifact has no tokenizer, so calibration text cannot be encoded",
                                "re-export from a checkpoint that has a tokenizer")
    prompts, sha = read_prompts(opts.calibration)
    chat = bool(getattr(engine.tokenizer, "chat_template", None)) if opts.chat is None else opts.chat
    m = engine.manifest
    room = GenerationConfig(max_new_tokens=opts.new_tokens, mode="mirror")
    fitting, passed = [], 0
    for p in prompts:
        ids = engine.encode(p.prompt, chat)
        try:
            engine.check_capacity(len(ids), room, m.gamma, m.branch_batch)
        except MirrorDeployError as err:
            if opts.calibration is not None:
                raise MirrorDeployError(f"calibration prompt on line {p.line} of {source} does not fit: "
                                        f"{err.problem}", "shorten it, lower --new-tokens, or re-export with a "
                                        "larger --max-context") from None
            passed += 1
            continue
        fitting.append((p, ids))
    if not fitting:
        raise MirrorDeployError(f"no calibration prompt of {source} fits the artifact's KV capacity "
                                f"{m.max_context} with {opts.new_tokens} new tokens",
                                "lower --new-tokens, pass shorter prompts with --calibration, or re-export with "
                                "a larger --max-context")
    if passed:
        console.print(f"[yellow]note:[/] passed over {passed} shipped calibration prompt(s) longer than the "
                      f"artifact's KV capacity {m.max_context} allows")
    # The learned exits' and the learned draft's training prompts are kept for last: measured on their own
    # training text, hit rates and acceptance come out optimistic, and the choices would follow them.
    trained = (trained_on(engine.folder) or set()) | trained_prompts(engine.manifest)
    unseen = [p for p, _ in fitting if prompt_sha256(p.prompt) not in trained]
    chosen = pick(unseen, opts.prompts, opts.seed)
    overlap = pick([p for p, _ in fitting if prompt_sha256(p.prompt) in trained], opts.prompts - len(chosen),
                   opts.seed) if len(chosen) < opts.prompts else []
    if overlap:
        console.print(f"[yellow]note:[/] {len(overlap)} of the {len(chosen) + len(overlap)} calibration prompts trained "
                      "the artifact's learned exits or draft: what is measured on them is optimistic")
    ids_of = {p.line: ids for p, ids in fitting}
    return [(p, ids_of[p.line]) for p in chosen + overlap], sha, chat, len(overlap)


def probe_overheads(engine: Engine, prompt_ids: list[int], tokens: int) -> dict[str, float]:
    """Each mode's Python time per step outside the runtimes, at the artifact's defaults."""
    m = engine.manifest
    out = {}
    for mode in MODES:
        cfg = GenerationConfig(max_new_tokens=tokens, mode=mode, stop_at_eos=False, gamma=m.gamma,
                               branch_budget=m.branch_batch, exit_layer=m.exit_layer, kappa=m.kappa,
                               adaptive_gamma=False)
        out[mode] = engine.generate(prompt_ids, cfg).summary["python_ms_per_step"]
    return out


def mode_configs(mirror: MirrorConfig, sd_gamma: int, new_tokens: int,
                 streams_gamma: int | None = None) -> dict[str, GenerationConfig]:
    """The chosen settings held fixed (no window policy), as the latency model predicts them."""
    common = dict(max_new_tokens=new_tokens, stop_at_eos=False, adaptive_gamma=False)
    configs = {"ar": GenerationConfig(mode="ar", **common),
               "sd": GenerationConfig(mode="sd", gamma=sd_gamma, lookup=False, streams=False, **common),
               "mirror": GenerationConfig(mode="mirror", **asdict(mirror), lookup=False, streams=False, **common),
               BESIDE: GenerationConfig(mode="sd", gamma=sd_gamma, lookup=True, streams=False, **common)}
    if streams_gamma:
        configs[STREAMS] = GenerationConfig(mode="sd", gamma=streams_gamma, lookup=False, streams=True, **common)
    return configs


BESIDE = "sd+lookup"   # measured beside the modes: whether SD's default takes lookup windows beside the draft
STREAMS = "sd+streams"  # ... and whether it takes the draft's speculative streams (`learn-streams`)


def streams_gamma(curves: Curves, acceptance: list[float], streams: dict, max_gamma: int, overhead_ms: float) -> int:
    """The SD window the latency model likes best with streams: a call yields 1 + S tokens at the streamed
    call's cost, and stream positions are accepted at the streams' held-out rates."""
    calls, rates = latency.with_streams((acceptance + [acceptance[-1]] * max_gamma)[:max_gamma], streams)
    context = np.asarray(float(np.mean(curves.data["contexts"])))
    expected = 1.0 + np.concatenate([[0.0], np.cumsum(np.cumprod(rates))])
    speed = {g: expected[g] / float(latency.sd_step_ms(curves, g, context, calls) + overhead_ms)
             for g in range(1, max_gamma + 1)}
    return max(speed, key=speed.get)


def measure_modes(engine: Engine, sequences, mirror: MirrorConfig, sd_gamma: int, advance,
                  streams_at: int | None = None) -> dict:
    """Each mode on each sequence's prompt, the mode order rotated per prompt; summed like tokens_per_s."""
    names = (*MODES, BESIDE, *([STREAMS] if streams_at else []))
    totals = {mode: {"tokens": 0, "seconds": 0.0, "equal_to_ar": True, "steps": 0, "reused": 0} for mode in names}
    for i, s in enumerate(sequences):
        configs = mode_configs(mirror, sd_gamma, s.new, streams_at)
        order = names[i % len(names):] + names[:i % len(names)]
        for mode in order:
            result = engine.generate(s.tokens[:s.prompt_len], configs[mode])
            t = totals[mode]
            t["tokens"] += len(result.tokens)
            t["seconds"] += result.metrics.t_decode
            t["equal_to_ar"] &= result.tokens == s.tokens[s.prompt_len:]
            t["steps"] += len(result.metrics.steps)
            t["reused"] += sum(step.reused for step in result.metrics.steps)
            advance()
    return {mode: {"tokens_per_s": t["tokens"] / t["seconds"] if t["seconds"] else 0.0,
                   "equal_to_ar": t["equal_to_ar"], "reuse_rate": t["reused"] / max(t["steps"], 1)}
            for mode, t in totals.items()}


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def tune_artifact(folder: Path, opts: TuneOptions, console: Console | None = None,
                  placements: list[str] | None = None) -> dict:
    """Tune on the profile `opts.profile` (default: the artifact's), or on each of `placements` (profiles
    that place the same graphs differently, e.g. cpu and cpu-sim) and keep the fastest: tuning.json
    records every placement's figures, and the winner becomes the artifact's profile."""
    console = console or Console(stderr=True)
    opts.validate()
    if not placements:
        engine = Engine(folder, opts.profile)   # absent devices are refused here, before any work
        try:
            data, profile = _tune(engine, Path(folder), opts, console), engine.profile.to_dict()
        finally:
            engine.target.close()
        write_tuning(folder, data, profile)
        return data
    engines = [Engine(folder, p, load_draft=False) for p in placements]   # every device checked up front
    for engine in engines:
        engine.target.close()
    tuned = {}
    for name in placements:
        console.rule(f"placement {name}")
        engine = Engine(folder, name)
        try:
            tuned[engine.profile.name] = (_tune(engine, Path(folder), opts, console), engine.profile.to_dict())
        finally:
            engine.target.close()
    speed = {name: placement_speed(data) for name, (data, _) in tuned.items()}
    best = max(speed, key=speed.get)
    data, profile = tuned[best]
    data["placement"] = {"chosen": best, "best_mode_tokens_per_s": speed,
                         "by": "measured on the check prompts" if data.get("check") else "predicted"}
    write_tuning(folder, data, profile)
    return data


def placement_speed(data: dict) -> float:
    """A placement's tokens/s in its best mode: measured on the check prompts where it ran, else predicted."""
    mode = data["choice"]["best_mode"]
    check = (data.get("check") or {}).get("modes") or {}
    return check[mode]["tokens_per_s"] if mode in check else data["predicted_tokens_per_s"][mode]


def _tune(engine: Engine, folder: Path, opts: TuneOptions, console: Console) -> dict:
    m = engine.manifest
    source = opts.calibration or SHIPPED
    encoded, prompts_sha, chat, overlap = encode_prompts(engine, opts, source, console)
    with _progress(console) as progress:
        task = progress.add_task("calibration text (target continuations)", total=len(encoded))
        sequences = []
        for p, ids in encoded:
            sequences.append(measure_sequence(engine, ids, opts.new_tokens, p.category))
            progress.advance(task)
        lengths = [len(s.tokens) for s in sequences]
        contexts = curve_contexts(engine, min(s.prompt_len for s in sequences), max(lengths))
        task = progress.add_task("cost curves (alone, side by side)", total=2 * len(contexts))
        curves = Curves(measure_curves(engine, contexts, opts.rounds, opts.seed, lambda: progress.advance(task)))
        task = progress.add_task("Python time per step (probe)", total=1)
        overhead = probe_overheads(engine, sequences[-1].tokens[:sequences[-1].prompt_len], opts.probe_tokens)
        progress.advance(task)
        task = progress.add_task("choice (replays × latency model)", total=1)
        grid = evaluate(replays(sequences, m.exit_layers, m.kappa, m.gamma), curves, overhead, m.branch_batch)
        progress.advance(task)
        mirror_tps, mirror = grid.best_mirror
        sd_tps, sd_gamma = grid.best_sd
        checked = sequences[:opts.measure_prompts]
        at = None
        if m.draft_streams and checked:
            deepest = max(grid.steps)
            at = max(2, streams_gamma(curves, acceptance_per_depth(grid.steps[deepest], deepest) or [0.5],
                                      m.draft_streams, m.gamma, overhead["sd"]))
        runs = len(MODES) + 1 + (at is not None)
        task = progress.add_task("check: every mode on calibration prompts", total=len(checked) * runs)
        measured = measure_modes(engine, checked, mirror, sd_gamma, lambda: progress.advance(task), at) \
            if checked else {}
    return _record(engine, opts, source, prompts_sha, chat, sequences, curves, overhead, grid, mirror, sd_gamma,
                   checked, measured, exit_training_prompts=overlap, streams_at=at)


def _record(engine, opts, source, prompts_sha, chat, sequences, curves, overhead, grid, mirror, sd_gamma,
            checked, measured, exit_training_prompts: int, streams_at: int | None = None) -> dict:
    m = engine.manifest
    predicted = {"ar": grid.ar, "sd": grid.sd[sd_gamma], "mirror": grid.best_mirror[0]}
    bound = model.zero_draft_bound(curves, grid.steps[mirror.gamma], mirror.gamma)
    check = {}
    if checked:
        subset = set(range(len(checked)))
        steps = {g: grid.steps[g].subset(subset) for g in (0, sd_gamma, mirror.gamma)}
        ranks = grid.ranks[(mirror.exit_layer, mirror.kappa, mirror.gamma)][
            grid.steps[mirror.gamma].sequence < len(checked)]
        local = {"ar": model.tokens_per_s(steps[0], latency.ar_step_ms(curves, steps[0].start), overhead["ar"]),
                 "sd": model.tokens_per_s(steps[sd_gamma], latency.sd_step_ms(curves, sd_gamma, steps[sd_gamma].start),
                                          overhead["sd"]),
                 "mirror": predict_mirror(curves, steps[mirror.gamma], ranks, mirror, overhead["mirror"])}
        local_bound = model.zero_draft_bound(curves, steps[mirror.gamma], mirror.gamma)
        hit = float(((ranks >= 0) & (ranks < mirror.branch_budget)).mean())
        check = {"prompts": len(checked),
                 "modes": {mode: {"predicted_tokens_per_s": local[mode], **measured[mode]} for mode in MODES},
                 "predicted_reuse_rate": hit,
                 "zero_draft_bound_tokens_per_s": local_bound,
                 "mirror_over_bound": {"predicted": local["mirror"] / local_bound,
                                       "measured": measured["mirror"]["tokens_per_s"] / local_bound}}
    tokens_sha = hashlib.sha256(json.dumps([s.tokens for s in sequences]).encode()).hexdigest()
    return {
        "version": TUNING_VERSION,
        "profile": engine.profile.name,
        "seed": opts.seed,
        "calibration": {"file": "shipped" if opts.calibration is None else str(source), "sha256": prompts_sha,
                        "prompts": [s.category for s in sequences], "new_tokens": opts.new_tokens, "chat": chat,
                        "tokens_sha256": tokens_sha, "learned_exit_training_prompts": exit_training_prompts},
        "choice": {"mirror": asdict(mirror), "sd": {"gamma": sd_gamma},
                   "best_mode": max(predicted, key=predicted.get)},
        "predicted_tokens_per_s": predicted,
        "zero_draft_bound_tokens_per_s": bound,
        "mirror_over_bound": predicted["mirror"] / bound,
        "statistics": statistics(grid, sequences, mirror, m.branch_batch,
                                 exit_hit_rates(sequences, kappa_candidates(m.kappa))),
        "top_mirror_configs": top(grid),
        "sd_by_gamma": {str(g): v for g, v in grid.sd.items()},
        "overhead_ms_per_step": overhead,
        "curves_ms": curves.data,
        "check": check,
        "lookup_beside": lookup_choice(measured),
        "streams": streams_choice(measured, streams_at),
    }


# Lookup beside the draft costs nothing where it finds no match (the policy drafts with the model then)
# and wins where the answer copies the prompt (SpecBench: sd+lookup 1.39x AR against sd's 1.26x). A few
# check prompts cannot tell a tie: on qwen-int4-z two tune runs measured 0.976x and 1.017x. So it stays
# on unless it measured slower by more than that spread.
LOOKUP_TOLERANCE = 0.03


def lookup_choice(measured: dict) -> dict:
    """SD with lookup beside the draft is SD's default unless it measured clearly slower on the check
    prompts (LOOKUP_TOLERANCE), and only where its output equalled AR's there; unmeasured, it stays off."""
    if BESIDE not in measured:
        return {"sd": {"chosen": False, "by": "not measured"}}
    on, off = measured[BESIDE]["tokens_per_s"], measured["sd"]["tokens_per_s"]
    chosen = on >= (1.0 - LOOKUP_TOLERANCE) * off and measured[BESIDE]["equal_to_ar"]
    return {"sd": {"chosen": bool(chosen), "tokens_per_s": on, "without_tokens_per_s": off,
                   "tolerance": LOOKUP_TOLERANCE, "by": "measured on the check prompts"}}


def streams_choice(measured: dict, gamma: int | None) -> dict:
    """SD with the draft's speculative streams (at the window the latency model liked for them) becomes
    SD's default where it measured faster than plain SD on the check prompts, and equal to AR there."""
    if STREAMS not in measured:
        return {"sd": {"chosen": False, "by": "not measured (no streams, or no check prompts)"}}
    on, off = measured[STREAMS]["tokens_per_s"], measured["sd"]["tokens_per_s"]
    return {"sd": {"chosen": bool(on > off and measured[STREAMS]["equal_to_ar"]), "gamma": gamma,
                   "tokens_per_s": on, "without_tokens_per_s": off, "by": "measured on the check prompts"}}


def print_tuning(data: dict, console: Console) -> None:
    mirror, sd = data["choice"]["mirror"], data["choice"]["sd"]
    console.print(f"[bold]choice[/] mirror: ℓe={mirror['exit_layer']} κ={mirror['kappa']} γ={mirror['gamma']} "
                  f"budget={mirror['branch_budget']}; sd: γ={sd['gamma']}; best mode: {data['choice']['best_mode']}")
    beside = (data.get("lookup_beside") or {}).get("sd", {})
    if "tokens_per_s" in beside:
        within = (f" (on unless {beside['tolerance']:.0%} slower: a tie on a few prompts is noise)"
                  if "tolerance" in beside else "")
        console.print(f"sd with lookup beside the draft: {beside['tokens_per_s']:.2f} tok/s against "
                      f"{beside['without_tokens_per_s']:.2f} without, so sd runs with lookup "
                      f"{'on' if beside['chosen'] else 'off'} by default{within}")
    streamed = (data.get("streams") or {}).get("sd", {})
    if "tokens_per_s" in streamed:
        console.print(f"sd with the draft's streams (γ={streamed['gamma']}): {streamed['tokens_per_s']:.2f} tok/s against "
                      f"{streamed['without_tokens_per_s']:.2f} without, so sd runs with streams "
                      f"{'on' if streamed['chosen'] else 'off'} by default")
    table = Table(title="tokens/s: predicted (latency model) vs measured")
    for col in ("mode", "predicted, calibration set", "predicted, checked prompts", "measured", "measured ÷ predicted",
                "output = ar"):
        table.add_column(col, justify="right" if col != "mode" else "left")
    check = data.get("check") or {}
    for mode in MODES:
        row = (check.get("modes") or {}).get(mode)
        cells = [f"{row['predicted_tokens_per_s']:.2f}", f"{row['tokens_per_s']:.2f}",
                 f"{row['tokens_per_s'] / row['predicted_tokens_per_s']:.2f}", "yes" if row["equal_to_ar"] else "NO"] \
            if row else ["-", "-", "-", "-"]
        table.add_row(mode, f"{data['predicted_tokens_per_s'][mode]:.2f}", *cells)
    console.print(table)
    if check:
        ratio = check["mirror_over_bound"]
        console.print(f"Mirror ÷ zero-draft-cost bound (1 + E[A]) / T_window "
                      f"({check['zero_draft_bound_tokens_per_s']:.2f} tok/s): predicted {ratio['predicted']:.2f}, "
                      f"measured {ratio['measured']:.2f}; reuse rate predicted "
                      f"{check['predicted_reuse_rate']:.1%}, measured {check['modes']['mirror']['reuse_rate']:.1%}")
