"""Weights in the kernel's layout (src/q4.h): 4-bit codes packed 16 columns x 8 inputs per 64 bytes, fp16
scale and minimum per group of a column. `quantize` makes them from float weights (symmetric, as
MatMulNBits' int4: w = s (q - 8)); `dequantize` is the float matrix the kernel multiplies by."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLS, CHUNK = 16, 8


@dataclass
class Q4Weights:
    codes: np.ndarray    # u8, packed
    scales: np.ndarray   # u8: the bytes of fp16 [N/16, K/G, 16]
    mins: np.ndarray     # u8: the bytes of fp16, same shape
    n: int
    k: int
    group: int


def quantize(w: np.ndarray, group: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [N, K] float -> (codes u8 [N, K] in 0..15, scale f16 [N, K/G], min f16 [N, K/G])."""
    n, k = w.shape
    g = w.reshape(n, k // group, group).astype(np.float32)
    scale = (np.abs(g).max(axis=-1) / 7).astype(np.float16)
    safe = np.where(scale == 0, np.float16(1), scale).astype(np.float32)
    q = np.clip(np.rint(g / safe[..., None]), -8, 7).astype(np.int16) + 8
    return q.reshape(n, k).astype(np.uint8), scale, (scale.astype(np.float32) * 8).astype(np.float16)


def pack(codes: np.ndarray, scale: np.ndarray, minimum: np.ndarray, group: int) -> Q4Weights:
    n, k = codes.shape
    if n % COLS or k % group or group % CHUNK:
        raise ValueError(f"the 4-bit kernel needs N % 16 == 0, K % group == 0 and group % 8 == 0 "
                         f"(N={n}, K={k}, group={group})")
    q = codes.reshape(n // COLS, COLS, k // CHUNK, 2, 4)            # k = 8 c + 4 h + i
    q = q.transpose(0, 2, 3, 1, 4)                                   # [cb, c, h, j, i]
    packed = (q[:, :, 0] | (q[:, :, 1] << 4)).astype(np.uint8)       # [cb, c, j, i]
    per_block = lambda a: np.ascontiguousarray(  # noqa: E731
        a.astype(np.float16).reshape(n // COLS, COLS, k // group).transpose(0, 2, 1)).view(np.uint8).ravel()
    return Q4Weights(packed.ravel(), per_block(scale), per_block(minimum), n, k, group)


def unpack(w: Q4Weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of `pack`: (codes u8 [N, K], scale f16 [N, K/G], min f16 [N, K/G])."""
    n, k, g = w.n, w.k, w.group
    packed = w.codes.reshape(n // COLS, k // CHUNK, COLS, 4)                   # [cb, c, j, i]
    q = np.stack([packed & 0x0F, packed >> 4], axis=2)                        # [cb, c, h, j, i]
    codes = q.transpose(0, 3, 1, 2, 4).reshape(n, k)
    per_column = lambda a: a.view(np.float16).reshape(n // COLS, k // g, COLS).transpose(0, 2, 1).reshape(n, k // g)  # noqa: E731
    return codes.astype(np.uint8), per_column(w.scales), per_column(w.mins)


def dequantize(codes: np.ndarray, scale: np.ndarray, minimum: np.ndarray, group: int) -> np.ndarray:
    n, k = codes.shape
    q = codes.reshape(n, k // group, group).astype(np.float32)
    return (q * scale.astype(np.float32)[..., None] - minimum.astype(np.float32)[..., None]).reshape(n, k)


def from_gguf(run: list) -> Q4Weights:
    """4-bit GGUF blocks (`export.gguf_weights.MappedWeight`, w = s·(q − 8) + o per block of 32) stacked along N,
    in this layout with their own codes: scale s, minimum 8·s − o, each rounded to fp16 (Q4_K's scale d·sc has
    up to 17 significant bits: about 2⁻¹² of a weight's scale; Q4_0's is exact)."""
    codes = np.concatenate([w.codes for w in run])
    scale = np.concatenate([w.scales for w in run])
    offsets = [w.offsets if w.offsets is not None else np.zeros_like(w.scales) for w in run]
    minimum = 8 * scale - np.concatenate(offsets)
    return pack(codes, scale, minimum, run[0].block)
