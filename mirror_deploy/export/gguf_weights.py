"""GGUF quantized tensors as ONNX Runtime `MatMulNBits` weights, kept exactly, never made dense.

Every supported GGUF type is, per block of 16 or 32 weights along the input axis,
`w = scale · (q − center) + offset`, with integer codes q, the kernel's implicit center (8 for 4 bits,
128 for 8 bits) and an offset that only the types with a minimum have (Q4_1, Q5_1, Q4_K, Q5_K):

| GGUF | bits | block | codes | scale | offset |
|---|---|---|---|---|---|
| Q4_0 | 4 | 32 | q | d | – |
| Q4_1 | 4 | 32 | q | d | 8·d + m |
| Q5_0 | 8 | 32 | q + 112 | d | – |
| Q5_1 | 8 | 32 | q + 128 | d | m |
| Q8_0 | 8 | 32 | q + 128 | d | – |
| Q4_K | 4 | 32 | q | d·sc | 8·d·sc − dmin·m |
| Q5_K | 8 | 32 | q + 128 | d·sc | − dmin·m |
| Q6_K | 8 | 16 | q + 96 | d·sc | – |

`MatMulNBits` takes the codes and scales as they are. Its float zero point could carry the offset, but
ONNX Runtime 1.23 runs that through a slow generic kernel (measured 160× the symmetric one), so the offset
is added outside it, per block: `y += blocksum(x) @ offsetᵀ`, an fp32 MatMul 1/32 the size of the
weight. Both kernels give a row the same result whatever the number of rows in the call (blocks of 16
and 32 at accuracy level 4), which keeps verify windows exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MirrorDeployError

QK_K = 256  # weights per K-quant super-block


@dataclass
class MappedWeight:
    """One `[N, K]` weight (N outputs, K inputs) as MatMulNBits blocks, scales and optional offsets."""
    gguf_type: str
    bits: int
    block: int
    packed: np.ndarray          # MatMulNBits' B: uint8 [N, K/block, block·bits/8], low nibble first
    scales: np.ndarray          # float32 [N, K // block]
    offsets: np.ndarray | None  # float32 [N, K // block], or None

    @classmethod
    def from_codes(cls, gguf_type: str, bits: int, block: int, codes: np.ndarray, scales, offsets) -> "MappedWeight":
        """`codes`: uint8 [N, K], one per weight (packed here, so a model holds 4-bit codes at half a byte)."""
        n, k = codes.shape
        q = codes.reshape(n, k // block, block)
        packed = q if bits == 8 else (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
        return cls(gguf_type, bits, block, np.ascontiguousarray(packed), scales, offsets)

    @property
    def shape(self) -> tuple[int, int]:
        n, blocks, _ = self.packed.shape
        return n, blocks * self.block

    @property
    def center(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def codes(self) -> np.ndarray:
        """uint8 [N, K], one code per weight."""
        n, k = self.shape
        return unpack(self.packed, self.bits).reshape(n, k)

    def dequantize(self) -> np.ndarray:
        """float32 `[N, K]`, computed the way the graph does: scale · (q − center) + offset."""
        return GgufBlocks(self.gguf_type, self.bits, self.block, self.codes, self.center, self.scales,
                          self.offsets).dequantize()

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + (0 if self.offsets is None else self.offsets.nbytes)

    def rows(self, order: np.ndarray) -> "MappedWeight":
        """The same weight with its rows (outputs) reordered: blocks run along the input axis, so packed
        codes, scales and offsets move together."""
        pick = lambda a: None if a is None else np.ascontiguousarray(a[order])  # noqa: E731
        return MappedWeight(self.gguf_type, self.bits, self.block, pick(self.packed), pick(self.scales),
                            pick(self.offsets))


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """One code per weight from codes packed along the last axis (4 bits: two a byte, low nibble first)."""
    if bits == 8:
        return packed
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


@dataclass
class GgufBlocks:
    """A tensor's blocks in gguf-py's own form, w = scale · (q − center) + offset per block, computed in
    that order so that `dequantize` (and a graph doing the same float ops) equals gguf-py's bit for bit.
    The token table is gathered in this form; projections go to MatMulNBits through `for_matmul`."""
    gguf_type: str
    bits: int                   # 4, or 8 for the 5-, 6- and 8-bit types
    block: int
    codes: np.ndarray           # uint8 [N, K], one code per weight
    center: int
    scales: np.ndarray          # float32 [N, K // block]
    offsets: np.ndarray | None  # float32 [N, K // block], or None

    def dequantize(self) -> np.ndarray:
        n, k = self.codes.shape
        q = self.codes.reshape(n, k // self.block, self.block).astype(np.float32) - np.float32(self.center)
        w = q * self.scales[..., None]
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(n, k)

    @property
    def nbytes(self) -> int:
        """Bytes as stored: packed codes, scales and offsets."""
        return self.packed.nbytes + self.scales.nbytes + (0 if self.offsets is None else self.offsets.nbytes)

    @property
    def packed(self) -> np.ndarray:
        """uint8 [N, K·bits/8]: 4-bit codes two to a byte, low nibble first."""
        if self.bits == 8:
            return self.codes
        return (self.codes[:, 0::2] | (self.codes[:, 1::2] << 4)).astype(np.uint8)

    def for_matmul(self) -> MappedWeight:
        """MatMulNBits' form: codes around the kernel's implicit center (8 or 128). A 4-bit type whose
        center is not 8 (Q4_1, Q4_K) keeps its codes, and the shift moves into the offset."""
        kernel_center = 1 << (self.bits - 1)
        codes, offsets = self.codes, self.offsets
        if self.bits == 4 and self.center != kernel_center:
            shift = self.scales * np.float32(kernel_center - self.center)
            offsets = shift if offsets is None else shift + offsets
        elif self.center != kernel_center:
            codes = (codes.astype(np.int16) + (kernel_center - self.center)).astype(np.uint8)
        return MappedWeight.from_codes(self.gguf_type, self.bits, self.block, codes, self.scales, offsets)


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """ggml packs 2·`group` codes in `group` bytes: low nibbles first, then the high nibbles of the same bytes."""
    lo, hi = qs & 0x0F, qs >> 4
    n = qs.shape[0]
    return np.stack([lo.reshape(n, -1, group), hi.reshape(n, -1, group)], axis=2).reshape(n, -1)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit (scale, min) pairs of a Q4_K/Q5_K super-block (ggml's get_scale_min_k4)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


# Each mapper reads `[blocks, bytes]` into gguf-py's own form, w = scale · (q − center) + offset:
# (bits of storage, block, codes q, center, scale, offset or None); `GgufBlocks` keeps it.
def _q4_0(b):
    d, q = _f16(b[:, 0:2]), _nibbles(b[:, 2:18], 16)
    return 4, 32, q, 8, d[:, None], None


def _q4_1(b):
    d, m, q = _f16(b[:, 0:2]), _f16(b[:, 2:4]), _nibbles(b[:, 4:20], 16)
    return 4, 32, q, 0, d[:, None], m[:, None]


def _high_bits(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(qh, axis=-1, bitorder="little")  # bit j of the 32-bit field = code j's 5th bit


def _q5_0(b):
    d, hi, lo = _f16(b[:, 0:2]), _high_bits(b[:, 2:6]), _nibbles(b[:, 6:22], 16)
    return 8, 32, lo | (hi << 4), 16, d[:, None], None


def _q5_1(b):
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    hi, lo = _high_bits(b[:, 4:8]), _nibbles(b[:, 8:24], 16)
    return 8, 32, lo | (hi << 4), 0, d[:, None], m[:, None]


def _q8_0(b):
    d = _f16(b[:, 0:2])
    return 8, 32, b[:, 2:34] ^ np.uint8(0x80), 128, d[:, None], None  # int8 + 128, as uint8


def _q4_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    return 4, 32, _nibbles(b[:, 16:144], 32), 0, d[:, None] * sc, -(dmin[:, None] * mn)


def _q5_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    qh, lo = b[:, 16:48], _nibbles(b[:, 48:176], 32)
    n = b.shape[0]
    # Code j of sub-block s takes bit s of qh[j].
    hi = ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).reshape(n, QK_K)
    return 8, 32, lo | (hi << 4), 0, d[:, None] * sc, -(dmin[:, None] * mn)


def _q6_k(b):
    ql, qh, sc, d = b[:, 0:128], b[:, 128:192], b[:, 192:208].view(np.int8), _f16(b[:, 208:210])
    n = b.shape[0]
    lo = _nibbles(ql, 64)  # per 128-weight half: low nibbles of its 64 bytes, then their high nibbles
    hi = ((qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]) & 3).reshape(n, QK_K)
    return 8, 16, lo | (hi << 4), 32, d[:, None] * sc.astype(np.float32), None


# GGUF type -> (weights a block, bytes a block, mapper of `[blocks, bytes]` to gguf-py's form)
MAPPERS = {
    "Q4_0": (32, 18, _q4_0), "Q4_1": (32, 20, _q4_1), "Q5_0": (32, 22, _q5_0), "Q5_1": (32, 24, _q5_1),
    "Q8_0": (32, 34, _q8_0), "Q4_K": (QK_K, 144, _q4_k), "Q5_K": (QK_K, 176, _q5_k), "Q6_K": (QK_K, 210, _q6_k),
}
DENSE = ("F32", "F16", "BF16")


def unsupported(gguf_type: str, name: str) -> MirrorDeployError:
    return MirrorDeployError(
        f"GGUF tensor {name} is {gguf_type}, which has no exact MatMulNBits mapping here (mapped: "
        f"{', '.join(MAPPERS)}; dense: {', '.join(DENSE)})",
        "re-quantize the file to Q4_K_M / Q4_0 / Q8_0 with llama-quantize, or export the Hugging Face "
        "checkpoint with --target-weights int4")


def read_blocks(raw: np.ndarray, gguf_type: str, shape: tuple[int, int], name: str = "?") -> GgufBlocks:
    """`raw`: the tensor's bytes as GGUFReader gives them (uint8, one row of blocks per output);
    `shape`: (N, K)."""
    if gguf_type not in MAPPERS:
        raise unsupported(gguf_type, name)
    per_block, nbytes, mapper = MAPPERS[gguf_type]
    n, k = shape
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n * k // per_block, nbytes)
    bits, block, codes, center, scales, offsets = mapper(blocks)
    scales = np.asarray(scales, np.float32).reshape(n, k // block)
    if offsets is not None:
        offsets = np.asarray(offsets, np.float32).reshape(n, k // block)
    return GgufBlocks(gguf_type, bits, block, codes.astype(np.uint8).reshape(n, k), center, scales, offsets)


def map_weight(raw: np.ndarray, gguf_type: str, shape: tuple[int, int], name: str = "?") -> MappedWeight:
    """A projection's blocks as MatMulNBits takes them (see `read_blocks`)."""
    return read_blocks(raw, gguf_type, shape, name).for_matmul()
