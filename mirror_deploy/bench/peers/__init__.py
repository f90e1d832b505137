"""Peers: what a user would run instead of mirror-deploy, as `Method`s on the same models and machine.

One module per peer family (hf.py, ov_genai.py, ort_genai.py, llama_cpp.py; shared helpers in common.py),
like optimum's one folder per backend; this module names them and builds them on demand.

- `TransformersPlain` / `TransformersAssisted` / `TransformersLookup`: PyTorch fp32, `generate`,
  `generate(assistant_model=draft)`, `generate(prompt_lookup_num_tokens=K)`.
- `OpenVinoGenAI`: `openvino_genai.LLMPipeline` over IRs from `export_openvino_models` (optimum-cli):
  the target alone, speculative with the draft, or with `prompt_lookup=True`.
- `OrtGenAI`: onnxruntime-genai speculative decoding over models from `build_ortgenai_models`; its model
  builder needs transformers 5, so it runs in a separate venv (`ORTGENAI_BUILDER_VENV`).
- `LlamaCpp`: llama.cpp's `llama-server` (`make llama-cpp`) over GGUFs from `gguf_for` (the registry's own
  GGUF, else an f32 conversion): the target alone, or speculative with the draft (`draft-simple`).

All are greedy only and never stop at EOS, so every method yields exactly max_new_tokens and outputs
compare token by token; none masks EOS but llama.cpp, whose `ignore_eos` does. Timing: `prefill_seconds`
is the time to the first new token, `seconds` the rest of the call; the first token (or first accepted
run) thus falls in prefill.
"""
from __future__ import annotations

from typing import Callable

from ...errors import MirrorDeployError
from .hf import TransformersAssisted, TransformersLookup, TransformersPlain
from .llama_cpp import LlamaCpp, convert_to_gguf, gguf_for
from .ort_genai import OrtGenAI, build_ortgenai_models
from .ov_genai import OV_PLACEMENTS, OV_TARGET_FORMATS, OpenVinoGenAI, export_openvino_models

__all__ = ["PEER_NAMES", "make_peers", "TransformersPlain", "TransformersAssisted", "TransformersLookup", "OpenVinoGenAI",
           "export_openvino_models", "OV_PLACEMENTS", "OV_TARGET_FORMATS", "OrtGenAI", "build_ortgenai_models",
           "LlamaCpp", "convert_to_gguf", "gguf_for"]


PEER_NAMES = ("hf-target", "hf-assisted", "hf-assisted@4", "hf-lookup", "ov-genai-target@1t", "ov-genai-sd@1t",
              "ov-genai-lookup@1t", "ov-genai-target@2t", "ov-genai-sd@2t", "ov-genai-lookup@2t",
              "ort-genai-target@1t", "ort-genai-sd@1t", "ort-genai-target@2t", "ort-genai-sd@2t",
              "llama-cpp@1t", "llama-cpp-sd@1t", "llama-cpp@2t", "llama-cpp-sd@2t")
# Peers that run the draft model (the others run the target alone, or with prompt lookup).
NEEDS_DRAFT = ("hf-assisted", "ov-genai-sd", "ort-genai-target", "ort-genai-sd", "llama-cpp-sd")


def make_peers(names: list[str], manifest) -> list[tuple[str, Callable[[], object]]]:
    """(name, factory) per peer, on the artifact's own source checkpoints. Factories, because each peer
    holds its own copy of the models (6-9 GB): the bench loads one at a time."""
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown:
        raise MirrorDeployError(f"unknown peer(s): {', '.join(unknown)}", f"use: {', '.join(PEER_NAMES)}")
    target, draft = manifest.target["path"], manifest.draft["path"] if manifest.has_draft else None
    need_draft = [n for n in names if n.partition("@")[0] in NEEDS_DRAFT]
    if draft is None and need_draft:
        raise MirrorDeployError(f"peer(s) {', '.join(need_draft)} need the draft model, and this is a target-only "
                                "artifact", "use hf-target, hf-lookup, ov-genai-target@.., ov-genai-lookup@.. or "
                                "llama-cpp@.., or export with --draft")

    def factory(name: str):
        family, _, placement = name.partition("@")
        if family == "hf-target":
            return TransformersPlain(target)
        if family == "hf-assisted":
            return TransformersAssisted(target, draft, num_assistant_tokens=int(placement) if placement else None)
        if family == "hf-lookup":
            return TransformersLookup(target)
        if family.startswith("ov-genai"):
            speculative = family.endswith("sd")
            target_ir, draft_ir = export_openvino_models(target, draft if speculative else None,
                                                         target_weight_format=manifest.target_weights)
            return OpenVinoGenAI(target_ir, draft_ir if speculative else None, placement,
                                 prompt_lookup=family.endswith("lookup"))
        if family.startswith("llama-cpp"):
            speculative = family.endswith("sd")
            return LlamaCpp(gguf_for(target), gguf_for(draft) if speculative else None,
                            threads=int(placement.rstrip("t")))
        folder = build_ortgenai_models(target, draft)
        return OrtGenAI(folder, speculative=family.endswith("sd"), threads=int(placement.rstrip("t")))

    return [(n, lambda n=n: factory(n)) for n in names]
