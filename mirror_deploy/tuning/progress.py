"""The progress display of the training commands (learn-streams, learn-draft): one bar per phase."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def phase_bars(console):
    """Yields `progress(text, total=1)`, a context for one phase that gives `advance(description=None, step=1)`
    (step 0: a new description only)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        @contextmanager
        def progress(text, total: int = 1):
            task = bar.add_task(text, total=total)

            def advance(description: str | None = None, step: int = 1):
                bar.update(task, advance=step, **({"description": description} if description else {}))
            yield advance
            bar.update(task, completed=total)
        yield progress
