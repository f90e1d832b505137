"""Torch modules that become the exported graphs: target segments, the target head, and the draft
(explicit K/V, and the stateful variant whose K/V OpenVINO keeps as model state).

Each wraps a slice of the HF model's own decoder layers, so the numerics are the model's own. Past K/V
come in as flat tensors; a small cache object hands them to the HF attention and captures the new K/V.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .architectures import ArchSpec

GROUPED = "mirror_grouped_query"


def grouped_query_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """HF's eager attention without repeat_kv: each K/V head's query heads are one [group·seq, hd] block
    multiplied by that head's K and V. The same products and sums as eager (equal logits, checked), but the
    traced graph no longer broadcasts K and V to every query head and transposes the copy: on OpenVINO's CPU
    that took 40% of a static 0.5B draft call at 512 slots (44.6 → 35.7 ms at one row, one thread)."""
    if attention_mask is None:
        raise ValueError("the exported graphs always feed a 4-D attention mask")
    b, heads, seq, hd = query.shape
    kv = key.shape[1]
    group = heads // kv
    scores = torch.matmul(query.reshape(b, kv, group * seq, hd), key.transpose(2, 3)) * scaling
    scores = scores.reshape(b, kv, group, seq, -1) + attention_mask[:, :, None, :, :key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs.reshape(b, kv, group * seq, -1), value)
    return out.reshape(b, heads, seq, hd).transpose(1, 2).contiguous(), None


@contextmanager
def grouped_attention(model: nn.Module, arch: ArchSpec):
    """Trace `model` with grouped_query_attention where its architecture takes it and it has fewer K/V heads
    than query heads (for the explicit-K/V draft: the stateful draft keeps eager attention, the pattern
    OpenVINO fuses into ScaledDotProductAttention with its K/V state)."""
    config = model.config
    if not arch.grouped_query or getattr(config, "num_key_value_heads", None) in (None, config.num_attention_heads):
        yield model
        return
    from transformers import AttentionInterface
    AttentionInterface.register(GROUPED, grouped_query_attention)
    before = config._attn_implementation
    config._attn_implementation = GROUPED
    try:
        yield model
    finally:
        config._attn_implementation = before


class _CaptureCache:
    """Duck-typed HF cache: serves this call's past K/V and records the new positions' K/V."""

    def __init__(self, first_layer: int, pasts: list[tuple[torch.Tensor, torch.Tensor]]):
        self.first_layer = first_layer
        self.pasts = pasts
        self.new: list[torch.Tensor] = []

    def update(self, key, value, layer_idx, cache_kwargs=None):
        past_k, past_v = self.pasts[layer_idx - self.first_layer]
        # HF attention works head-major [1, heads, seq, dim]; our buffers are position-major.
        self.new += [key.transpose(1, 2), value.transpose(1, 2)]
        return (torch.cat([past_k.transpose(1, 2), key], dim=2),
                torch.cat([past_v.transpose(1, 2), value], dim=2))


class _StateCache(_CaptureCache):
    """Head-major past K/V `[1, kv, past, hd]`; records past ⊕ new, which OpenVINO's make-stateful pass
    turns into the Assign of each layer's state."""

    def update(self, key, value, layer_idx, cache_kwargs=None):
        past_k, past_v = self.pasts[layer_idx - self.first_layer]
        key, value = torch.cat([past_k, key], dim=2), torch.cat([past_v, value], dim=2)
        self.new += [key, value]
        return key, value


class _LayerSlice(nn.Module):
    capture = _CaptureCache

    def __init__(self, arch: ArchSpec, model: nn.Module, start: int, stop: int):
        super().__init__()
        self.arch, self.model, self.start, self.stop = arch, model, start, stop

    def run_layers(self, hidden, position_ids, attention_mask, flat_past):
        pasts = [(flat_past[2 * i], flat_past[2 * i + 1]) for i in range(self.stop - self.start)]
        cache = self.capture(self.start, pasts)
        rope = self.arch.position_embeddings(self.model, hidden, position_ids)
        for layer in self.arch.layers_of(self.model)[self.start:self.stop]:
            hidden = self.arch.run_layer(layer, hidden, attention_mask, position_ids, cache, rope)
        return hidden, cache.new

    def head_logits(self, hidden, output_rows):
        hidden = hidden.index_select(1, output_rows)
        return self.model.lm_head(self.arch.final_norm_of(self.model)(hidden))


class TargetSegment(_LayerSlice):
    """Layers [start, stop) of the target. The first segment embeds the tokens; the others take the
    hidden state of the segment before. Prefix and suffix are compositions of segments at run time, so
    the exit layer is any segment boundary, chosen per run."""

    def forward(self, first, position_ids, attention_mask, *flat_past):
        hidden = self.arch.embed_tokens(self.model, first, position_ids) if self.start == 0 else first
        hidden, new_kv = self.run_layers(hidden, position_ids, attention_mask, flat_past)
        return (hidden, *new_kv)


class TargetHead(nn.Module):
    """Final norm + LM head, stored once and used twice per step: on the exit rows (the logit lens at
    the exit layer: top-κ ids and log-probs) and on the verified rows (logits)."""

    def __init__(self, arch, model, kappa: int):
        super().__init__()
        self.arch, self.model, self.kappa = arch, model, kappa

    def forward(self, hidden_states):
        logits = self.model.lm_head(self.arch.final_norm_of(self.model)(hidden_states))
        top = torch.topk(torch.log_softmax(logits, dim=-1), self.kappa, dim=-1)
        return logits, top.indices, top.values


class FullModel(_LayerSlice):
    """The whole model (the draft graph): logits, and the draft's own top-m tokens with their
    probabilities, so branch ranking reads a few numbers instead of a softmax over the vocabulary."""

    def __init__(self, arch, model, start: int, stop: int, top_m: int):
        super().__init__(arch, model, start, stop)
        self.top_m = top_m

    def forward(self, input_ids, position_ids, attention_mask, output_rows, *flat_past):
        hidden = self.arch.embed_tokens(self.model, input_ids, position_ids)
        hidden, new_kv = self.run_layers(hidden, position_ids, attention_mask, flat_past)
        logits = self.head_logits(hidden, output_rows)
        top = torch.topk(torch.softmax(logits, dim=-1), self.top_m, dim=-1)
        return (logits, top.indices, top.values, *new_kv)


class StatefulDraft(FullModel):
    """The draft with head-major past K/V in and past ⊕ new out, the shape OpenVINO's make-stateful
    pass maps input to output (past_key.i -> present_key.i) to hold K/V as ReadValue/Assign state."""
    capture = _StateCache
