"""Model dimensions read through optimum's config normalisation, plus the graph I/O named in one place.

The explicit graphs take past K/V per layer as `[1, past, kv_heads, head_dim]` (position-major, so the
runtime can pass a contiguous slice of its preallocated buffer) and return only the K/V of the new
positions. The stateful draft's traced graph takes them head-major and returns past ⊕ new, the pair that
OpenVINO turns into model state. The dynamic axes are named here once; a static-shape variant pins them
(see `mirror_deploy/axes.py`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from optimum.utils import NormalizedConfigManager

from ..axes import PAST, ROWS, SEQ

DRAFT_TOP_M = 8   # the draft's own top-m per row (branch ranking uses the first few)


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        norm = NormalizedConfigManager.get_normalized_config_class(config.model_type)(config)
        heads = norm.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or norm.hidden_size // heads
        max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        return cls(config.model_type, norm.num_layers, norm.hidden_size, heads, kv_heads, head_dim,
                   norm.vocab_size, max_pos)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple  # ints and axis names

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def kv_names(kind: str, layers: range) -> list[str]:
    return [f"{kind}_{part}.{i}" for i in layers for part in ("key", "value")]


def draft_top_m(shape: ModelShape) -> int:
    """How many of its own likeliest tokens the draft graph returns per row."""
    return min(DRAFT_TOP_M, shape.vocab_size)


def graph_io(part: str, shape: ModelShape, layers: range, kappa: int | None = None):
    """Inputs and outputs of one graph. `part` is `target_segment` (layers [a, b) of the target; the
    first segment embeds the tokens), `target_head` (final norm + LM head + top-κ), `draft`, or
    `draft_stateful` (head-major past K/V in, past ⊕ new out: the pair that becomes OpenVINO state)."""
    kv, hd = shape.kv_heads, shape.head_dim
    hidden = (1, SEQ, shape.hidden_size)
    if part == "target_head":
        return ([TensorSpec("hidden_states", "float32", (1, ROWS, shape.hidden_size))],
                [TensorSpec("logits", "float32", (1, ROWS, shape.vocab_size)),
                 TensorSpec("top_ids", "int64", (1, ROWS, kappa)),
                 TensorSpec("top_logprobs", "float32", (1, ROWS, kappa))])
    if part == "draft_stateful":
        kv_in = [TensorSpec(n, "float32", (1, kv, PAST, hd)) for n in kv_names("past", layers)]
        kv_out = [TensorSpec(n, "float32", (1, kv, f"{PAST}+{SEQ}", hd)) for n in kv_names("present", layers)]
    else:
        kv_in = [TensorSpec(n, "float32", (1, PAST, kv, hd)) for n in kv_names("past", layers)]
        kv_out = [TensorSpec(n, "float32", (1, SEQ, kv, hd)) for n in kv_names("new", layers)]
    first = (TensorSpec("hidden_states", "float32", hidden) if part == "target_segment" and layers.start > 0
             else TensorSpec("input_ids", "int64", (1, SEQ)))
    common = [TensorSpec("position_ids", "int64", (1, SEQ)),
              TensorSpec("attention_mask", "float32", (1, 1, SEQ, f"{PAST}+{SEQ}"))]
    if part == "target_segment":
        return [first, *common, *kv_in], [TensorSpec("hidden_out", "float32", hidden), *kv_out]
    m = draft_top_m(shape)
    heads = [TensorSpec("logits", "float32", (1, ROWS, shape.vocab_size)),
             TensorSpec("top_ids", "int64", (1, ROWS, m)), TensorSpec("top_probs", "float32", (1, ROWS, m))]
    rows = TensorSpec("output_rows", "int64", (ROWS,))
    return [first, *common, rows, *kv_in], [*heads, *kv_out]


def dynamic_axes(specs) -> dict[str, dict[int, str]]:
    """torch.onnx dynamic_axes for the named axes; `past+seq` is named `total`."""
    axes = {}
    for spec in specs:
        named = {i: ("total" if "+" in d else d) for i, d in enumerate(spec.shape) if isinstance(d, str)}
        if named:
            axes[spec.name] = named
    return axes

