"""`mirror-deploy`: export -> check -> devices -> run -> bench, plus models and demo."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import MirrorDeployError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Deploy a causal LM pair for Mirror Speculative Decoding (target on GPU, draft on NPU).")
err = Console(stderr=True)


@app.callback()
def _group():
    """Keep sub-commands even while only one is registered."""


def friendly(fn):
    """Turn user-fixable failures into one clear message and a non-zero exit; no traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MirrorDeployError as e:
            err.print(f"[bold red]error:[/] {e.problem}", highlight=False)
            if e.fix:
                err.print(f"  [bold]fix:[/] {e.fix}", highlight=False)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130)
    return wrapper


@app.command()
@friendly
def export(
    target: Path = typer.Argument(..., help="Target model: checkpoint folder or .gguf file."),
    draft: Path = typer.Option(..., "--draft", help="Draft model with the same tokenizer."),
    out: Path = typer.Option(..., "--out", help="Artifact folder to write."),
    exit_layer: Optional[int] = typer.Option(None, help="Early-exit layer ℓe (default N/2)."),
    kappa: int = typer.Option(8, help="Early-exit top-κ width."),
    gamma: int = typer.Option(7, help="Draft window length γ."),
    max_context: int = typer.Option(1024, help="KV capacity: prompt + new tokens."),
    branch_batch: int = typer.Option(8, help="Most branches the draft decodes per call (static width − 1)."),
    profile: str = typer.Option("cpu-sim", help="Device profile name or .toml file."),
    draft_weights: str = typer.Option("fp32", help="Draft weight format for its device: fp32|fp16|int8|int4."),
    force: bool = typer.Option(False, "--force", help="Replace DIR if it exists."),
):
    """Split the target into prefix/suffix graphs, export the draft, compile it, write the manifest."""
    from .export.pipeline import ExportOptions, export_artifact
    opts = ExportOptions(exit_layer, kappa, gamma, max_context, branch_batch, profile, draft_weights, force)
    path = export_artifact(target, draft, out, opts, err)
    err.print(f"[green]wrote[/] {path}")


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
