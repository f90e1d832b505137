"""Put learned exits into an artifact: `mirror-deploy learn-exit DIR`.

Each chosen boundary L gets `exit_adapter_L_<tag>.onnx` (hidden_states -> adapted, one MatMul and two
Adds), which the runtime applies to the exit rows before the head; the translators' weights also go in
(`exit_adapters_<tag>.safetensors`) so `check` can compare the ONNX graphs with them. <tag> is a hash of
the weights and their training prompts, so a re-run never writes over a file the current manifest hashes:
new files go in beside the old ones, the manifest is replaced last (atomic rename), and only then are the
old files deleted. An interrupted run leaves the artifact as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from ..artifact import GraphEntry, Manifest, read_manifest, sha256_file
from ..errors import MirrorDeployError
from .store import replace_manifest
from .translator import AffineTranslator, export_onnx, save_translators

WEIGHTS_PREFIX = "exit_adapters"                 # exit_adapters[_<tag>].safetensors: the translators
TRAINED_ON_PREFIX = "exit_adapters_trained_on"   # ….json: sha256 of each calibration prompt that trained them


def adapter_name(layer: int) -> str:
    return f"exit_adapter_{layer}"


def _adapter_files(manifest: Manifest) -> set[str]:
    """Every file the manifest's learned exits hash (graphs, weights, training prompts)."""
    return {f for name, g in manifest.graphs.items() if name.startswith("exit_adapter_") for f in g.sha256}


def weights_file(manifest: Manifest) -> str | None:
    """The translators' weights the learned exits were exported from (older artifacts name it without a tag)."""
    return next((f for f in sorted(_adapter_files(manifest))
                 if f.startswith(WEIGHTS_PREFIX) and f.endswith(".safetensors")), None)


def trained_on(folder: str | Path) -> set[str] | None:
    """The prompts (sha256) the artifact's learned exits were trained on; None when unknown."""
    name = next((f for f in sorted(_adapter_files(read_manifest(Path(folder))))
                 if f.startswith(TRAINED_ON_PREFIX) and f.endswith(".json")), None)
    return set(json.loads((Path(folder) / name).read_text())["prompt_sha256"]) if name else None


def _chosen(manifest: Manifest, translators: dict[int, AffineTranslator], reports) -> dict[int, AffineTranslator]:
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
    return chosen


def attach(folder: str | Path, translators: dict[int, AffineTranslator], reports: list | None = None,
           trained_prompts: list[str] | None = None) -> list[int]:
    """Write the translators for the artifact's exported exit layers; returns the layers attached.
    `trained_prompts` (sha256 of each training prompt) lets `tune` measure the exits on other text."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    d = manifest.target["hidden_size"]
    chosen = _chosen(manifest, translators, reports)
    old = _adapter_files(manifest)
    written: list[Path] = []     # files of this run, deleted again if it does not finish

    def place(temp: Path, name: str) -> Path:
        final = folder / name
        if name in old:          # these very bytes (the name is their hash), hashed by the current manifest
            temp.unlink()
        else:
            os.replace(temp, final)
            written.append(final)
        return final

    try:
        temp = Path(tempfile.mkstemp(prefix=".adapters-", suffix=".tmp", dir=folder)[1])
        written.append(temp)
        save_translators(chosen, temp)
        prompts_text = (json.dumps({"prompt_sha256": sorted(trained_prompts)}, indent=1)
                        if trained_prompts is not None else "")
        tag = hashlib.sha256(temp.read_bytes() + prompts_text.encode()).hexdigest()[:8]
        shared = {}
        weights = place(temp, f"{WEIGHTS_PREFIX}_{tag}.safetensors")
        shared[weights.name] = sha256_file(weights)
        if trained_prompts is not None:   # else the translators' training text is unknown: none recorded
            temp = folder / f".{TRAINED_ON_PREFIX}.tmp"
            written.append(temp)
            temp.write_text(prompts_text)
            prompts = place(temp, f"{TRAINED_ON_PREFIX}_{tag}.json")
            shared[prompts.name] = sha256_file(prompts)
        for name in [k for k in manifest.graphs if k.startswith("exit_adapter_")]:
            del manifest.graphs[name]
        for b, translator in sorted(chosen.items()):
            temp = folder / f".{adapter_name(b)}.onnx.tmp"
            written.append(temp)
            export_onnx(translator, temp)
            onnx_file = place(temp, f"{adapter_name(b)}_{tag}.onnx")
            manifest.graphs[adapter_name(b)] = GraphEntry(
                file=onnx_file.name, format="onnx",
                sha256={onnx_file.name: sha256_file(onnx_file), **shared},
                inputs=[{"name": "hidden_states", "dtype": "float32", "shape": [1, "rows", d]}],
                outputs=[{"name": "adapted", "dtype": "float32", "shape": [1, "rows", d]}],
                layers=[b, b])
        replace_manifest(folder, manifest)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    for name in old - _adapter_files(manifest):    # the previous run's files, no longer hashed
        (folder / name).unlink(missing_ok=True)
    return sorted(chosen)


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
