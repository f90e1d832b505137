"""Put learned exits into an artifact: `mirror-deploy learn-exit DIR`.

Each chosen boundary L gets `exit_adapter_L.onnx` (hidden_states -> adapted, one MatMul and two Adds),
which the runtime applies to the exit rows before the head; the translators' weights also go in
(`exit_adapters.safetensors`) so `check` can compare the ONNX graphs with them. Files are written under
temporary names and the manifest is replaced last (atomic rename): an interrupted run leaves the artifact
as it was.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..artifact import GraphEntry, read_manifest, sha256_file
from ..errors import MirrorDeployError
from .store import replace_manifest
from .translator import AffineTranslator, export_onnx, save_translators

WEIGHTS_FILE = "exit_adapters.safetensors"
TRAINED_ON_FILE = "exit_adapters_trained_on.json"   # sha256 of each calibration prompt that trained them


def trained_on(folder: str | Path) -> set[str] | None:
    """The prompts (sha256) the artifact's learned exits were trained on; None when unknown."""
    path = Path(folder) / TRAINED_ON_FILE
    return set(json.loads(path.read_text())["prompt_sha256"]) if path.is_file() else None


def adapter_name(layer: int) -> str:
    return f"exit_adapter_{layer}"


def attach(folder: str | Path, translators: dict[int, AffineTranslator], reports: list | None = None,
           trained_prompts: list[str] | None = None) -> list[int]:
    """Write the translators for the artifact's exported exit layers; returns the layers attached.
    `trained_prompts` (sha256 of each training prompt) lets `tune` measure the exits on other text."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    d = manifest.target["hidden_size"]
    chosen = {b: t for b, t in translators.items() if b in manifest.exit_layers}
    if reports is not None:   # only where the learned exit beat the logit lens on held-out text
        chosen = {b: t for b, t in chosen.items() if any(r.boundary == b and r.choice == "learned" for r in reports)}
    if not chosen:
        raise MirrorDeployError(f"no translator for the artifact's exit layers {manifest.exit_layers} "
                                f"(have {sorted(translators)})", "train at the artifact's exit layers")
    wrong = [b for b, t in chosen.items() if t.weight.shape[0] != d]
    if wrong:
        raise MirrorDeployError(f"translators for layers {wrong} have width {chosen[wrong[0]].weight.shape[0]}, "
                                f"the target's hidden size is {d}", "train them on this artifact's target")
    written: list[Path] = []
    try:
        weights = Path(tempfile.mkstemp(prefix=".adapters-", suffix=".tmp", dir=folder)[1])
        written.append(weights)
        save_translators(chosen, weights)
        prompts = None
        if trained_prompts is not None:
            prompts = folder / f".{TRAINED_ON_FILE}.tmp"
            written.append(prompts)
            prompts.write_text(json.dumps({"prompt_sha256": sorted(trained_prompts)}, indent=1))
        staged = {}
        for b, translator in sorted(chosen.items()):
            tmp = folder / f".{adapter_name(b)}.onnx.tmp"
            written.append(tmp)
            export_onnx(translator, tmp)
            staged[b] = tmp
        for b, tmp in staged.items():   # every file complete: move into place, then the manifest
            tmp.replace(folder / f"{adapter_name(b)}.onnx")
        weights.replace(folder / WEIGHTS_FILE)
        if prompts is not None:
            prompts.replace(folder / TRAINED_ON_FILE)
        elif (folder / TRAINED_ON_FILE).exists():      # these translators' training text is unknown
            (folder / TRAINED_ON_FILE).unlink()
        for name in [k for k in manifest.graphs if k.startswith("exit_adapter_")]:
            del manifest.graphs[name]
        shared = {WEIGHTS_FILE: sha256_file(folder / WEIGHTS_FILE)}   # in every adapter's entry
        if prompts is not None:
            shared[TRAINED_ON_FILE] = sha256_file(folder / TRAINED_ON_FILE)
        for b in staged:
            onnx_file = folder / f"{adapter_name(b)}.onnx"
            manifest.graphs[adapter_name(b)] = GraphEntry(
                file=onnx_file.name, format="onnx",
                sha256={onnx_file.name: sha256_file(onnx_file), **shared},
                inputs=[{"name": "hidden_states", "dtype": "float32", "shape": [1, "rows", d]}],
                outputs=[{"name": "adapted", "dtype": "float32", "shape": [1, "rows", d]}],
                layers=[b, b])
        replace_manifest(folder, manifest)
    finally:
        for path in written:
            if path.exists():
                path.unlink()
    return sorted(staged)


def report_json(reports) -> str:
    from dataclasses import asdict
    return json.dumps([asdict(r) for r in reports], indent=2)


def learn_exit(folder: Path, from_dir: Path | None, prompts: Path | None, new_tokens: int, epochs: int, seed: int,
               console) -> list[int]:
    """`mirror-deploy learn-exit`: train the translators (or read ones `tuning.lens` trained into
    `from_dir`), print how they compare with the logit lens, and attach them to the artifact."""
    from rich.console import Console

    from .lens import BoundaryReport, LensConfig, calibrate, format_table
    from .translator import load_translators

    manifest = read_manifest(folder)
    if from_dir is not None:
        translators = load_translators(from_dir / "lens.safetensors")
        report_file = from_dir / "lens_report.json"
        report = json.loads(report_file.read_text()) if report_file.is_file() else {}
        reports = [BoundaryReport(**r) for r in report["boundaries"]] if report else None
        trained_prompts = report.get("trained_on")
    else:
        config = LensConfig(kappa=manifest.kappa, epochs=epochs, seed=seed)
        translators, reports, _, trained_prompts = calibrate(manifest.target["path"], manifest.exit_layers, config,
                                                             prompts, new_tokens,
                                                             log=lambda text: console.print(text, highlight=False))
    if reports:
        Console().print(format_table(reports, manifest.kappa), highlight=False)
    if trained_prompts is None:
        console.print("[yellow]note:[/] the translators' training prompts are not recorded (an older lens report), "
                      "so `tune` cannot keep them out of its statistics: the exits' hit rates it measures may be "
                      "optimistic")
    layers = attach(folder, translators, reports, trained_prompts)
    console.print(f"[green]added[/] learned exits at layers {', '.join(map(str, layers))} to {folder} "
                  "(runs use them by default; GenerationConfig(learned_exit=False) for the logit lens)")
    return layers
