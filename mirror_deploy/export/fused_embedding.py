"""The token table of a fused first segment: a GGUF table kept in its blocks, exact fp32 rows, or int8 rows.
Written into the segment's graph being built (fused_target._Graph)."""
from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto


EMBED_BLOCK = 32   # int8 embedding rows: one scale per 32 values (as GGUF's Q8_0)


def quantize_rows_int8(weight: torch.Tensor, block: int = EMBED_BLOCK, chunk: int = 8192):
    """Symmetric int8 per `block` values of each row, as GatherBlockQuantized reads it (uint8, zero point
    128): (data [V, H] uint8, scales [V, H / block] fp32). In row chunks, so no second fp32 table is held."""
    rows, width = weight.shape
    data = np.empty((rows, width), np.uint8)
    scales = np.empty((rows, width // block), np.float32)
    for at in range(0, rows, chunk):
        blocks = weight[at:at + chunk].detach().to(torch.float32).numpy().reshape(-1, width // block, block)
        scale = np.abs(blocks).max(axis=-1) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(blocks / scale[..., None]), -127, 127) + 128
        data[at:at + chunk] = q.reshape(-1, width).astype(np.uint8)
        scales[at:at + chunk] = scale
    return data, scales


def _gguf_table(g, blocks) -> str:
    """A GGUF token table kept in its blocks: gather each token's codes, scales and offsets, then
    (q − center) · scale + offset in fp32, the float ops of gguf-py's dequantization in its order, so the
    rows equal the fp32 table's bit for bit (`check` compares them; tests/test_gguf.py runs the graph)."""
    n, width = blocks.codes.shape
    const = lambda name, value: g.weight(f"embed_tokens.{name}", np.asarray(value))  # noqa: E731
    last = const("last_axis", np.int64([-1]))
    codes = g.one("Gather", [const(f"codes{blocks.bits}", blocks.packed), "input_ids"], "embed_tokens/GatherCodes")
    if blocks.bits == 4:   # two codes a byte, low nibble first
        lo = g.one("BitwiseAnd", [codes, const("low_mask", np.uint8(0x0F))], "embed_tokens/Low")
        hi = g.one("BitShift", [codes, const("high_shift", np.uint8(4))], "embed_tokens/High", direction="RIGHT")
        pair = [g.one("Unsqueeze", [x, last], f"embed_tokens/Unsqueeze{i}")
                for i, x in enumerate((lo, hi))]
        codes = g.one("Concat", pair, "embed_tokens/Interleave", axis=-1)
    q = g.one("Cast", [codes], "embed_tokens/Cast", to=TensorProto.FLOAT)
    q = g.one("Reshape", [q, const("block_shape", np.int64([0, 0, width // blocks.block, blocks.block]))],
              "embed_tokens/Blocks")
    if blocks.center:
        q = g.one("Sub", [q, const("center", np.float32(blocks.center))], "embed_tokens/Center")

    def per_block(name: str, values: np.ndarray) -> str:
        rows = g.one("Gather", [const(name, values), "input_ids"], f"embed_tokens/Gather_{name}")
        return g.one("Unsqueeze", [rows, last], f"embed_tokens/Unsqueeze_{name}")
    w = g.one("Mul", [q, per_block("scales", blocks.scales)], "embed_tokens/Scale")
    if blocks.offsets is not None:
        w = g.one("Add", [w, per_block("offsets", blocks.offsets)], "embed_tokens/Offset")
    return g.one("Reshape", [w, const("row_shape", np.int64([0, 0, width]))], "embed_tokens/Rows")


def embedding(g, module, quantized: bool) -> str:
    """The token lookup: a GGUF table in its own blocks, exact fp32 rows, or int8 rows (a quarter of the
    bytes; one row per token read, so a window and a step still see the same values)."""
    if hasattr(module, "blocks"):
        return _gguf_table(g, module.blocks)
    weight = module.weight
    if not quantized or weight.shape[1] % EMBED_BLOCK:
        return g.one("Gather", [g.weight("embed_tokens.weight", weight), "input_ids"], "embed_tokens/Gather")
    data, scales = quantize_rows_int8(weight)
    return g.one("GatherBlockQuantized", [g.weight("embed_tokens.qweight", data), "input_ids",
                                          g.weight("embed_tokens.scales", scales)], "embed_tokens/GatherBlockQuantized",
                 domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=EMBED_BLOCK, bits=8)
