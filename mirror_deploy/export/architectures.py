"""Supported architectures, each declared in one place (optimum style).

An `ArchSpec` says where a causal LM keeps its embeddings, decoder layers, final norm and head, and how
positions enter (rotary embeddings or a learned table). Everything else is shared code in `graphs.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MirrorDeployError


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    decoder: str                 # attribute of the CausalLM holding the decoder stack
    embed: str                   # token embedding inside the decoder
    layers: str                  # ModuleList of decoder layers
    final_norm: str
    rotary: str | None = None    # rotary-embedding module (Llama family)
    learned_positions: str | None = None  # learned position table (GPT-2)
    layer_returns_tuple: bool = False
    fused_attention: bool = False  # OpenVINO CPU fuses the exported attention (stateful draft, measured)
    grouped_query: bool = False    # HF attention takes (query, key, value, mask, scaling): graphs.grouped_attention applies

    def decoder_of(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.decoder)

    def layers_of(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.decoder_of(model), self.layers)

    def embed_tokens(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        dec = self.decoder_of(model)
        hidden = getattr(dec, self.embed)(input_ids)
        if self.learned_positions:
            hidden = hidden + getattr(dec, self.learned_positions)(position_ids)
        return hidden

    def position_embeddings(self, model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
        if not self.rotary:
            return None
        return getattr(self.decoder_of(model), self.rotary)(hidden, position_ids)

    def run_layer(self, layer: nn.Module, hidden, mask, position_ids, cache, position_embeddings):
        if self.rotary:
            out = layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                        use_cache=True, position_embeddings=position_embeddings)
        else:
            out = layer(hidden, past_key_values=cache, attention_mask=mask, use_cache=True)
        return out[0] if self.layer_returns_tuple or isinstance(out, tuple) else out

    def final_norm_of(self, model: nn.Module) -> nn.Module:
        return getattr(self.decoder_of(model), self.final_norm)


LLAMA_FAMILY = ArchSpec(
    family="llama", model_types=("llama", "qwen2", "qwen3", "mistral"),
    decoder="model", embed="embed_tokens", layers="layers", final_norm="norm", rotary="rotary_emb",
    fused_attention=True, grouped_query=True,
)
GPT2 = ArchSpec(
    family="gpt2", model_types=("gpt2",),
    decoder="transformer", embed="wte", layers="h", final_norm="ln_f", learned_positions="wpe",
    layer_returns_tuple=True,
)
ARCHITECTURES: tuple[ArchSpec, ...] = (LLAMA_FAMILY, GPT2)
SUPPORTED_MODEL_TYPES = tuple(t for a in ARCHITECTURES for t in a.model_types)


def arch_for(model_type: str) -> ArchSpec:
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise MirrorDeployError(
        f"unsupported architecture {model_type!r}",
        f"use a model of one of the supported types: {', '.join(SUPPORTED_MODEL_TYPES)}",
    )
