"""What `mirror-deploy export` is asked for: its options, the formats each accepts, and the checks that
need no weights (a bad option is refused before any model is loaded)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import MirrorDeployError
from ..targets import Profile
from .fused_target import fused_unsupported
from .loading import SourceModel
from .openvino_ir import WEIGHT_FORMATS

# Target weights: fp32; fp16 (for GPUs); weight-only int8/int4, as ORT MatMulNBits (accuracy_level 4) or, when
# the profile runs the target on OpenVINO, as NNCF-compressed IR. A quantized target is a different model;
# every decoding mode is compared with autoregressive decoding of the same artifact.
TARGET_WEIGHT_BITS = {"fp32": None, "fp16": None, "int8": 8, "int4": 4, "gguf": None}
# gguf: the source GGUF's own blocks, kept (gguf_weights.py): ONNX Runtime fused segments only.
# The early exit uses the target's own head ("shared"), or its own int8/int4 copy: it only ranks
# branches, so a cheaper exit head changes speed, never the committed output.
EXIT_HEAD_FORMATS = {"shared": None, "int8": 8, "int4": 4}
WEIGHT_BITS = {**TARGET_WEIGHT_BITS, **EXIT_HEAD_FORMATS}
# Target formats whose fused first segment stores the token table as int8 blocks: a quarter of the fp32
# table's bytes (0.93 GB for Qwen2.5-1.5B). A GGUF target's table is dequantized from its own blocks.
QUANTIZED_EMBEDDING = ("int8", "int4")
# Target segments: "fused" are built from the weights (row-invariant attention: in-place K/V on ONNX Runtime,
# K/V as model state on OpenVINO, export/openvino_target.py), "eager" are the traced HF layers (any
# architecture, any runtime; kept for A/B).
TARGET_ATTENTION = ("fused", "eager")


def default_exit_layers(num_layers: int) -> list[int]:
    """A few boundaries around the middle (N/2 - s, N/2, N/2 + s, N/2 + 2s with s ≈ N/7: 10, 14, 18, 22 for
    28 layers), so the exit layer can be chosen per run among them without re-exporting."""
    step, mid = max(1, num_layers // 7), num_layers // 2
    return sorted({min(max(mid + k * step, 1), num_layers - 1) for k in (-1, 0, 1, 2)})


@dataclass
class ExportOptions:
    exit_layer: int | None = None     # the default exit layer of runs (default: N // 2)
    exit_layers: list[int] | None = None  # segment boundaries a run may exit at (default: around N/2)
    kappa: int = 8
    gamma: int = 7
    max_context: int = 1024
    branch_batch: int = 8
    profile: str = "cpu-sim"
    draft_weights: str = "fp32"
    force: bool = False
    exit_head_weights: str = "shared"  # int8/int4: a cheaper copy of the head for the early exit
    target_weights: str = "fp32"
    target_attention: str | None = None  # fused | eager; None: fused where supported, else eager
    also_profiles: tuple[str, ...] = ()   # more profiles the artifact serves: their draft graphs are written too
    # OpenVINO-native int4 target: "ours" (mirror-deploy's 4-bit kernel, kernels/), "stock" (OpenVINO's
    # compressed MatMul); None: ours where it is built and every profile runs the target on the CPU.
    target_kernel: str | None = None


def target_attention(target: SourceModel, profile: Profile, opts: ExportOptions) -> str:
    """fused or eager for this target and profile; an explicit fused that cannot be built is an error."""
    asked = opts.target_attention
    if asked not in (None, *TARGET_ATTENTION):
        raise MirrorDeployError(f"--target-attention {asked!r} is unknown", f"use one of: {', '.join(TARGET_ATTENTION)}")
    if profile.target.backend == "openvino":
        return _openvino_attention(target, profile, opts)
    why = fused_unsupported(target.config, opts.max_context)
    if opts.target_weights == "fp16":  # fp32 I/O around fp16 compute: casts would copy the K/V buffer
        why = "--target-weights fp16 keeps fp32 inputs and outputs, so its K/V cannot be bound in place"
    if opts.target_weights == "gguf" and why:
        raise MirrorDeployError(f"--target-weights gguf writes GGUF blocks into fused ONNX Runtime segments, and "
                                f"they are not available here: {why}",
                                "use a profile that runs the target on ONNX Runtime CPU (e.g. --profile cpu), or "
                                "--target-weights int4")
    if asked == "fused" and why:
        raise MirrorDeployError(f"--target-attention fused is not available: {why}",
                                "use --target-attention eager (or leave it unset)")
    # The in-place K/V binding is host memory: measured on ORT CPU only, so other ORT devices get fused
    # only when asked for (and `check` compares them with PyTorch like any other).
    if opts.target_weights == "gguf":
        return "fused"
    return asked or ("eager" if why or profile.target.device.lower() != "cpu" else "fused")


def _openvino_attention(target: SourceModel, profile: Profile, opts: ExportOptions) -> str:
    """fused (OpenVINO-native segments, export/openvino_target.py) or eager, for a target run by OpenVINO."""
    from .openvino_target import ov_target_unsupported
    asked = opts.target_attention
    why = ov_target_unsupported(target.config, opts.target_weights)
    cpu = profile.target.device.upper() == "CPU"
    if opts.target_weights == "gguf" and (why or opts.target_kernel == "stock" or asked == "eager" or not cpu):
        raise MirrorDeployError(f"--target-weights gguf on profile {profile.name}, which runs the target on openvino "
                                f"{profile.target.device}, keeps the 4-bit blocks in our kernel (a CPU op) in "
                                f"OpenVINO-native segments ({why or 'not available here'})",
                                "use --target-weights int4, or --profile cpu (ONNX Runtime keeps the blocks too)")
    if asked == "fused" and why:
        raise MirrorDeployError(f"--target-attention fused is not available: {why}",
                                "use --target-attention eager (or leave it unset)")
    if opts.target_kernel not in (None, "ours", "stock"):
        raise MirrorDeployError(f"--target-kernel {opts.target_kernel!r} is unknown", "use ours or stock")
    if opts.target_kernel == "ours":
        from ..kernels.library import FIX, status
        kernel = status()
        if opts.target_weights not in ("int4", "gguf") or (asked or ("eager" if why else "fused")) != "fused":
            raise MirrorDeployError("--target-kernel ours is mirror-deploy's 4-bit kernel: it serves OpenVINO-native "
                                    "(fused) int4 targets only", "add --target-weights int4, or drop --target-kernel")
        if not kernel.available:
            raise MirrorDeployError(f"--target-kernel ours: the kernel is not usable here ({kernel.why})",
                                    f"{FIX}; or export with --target-kernel stock")
    if opts.target_weights == "gguf":
        from ..kernels.library import FIX, status
        if not status().available:
            raise MirrorDeployError(f"--target-weights gguf on OpenVINO keeps the 4-bit blocks in our kernel, which is "
                                    f"not usable here ({status().why})", f"{FIX}; or use --target-weights int4")
    return asked or ("eager" if why else "fused")


def validate(target: SourceModel, draft: SourceModel | None, opts: ExportOptions, out: Path) -> tuple[int, list[int]]:
    """All checks that need no weights; returns the default exit layer and the exported boundaries.
    `draft` None: a target-only artifact (modes ar and lookup)."""
    n = target.shape.num_layers
    exit_layer = n // 2 if opts.exit_layer is None else opts.exit_layer
    boundaries = list(opts.exit_layers) if opts.exit_layers else default_exit_layers(n)
    for layer in {exit_layer, *boundaries}:
        if not 1 <= layer <= n - 1:
            raise MirrorDeployError(f"exit layer {layer} is outside [1, {n - 1}] for a {n}-layer target",
                                    f"choose layers in 1..{n - 1} (default {n // 2})")
    boundaries = sorted({*boundaries, exit_layer})
    if opts.target_weights not in TARGET_WEIGHT_BITS:
        raise MirrorDeployError(f"--target-weights {opts.target_weights!r} is unknown",
                                f"use one of: {', '.join(TARGET_WEIGHT_BITS)}")
    vocab = target.shape.vocab_size
    if not 1 <= opts.kappa <= vocab:
        raise MirrorDeployError(f"--kappa {opts.kappa} must be in [1, {vocab}] (the vocabulary size)",
                                "use a small top-k width such as 8")
    if opts.gamma < 1:
        raise MirrorDeployError(f"--gamma {opts.gamma} must be at least 1", "use a window such as 7")
    if opts.branch_batch < 1:
        raise MirrorDeployError(f"--branch-batch {opts.branch_batch} must be at least 1", "use e.g. 8")
    if opts.target_weights == "gguf" and opts.exit_head_weights != "shared":
        raise MirrorDeployError(f"--exit-head-weights {opts.exit_head_weights} re-quantizes the head, and a GGUF "
                                "target keeps its head in the file's own blocks", "leave --exit-head-weights shared")
    if opts.exit_head_weights not in EXIT_HEAD_FORMATS:
        raise MirrorDeployError(f"--exit-head-weights {opts.exit_head_weights!r} is unknown",
                                f"use one of: {', '.join(EXIT_HEAD_FORMATS)}")
    if opts.draft_weights not in WEIGHT_FORMATS:
        raise MirrorDeployError(f"--draft-weights {opts.draft_weights!r} is unknown",
                                f"use one of: {', '.join(WEIGHT_FORMATS)}")
    need = opts.gamma + 2 + opts.gamma * (opts.branch_batch + 1)
    if opts.max_context < need:
        raise MirrorDeployError(f"--max-context {opts.max_context} leaves no room for a prompt",
                                f"use at least {need} (a few hundred or more)")
    for model in (target, draft) if draft is not None else (target,):
        if model.shape.max_positions and opts.max_context > model.shape.max_positions:
            raise MirrorDeployError(
                f"--max-context {opts.max_context} exceeds {model.path}'s {model.shape.max_positions} positions",
                f"use --max-context {model.shape.max_positions} or less")
    if draft is not None and draft.shape.vocab_size != vocab:
        raise MirrorDeployError(
            f"target and draft vocabularies differ ({vocab} vs {draft.shape.vocab_size} tokens)",
            "pick a draft trained with the target's tokenizer (e.g. a smaller model of the same family)")
    if out.exists() and not opts.force:
        raise MirrorDeployError(f"output folder {out} already exists", "pass --force to replace it")
    return exit_layer, boundaries
