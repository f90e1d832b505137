"""The rows of `mirror-deploy check`: one finding each, PASS / FAIL / SKIP, and the table that prints them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..errors import MirrorDeployError

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass
class Row:
    check: str
    graph: str
    result: str
    detail: str
    error: float | None = None
    limit: str = ""
    fix: str = ""


@dataclass
class CheckReport:
    folder: Path
    profile: str | None
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.result != FAIL for r in self.rows)

    def add(self, check, graph, ok: bool, detail, error=None, limit="", fix="") -> Row:
        self.rows.append(Row(check, graph, PASS if ok else FAIL, detail, error, limit, fix))
        return self.rows[-1]

    def fail(self, check, graph, err: MirrorDeployError, prefix: str = "") -> None:
        self.add(check, graph, False, prefix + err.problem, fix=err.fix or "")

    def skip(self, check, graph, why) -> None:
        self.rows.append(Row(check, graph, SKIP, why))


def print_report(report: CheckReport, console: Console) -> None:
    table = Table(title=f"mirror-deploy check {report.folder}")
    table.add_column("check", no_wrap=True)
    table.add_column("graph")
    table.add_column("result", no_wrap=True)
    table.add_column("detail", overflow="fold", ratio=1)
    table.add_column("max error")
    style = {PASS: "green", FAIL: "bold red", SKIP: "yellow"}
    for r in report.rows:
        error = "" if r.error is None else f"{r.error:.1e} {r.limit}"
        table.add_row(r.check, r.graph, f"[{style[r.result]}]{r.result}[/]", r.detail, error)
    console.print(table)
    fixes = dict.fromkeys(r.fix for r in report.rows if r.result == FAIL and r.fix)
    for fix in fixes:
        console.print(f"  [bold]fix:[/] {fix}", highlight=False)
    counts = {k: sum(r.result == k for r in report.rows) for k in (PASS, FAIL, SKIP)}
    verdict = "[green]passed[/]" if report.ok else "[bold red]FAILED[/]"
    console.print(f"{verdict}: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped")
