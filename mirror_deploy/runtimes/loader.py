"""Open an artifact's graphs in the runtimes its profile names."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..artifact import Manifest
from ..errors import MirrorDeployError
from ..export.shapes import static_dims
from ..targets import PartProfile, Profile
from .base import CompiledGraph


def compile_cache_dir() -> Path:
    root = Path(os.environ.get("MIRROR_DEPLOY_CACHE", "~/.cache/mirror-deploy")).expanduser()
    return root / "openvino-compile"


@dataclass
class TargetGraphs:
    prefix: CompiledGraph
    suffix: CompiledGraph


def open_graph(folder: Path, manifest: Manifest, name: str, part: PartProfile, logical: str) -> CompiledGraph:
    entry = manifest.graphs[name]
    path = Path(folder) / entry.file
    threads = part.threads_for(logical)
    if part.backend == "onnxruntime":
        if entry.format != "onnx":
            raise MirrorDeployError(f"{name} is {entry.format}, ONNX Runtime needs ONNX", "use the .onnx graph")
        from .onnxruntime import OrtGraph
        return OrtGraph(path, logical, part.device, threads or 0)
    from .openvino import OvGraph
    dims = None
    if entry.static:
        seq = manifest.branch_batch + 1
        dims = static_dims(seq=seq, past=manifest.max_context, rows=seq)
    return OvGraph(path, logical, part.device, threads, part.precision,
                   static_shapes=None, static_dims=dims, cache_dir=compile_cache_dir(),
                   int8_activations=logical == "draft" and entry.weights in ("int8", "int4"))


def draft_graph_name(manifest: Manifest, profile: Profile) -> str:
    part = profile.draft
    if part.backend == "onnxruntime":
        return "draft"
    if part.static:
        if "draft_static" not in manifest.graphs:
            raise MirrorDeployError(
                f"profile {profile.name} runs the draft with static shapes, but this artifact has no static draft",
                f"re-export with --profile {profile.name}")
        return "draft_static"
    if "draft_stateful" not in manifest.graphs:
        raise MirrorDeployError(f"profile {profile.name} runs the stateful OpenVINO draft, which this artifact "
                                "lacks (exported by an older mirror-deploy)", "re-export the artifact")
    return "draft_stateful"


def open_target(folder: Path, manifest: Manifest, profile: Profile) -> TargetGraphs:
    return TargetGraphs(open_graph(folder, manifest, "target_prefix", profile.target, "target_prefix"),
                        open_graph(folder, manifest, "target_suffix", profile.target, "target_suffix"))


def open_draft(folder: Path, manifest: Manifest, profile: Profile) -> CompiledGraph:
    return open_graph(folder, manifest, draft_graph_name(manifest, profile), profile.draft, "draft")
