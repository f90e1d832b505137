"""Open an artifact's graphs in the runtimes its profile names."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifact import Manifest
from ..errors import MirrorDeployError
from ..axes import static_draft_dims
from ..targets import PartProfile, Profile
from .base import CompiledGraph


def compile_cache_dir() -> Path:
    root = Path(os.environ.get("MIRROR_DEPLOY_CACHE", "~/.cache/mirror-deploy")).expanduser()
    return root / "openvino-compile"


@dataclass
class TargetGraphs:
    """The target's layer segments (in layer order, with their [first, stop) layers), its head, and the
    optional cheaper exit head."""
    segments: list[CompiledGraph]
    layers: list[tuple[int, int]]
    head: CompiledGraph
    exit_head: CompiledGraph | None = None
    adapters: dict[int, CompiledGraph] | None = None   # exit layer -> learned exit (applied before the head)


def open_graph(folder: Path, manifest: Manifest, name: str, part: PartProfile, logical: str) -> CompiledGraph:
    entry = manifest.graphs[name]
    path = Path(folder) / entry.file
    threads = part.threads
    if part.backend == "onnxruntime":
        if entry.format != "onnx":
            raise MirrorDeployError(f"{name} is {entry.format}, ONNX Runtime needs ONNX", "use the .onnx graph")
        from .onnxruntime import OrtGraph
        return OrtGraph(path, logical, part.device, threads or 0, part.spinning)
    if any(spec["name"] == "seqlens_k" for spec in entry.inputs):
        raise MirrorDeployError(f"{name} is a fused ONNX Runtime segment (K/V written in place by TensorScatter), "
                                f"which {part.backend} cannot run",
                                "re-export with --target-attention eager for this profile")
    from .openvino import OvGraph
    # int8 activations: the draft's speed; an OpenVINO-native int4/int8 target's row invariance (openvino_target.py)
    native_target = logical != "draft" and manifest.target_attention == "fused"
    int8_activations = entry.weights in ("int8", "int4", "gguf") if native_target else \
        logical == "draft" and entry.weights in ("int8", "int4", "gguf")
    dims = None
    if entry.static:
        dims = static_draft_dims(manifest.branch_batch, manifest.max_context)
        if part.static and logical == "draft":
            return _bucketed(path, entry, manifest, part, dims, int8_activations)
    return OvGraph(path, logical, part.device, threads, part.precision,
                   static_shapes=None, static_dims=dims, cache_dir=compile_cache_dir(), pinning=part.pinning,
                   int8_activations=int8_activations)


def _bucketed(path: Path, entry, manifest: Manifest, part: PartProfile, dims: dict, int8_activations: bool):
    """The static draft at each capacity bucket and width (static_buckets.py), compiled for the part's device."""
    from .openvino import OvGraph
    from .static_buckets import BucketedDraft, capacity_buckets, variant_shapes, widths
    variants = {}
    for width in widths(dims["seq"]):
        for slots in capacity_buckets(manifest.max_context):
            shapes = variant_shapes(entry.inputs, width, slots)
            variants[(width, slots)] = OvGraph(path, "draft", part.device, part.threads, part.precision,
                                               static_shapes=shapes, static_dims=dims, cache_dir=compile_cache_dir(),
                                               pinning=part.pinning, int8_activations=int8_activations)
    return BucketedDraft(variants, dims["seq"], manifest.max_context)


def draft_graph_name(manifest: Manifest, profile: Profile, streams: bool = False) -> str:
    """The draft graph a profile runs; `streams`: its variant with speculative streams (`learn-streams`)."""
    if streams:
        name = draft_graph_name(manifest, profile) + "_streams"
        if name not in manifest.graphs:
            raise MirrorDeployError(f"this artifact has no speculative streams for its {name[:-8]} graph",
                                    "run `mirror-deploy learn-streams ART` first, or run without --streams")
        return name
    part = profile.draft
    if part.backend == "onnxruntime":
        if "draft" not in manifest.graphs:
            raise MirrorDeployError(f"profile {profile.name} runs the draft on ONNX Runtime (draft.onnx), which this "
                                    "artifact was not exported for", f"re-export with --profile {profile.name}")
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


def adapter_names(manifest: Manifest) -> list[str]:
    return sorted(k for k in manifest.graphs if k.startswith("exit_adapter_"))


def target_graph_names(manifest: Manifest) -> list[str]:
    return [*manifest.target_segments(), "target_head", *(["exit_head"] if "exit_head" in manifest.graphs else []),
            *adapter_names(manifest)]


def open_target(folder: Path, manifest: Manifest, profile: Profile) -> TargetGraphs:
    opened = {name: open_graph(folder, manifest, name, profile.target, name) for name in target_graph_names(manifest)}
    return target_graphs(manifest, opened)


def target_graphs(manifest: Manifest, opened: dict[str, CompiledGraph]) -> TargetGraphs:
    """Assemble TargetGraphs from graphs opened by name (runtime graphs, or check's references)."""
    names = manifest.target_segments()
    adapters = {manifest.graphs[n].layers[0]: opened[n] for n in adapter_names(manifest) if n in opened}
    return TargetGraphs([opened[n] for n in names], [tuple(manifest.graphs[n].layers) for n in names],
                        opened["target_head"], opened.get("exit_head"), adapters)


def open_draft(folder: Path, manifest: Manifest, profile: Profile, streams: bool = False) -> CompiledGraph:
    require_learned_for_target(manifest)
    name = draft_graph_name(manifest, profile, streams)
    graph = with_vocab(open_graph(folder, manifest, name, profile.draft, "draft"), folder, manifest, name)
    graph.streams = manifest.stream_count(name)
    return graph


def require_learned_for_target(manifest: Manifest) -> None:
    """A learned draft (`learn-draft`) runs only beside the target that taught it."""
    from ..learned_draft import require_taught_by
    learned = (manifest.draft or {}).get("learned")
    require_taught_by(learned, manifest.target["weights_sha256"], manifest.target["path"], manifest.draft["path"])


def draft_vocab_ids(folder: Path, manifest: Manifest) -> np.ndarray:
    """The vocabulary ids a cut draft head scores, in the order of its logits' columns."""
    cut = manifest.draft_vocab
    path = Path(folder) / cut["file"]
    if not path.is_file():
        raise MirrorDeployError(f"artifact {folder} lists a draft vocabulary cut in {cut['file']}, which is missing",
                                "re-run `mirror-deploy cut-vocab` on it, or re-export the artifact")
    ids = np.load(path, allow_pickle=False)
    vocab = manifest.draft["vocab_size"]
    if ids.ndim != 1 or len(ids) != cut["size"] or len(np.unique(ids)) != len(ids) or ids.min() < 0 \
            or ids.max() >= vocab:
        raise MirrorDeployError(f"{path} is not {cut['size']} distinct token ids below {vocab}",
                                "re-run `mirror-deploy cut-vocab` on the artifact, or re-export it")
    return ids.astype(np.int64)


def with_vocab(graph: CompiledGraph, folder: Path, manifest: Manifest, name: str) -> CompiledGraph:
    """Attach a cut head's id map to the opened draft graph (None: it scores the whole vocabulary)."""
    graph.vocab_ids = draft_vocab_ids(folder, manifest) if manifest.vocab_cut(name) else None
    return graph
