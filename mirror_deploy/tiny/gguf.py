"""Tiny random GGUF models (qwen2) in the quantization types of real files, for tests of the GGUF route.

Blocks are random bytes with their scales set so the dequantized weights have a chosen spread and about
zero mean: any bytes are a valid block, and what is tested is that the graph computes with exactly the
weights gguf-py's own dequantization gives.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# Per projection, a type of each kind that Q4_K_M and Q4_1 files hold (the draft's Q5_0/Q8_0 too).
MIXED_TYPES = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q5_0", "ffn_gate": "Q4_K",
               "ffn_up": "Q5_K", "ffn_down": "Q6_K", "output": "Q8_0", "token_embd": "Q4_K"}
ALTERNATE_TYPES = {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q5_1", "attn_output": "Q8_0", "ffn_gate": "Q4_1",
                   "ffn_up": "Q4_0", "ffn_down": "Q5_0", "output": "Q6_K", "token_embd": "Q8_0"}


def _fp16_field(rng, n: int, value: float) -> np.ndarray:
    return np.full((n, 1), value, np.float16).view(np.uint8).reshape(n, 2)


def random_blocks(rng, gguf_type: str, rows: int, cols: int, spread: float) -> np.ndarray:
    """Raw blocks `[rows, bytes a row]` of `gguf_type` whose weights have about `spread` std, zero mean."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
    qtype = GGMLQuantizationType[gguf_type]
    per, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // per, size), dtype=np.uint8)
    # d (and the min's scale) first for every type but Q6_K, whose d is last. The min's scale is set so
    # the min cancels the codes' mean: Q4_1/Q5_1 add m (so m = -mean·d), the K types subtract dmin·m.
    mean_code = {"Q4_1": 7.5, "Q5_1": 15.5, "Q4_K": 7.5, "Q5_K": 15.5}.get(gguf_type)
    d_at = slice(208, 210) if gguf_type == "Q6_K" else slice(0, 2)
    blocks[:, d_at] = _fp16_field(rng, len(blocks), 1.0)
    if mean_code is not None:
        blocks[:, 2:4] = _fp16_field(rng, len(blocks), -mean_code if gguf_type.endswith("_1") else mean_code)
    weights = quants.dequantize(blocks.reshape(rows, -1), qtype)
    factor = spread / max(float(weights.std()), 1e-6)
    blocks[:, d_at] = (blocks[:, d_at].copy().view(np.float16) * factor).astype(np.float16).view(np.uint8)
    if mean_code is not None:
        blocks[:, 2:4] = (blocks[:, 2:4].copy().view(np.float16) * factor).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def write_tiny_gguf(path: Path, types: dict[str, str] = MIXED_TYPES, layers: int = 2, hidden: int = 256,
                    ffn: int = 512, vocab: int = 128, heads: int = 4, kv_heads: int = 2, seed: int = 0,
                    context: int = 4096, token_prefix: str = "t") -> Path:
    """A qwen2 GGUF (tied head unless `types` names "output") of random blocks of the given types."""
    import gguf
    rng = np.random.default_rng(seed)
    hd = hidden // heads
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<{token_prefix}{i}>" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_token_merges([])
    w.add_eos_token_id(1)
    w.add_bos_token_id(1)

    def quant(name, rows, cols, spread):
        kind = types[name.split(".")[-2] if name.startswith("blk") else name.split(".")[0]]
        w.add_tensor(name, random_blocks(rng, kind, rows, cols, spread),
                     raw_dtype=gguf.GGMLQuantizationType[kind])

    def dense(name, array):
        w.add_tensor(name, np.ascontiguousarray(array, np.float32))

    quant("token_embd.weight", vocab, hidden, 1.0)
    for i in range(layers):
        b = f"blk.{i}"
        dense(f"{b}.attn_norm.weight", 1 + 0.1 * rng.standard_normal(hidden))
        dense(f"{b}.ffn_norm.weight", 1 + 0.1 * rng.standard_normal(hidden))
        for proj, rows in (("attn_q", hidden), ("attn_k", kv_heads * hd), ("attn_v", kv_heads * hd)):
            quant(f"{b}.{proj}.weight", rows, hidden, 3.0 / hidden ** 0.5)
            dense(f"{b}.{proj}.bias", 0.1 * rng.standard_normal(rows))
        quant(f"{b}.attn_output.weight", hidden, hidden, 3.0 / hidden ** 0.5)
        quant(f"{b}.ffn_gate.weight", ffn, hidden, 3.0 / hidden ** 0.5)
        quant(f"{b}.ffn_up.weight", ffn, hidden, 3.0 / hidden ** 0.5)
        quant(f"{b}.ffn_down.weight", hidden, ffn, 3.0 / ffn ** 0.5)
    dense("output_norm.weight", np.ones(hidden))
    if "output" in types:
        quant("output.weight", vocab, hidden, 3.0 / hidden ** 0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
