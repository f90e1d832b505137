"""Where Mirror's reuse comes from, on an artifact's calibration text (the replays `tune` ranks with):

- branch coverage: the share of steps whose needed branch ranks within each budget, per (γ, ℓe, κ),
  budgets past the artifact's branch_batch included;
- the exit as a verdict predictor: acceptance of the draft token when the exit's top-1 is that token,
  and when it is not.

`python -m mirror_deploy.tuning.coverage DIR [--gammas 2,3,4] [--budgets 1,2,4,8,16]` answers whether a
wider budget or a better exit would raise reuse before anyone re-exports or retrains for either.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ..decoding.engine import Engine
from ..errors import MirrorDeployError
from .prompts import SHIPPED
from .search import Grid, replays
from .simulate import coverage
from .teacher import Sequence, measure_sequence
from .tune import TuneOptions, encode_prompts


def calibration_sequences(engine: Engine, prompts: int, new_tokens: int, console: Console) -> list[Sequence]:
    """The target's greedy continuations of tune's seeded prompt pick, with the draft's and the exits' views."""
    opts = TuneOptions(prompts=prompts, new_tokens=new_tokens)
    encoded, _, _, _ = encode_prompts(engine, opts, SHIPPED, console)
    with console.status("calibration text (target continuations)"):
        return [measure_sequence(engine, ids, new_tokens, p.category) for p, ids in encoded]


def coverage_rows(grid: Grid, gammas: list[int], budgets: list[int]) -> list[dict]:
    """Per (γ, ℓe, κ) of tune's replays (`search.replays`): coverage at every budget."""
    return [{"gamma": gamma, "exit_layer": layer, "kappa": kappa, "steps": len(ranks),
             "coverage": {str(b): v for b, v in coverage(ranks, budgets).items()}}
            for (layer, kappa, gamma), ranks in sorted(grid.ranks.items(), key=_by_gamma_then_exit)
            if gamma in gammas]


def _by_gamma_then_exit(item) -> tuple[int, int, int]:
    (layer, kappa, gamma), _ = item
    return gamma, layer, kappa


def exit_agreement_rows(sequences: list[Sequence], layers: list[int]) -> list[dict]:
    """Per exit: P(draft token accepted), P(exit top-1 = draft token), and acceptance given each case."""
    rows = []
    for layer in layers:
        accepted, top1 = [], []
        for s in sequences:
            n = len(s.agree)          # the exit and draft rows line up with the agreement positions
            accepted.append(np.asarray(s.agree, bool))
            top1.append(np.asarray(s.exit_ids[layer][:n, 0]) == np.asarray(s.draft_top[:n]))
        a, t = np.concatenate(accepted), np.concatenate(top1)
        rate = lambda mask: float(a[mask].mean()) if mask.any() else None   # noqa: E731
        rows.append({"exit_layer": layer, "positions": int(a.size), "accepted": float(a.mean()),
                     "exit_top1_is_draft": float(t.mean()), "accepted_if_top1": rate(t),
                     "accepted_otherwise": rate(~t)})
    return rows


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def print_tables(console: Console, cover: list[dict], agreement: list[dict], budgets: list[int],
                 branch_batch: int) -> None:
    table = Table(title=f"needed branch within the budget (the artifact rolls out at most {branch_batch})")
    for name in ("γ", "ℓe", "κ", "steps", *(f"b={b}" for b in budgets)):
        table.add_column(name, justify="right")
    for row in cover:
        table.add_row(str(row["gamma"]), str(row["exit_layer"]), str(row["kappa"]), str(row["steps"]),
                      *(_pct(row["coverage"][str(b)]) for b in budgets))
    console.print(table)
    table = Table(title="the exit as a verdict predictor (draft token accepted …)")
    for name in ("ℓe", "positions", "overall", "exit top-1 = draft", "… accepted then", "… accepted otherwise"):
        table.add_column(name, justify="right")
    for row in agreement:
        table.add_row(str(row["exit_layer"]), str(row["positions"]), _pct(row["accepted"]),
                      _pct(row["exit_top1_is_draft"]), _pct(row["accepted_if_top1"]), _pct(row["accepted_otherwise"]))
    console.print(table)


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise MirrorDeployError(f"{flag} {text!r} is not a list of positive integers", f"write it like {flag} 2,3,4")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mirror_deploy.tuning.coverage", description=__doc__.split("\n")[0])
    parser.add_argument("artifact", help="a deploy artifact folder")
    parser.add_argument("--gammas", default="2,3,4", help="window lengths to replay (at most the artifact's γ)")
    parser.add_argument("--budgets", default="1,2,4,8,16", help="branch budgets to report")
    parser.add_argument("--prompts", type=int, default=TuneOptions.prompts)
    parser.add_argument("--new-tokens", type=int, default=TuneOptions.new_tokens)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    try:
        gammas, budgets = _ints(args.gammas, "--gammas"), _ints(args.budgets, "--budgets")
        engine = Engine(args.artifact)
        m = engine.manifest
        if max(gammas) > m.gamma:
            raise MirrorDeployError(f"--gammas reaches {max(gammas)} but the artifact drafts at most γ={m.gamma}",
                                    f"use window lengths up to {m.gamma}")
        sequences = calibration_sequences(engine, args.prompts, args.new_tokens, console)
        cover = coverage_rows(replays(sequences, m.exit_layers, m.kappa, max(gammas)), gammas, budgets)
        agreement = exit_agreement_rows(sequences, m.exit_layers)
    except MirrorDeployError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_tables(console, cover, agreement, budgets, m.branch_batch)
    if args.out:
        Path(args.out).write_text(json.dumps({"coverage": cover, "exit_agreement": agreement}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
