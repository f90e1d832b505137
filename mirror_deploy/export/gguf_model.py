"""A target read from a GGUF file with its quantization kept.

The Hugging Face module tree is built on the meta device (no memory), then filled from the file: dense
tensors (norms, biases) become real tensors, every projection becomes a `QuantLinear` holding its GGUF
blocks as a `MappedWeight`, and the token table a `QuantEmbedding` holding its blocks as they are. No
dense copy of a projection or of the table is ever made; the fused segment builder writes projections as
`MatMulNBits` (`fused_target._linear`) and the table as a gather of its blocks (`fused_embedding.embedding`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import MirrorDeployError
from .gguf_weights import DENSE, MAPPERS, GgufBlocks, MappedWeight, map_weight, read_blocks

GGUF_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")  # fused builders and a plain tensor-name map
_PERMUTED_QK = ("llama", "mistral")  # convert_hf_to_gguf permutes q/k rows of these for ggml's rope


class QuantLinear(nn.Module):
    """A projection whose weight stays in its GGUF blocks. It is only ever written to a graph: calling it
    is a bug, so it says so instead of computing with a dense copy."""

    def __init__(self, mapped: MappedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.mapped = mapped
        self.out_features, self.in_features = mapped.shape
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x):
        raise RuntimeError("a GGUF-quantized projection is written to ONNX, never run in PyTorch")


class QuantEmbedding(nn.Module):
    """The token table in its GGUF blocks (a 1.5B's Q4_K table: 167 MiB against 890 MiB at fp32), written
    to the graph as a gather of codes, scales and offsets that dequantizes exactly as gguf-py does."""

    def __init__(self, blocks: GgufBlocks):
        super().__init__()
        self.blocks = blocks
        self.num_embeddings, self.embedding_dim = blocks.codes.shape

    def forward(self, ids):
        raise RuntimeError("a GGUF-quantized token table is written to ONNX, never run in PyTorch")


def published_table(model, arch, folder: Path) -> str | None:
    """Swap a pulled checkpoint's token table for its published GGUF's blocks where they dequantize to it
    bit for bit: the table shrinks to its own 4-8 bits and the model is unchanged (an int8 table of the
    same rows changed greedy output on 4 of 6 SpecBench prompts). Returns a note of what was kept, or None
    (no GGUF on disk, another type, or other values: the caller's table stays). A tied head keeps its own
    reference to the dense weight. Fused segments only: the module can be written, not run."""
    from gguf import GGUFReader

    from ..models import published_gguf_on_disk
    path = published_gguf_on_disk(folder) if Path(folder).is_dir() else None
    if path is None:
        return None
    table = next((t for t in GGUFReader(path).tensors if t.name == "token_embd.weight"), None)
    decoder = arch.decoder_of(model)
    embed = decoder.get_submodule(arch.embed)
    if table is None or table.tensor_type.name not in MAPPERS or not hasattr(embed, "weight"):
        return None
    n, k = (int(d) for d in reversed(table.shape))
    if (n, k) != tuple(embed.weight.shape):
        return None
    blocks = read_blocks(_read(path, table), table.tensor_type.name, (n, k), table.name)
    if not torch.equal(torch.from_numpy(blocks.dequantize()), embed.weight.detach().to(torch.float32)):
        return None
    setattr(decoder, arch.embed, QuantEmbedding(blocks))
    return f"{table.tensor_type.name} blocks of {path.name} ({blocks.nbytes / 2**20:.0f} MB, equal to the checkpoint's table)"


def gguf_file_of(path: Path, role: str) -> Path:
    """The .gguf whose blocks `--{role}-weights gguf` keeps: the path itself, or a pulled model's file."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    from ..models import published_gguf
    found = published_gguf(path) if path.is_dir() else None
    if found is None:
        raise MirrorDeployError(f"--{role}-weights gguf needs a GGUF file, and {path} is a checkpoint folder "
                                "with no GGUF behind it",
                                f"give the .gguf file as the {role}, a model from `mirror-deploy models pull`, or "
                                f"use --{role}-weights int4 to quantize this checkpoint")
    return found


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}   # GGUF value types
_STRING, _ARRAY = 8, 9


def gguf_tokens(path: Path) -> list[bytes] | None:
    """The file's `tokenizer.ggml.tokens` (id -> token), read straight from its header; None without one.
    gguf-py's reader turns every field into arrays first (8 s for a 151,936-token file), and transformers'
    tokenizer conversion takes 26 s: comparing two files' vocabularies needs neither."""
    import mmap
    import struct
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF" or struct.unpack_from("<I", buf, 4)[0] < 2:
            raise MirrorDeployError(f"{path} is not a GGUF file of version 2 or later", "give a llama.cpp .gguf file")
        count, at = struct.unpack_from("<Q", buf, 16)[0], 24

        def string(at: int) -> tuple[bytes, int]:
            n = struct.unpack_from("<Q", buf, at)[0]
            return buf[at + 8:at + 8 + n], at + 8 + n

        def skip(kind: int, at: int) -> int:
            if kind == _STRING:
                return at + 8 + struct.unpack_from("<Q", buf, at)[0]
            if kind == _ARRAY:
                inner, n = struct.unpack_from("<IQ", buf, at)
                at += 12
                if inner in _SCALAR_BYTES:
                    return at + n * _SCALAR_BYTES[inner]
                for _ in range(n):
                    at = skip(inner, at)
                return at
            return at + _SCALAR_BYTES[kind]

        for _ in range(count):
            key, at = string(at)
            kind = struct.unpack_from("<I", buf, at)[0]
            at += 4
            if key == b"tokenizer.ggml.tokens" and kind == _ARRAY:
                inner, n = struct.unpack_from("<IQ", buf, at)
                at += 12
                tokens = []
                for _ in range(n):
                    token, at = string(at)
                    tokens.append(token)
                return tokens
            at = skip(kind, at)
    return None


def _read(path: Path, tensor) -> np.ndarray:
    """The tensor's bytes, read (not mapped): pages of a memory-mapped 1 GB file would stay resident and
    count toward the export's peak memory."""
    with open(path, "rb") as f:
        f.seek(tensor.data_offset)
        raw = np.frombuffer(f.read(tensor.n_bytes), np.uint8)
    return raw if tensor.tensor_type.name not in DENSE else raw.view(np.dtype(tensor.data.dtype))


def _dense(path: Path, tensor) -> torch.Tensor:
    from gguf import quants
    data = _read(path, tensor).reshape(tensor.data.shape)
    if tensor.tensor_type.name not in DENSE:
        data = quants.dequantize(data, tensor.tensor_type)  # the embedding table: gathered, not multiplied
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape))))


def qk_row_order(n: int, heads: int) -> np.ndarray:
    """transformers' reverse of convert_hf_to_gguf's q/k permutation (llama, mistral), as a row order."""
    return np.arange(n).reshape(heads, n // heads // 2, 2).swapaxes(1, 2).reshape(n)


def permuted_heads(model_type: str, projection: str, config) -> int | None:
    """The head count whose q/k rows the GGUF stores permuted, or None when its rows are HF's."""
    if model_type not in _PERMUTED_QK or projection not in ("q_proj", "k_proj"):
        return None
    return config.num_attention_heads if projection == "q_proj" else config.num_key_value_heads


def load_gguf_model(path: Path, config) -> nn.Module:
    """The causal LM of `config` with weights from the GGUF at `path`, projections kept quantized."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    if config.model_type not in GGUF_MODEL_TYPES:
        raise MirrorDeployError(f"GGUF weights are kept for {', '.join(GGUF_MODEL_TYPES)} models, not "
                                f"{config.model_type!r}", "export with --target-weights int4 instead")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    names = get_gguf_hf_weights_map(model)              # gguf name -> HF parameter name
    by_hf = {hf: tensors[g] for g, hf in names.items() if g in tensors}
    if "lm_head.weight" not in by_hf:                   # tied head: the file stores the table once
        by_hf["lm_head.weight"] = tensors["token_embd.weight"]
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name in linears:
        _set_module(model, name, _quant_linear(path, name, by_hf, config))
    for name in [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]:
        table = by_hf.get(f"{name}.weight")
        if table is not None and table.tensor_type.name in MAPPERS:   # unmapped types stay dense (fp32)
            n, k = (int(d) for d in reversed(table.shape))
            _set_module(model, name, QuantEmbedding(read_blocks(_read(path, table), table.tensor_type.name, (n, k),
                                                                table.name)))
    for name, param in list(model.named_parameters()):
        if param.is_meta:
            if name not in by_hf:
                raise MirrorDeployError(f"{path.name} has no tensor for {name}", "give a complete GGUF model file")
            _set_param(model, name, _dense(path, by_hf[name]))
    _rebuild_rotary(model, config)
    return model.eval()


def _quant_linear(path: Path, name: str, by_hf: dict, config) -> QuantLinear:
    tensor = by_hf.get(f"{name}.weight")
    if tensor is None:
        raise MirrorDeployError(f"the GGUF has no weight for {name}", "give a complete GGUF model file")
    n, k = (int(d) for d in reversed(tensor.shape))
    mapped = map_weight(_read(path, tensor), tensor.tensor_type.name, (n, k), tensor.name)
    heads = permuted_heads(config.model_type, name.rsplit(".", 1)[-1], config)
    bias = by_hf.get(f"{name}.bias")
    if heads is not None:
        if bias is not None:
            raise MirrorDeployError(f"{name} has a bias and permuted rows, which no known GGUF model has",
                                    "export with --target-weights int4 instead")
        mapped = mapped.rows(qk_row_order(mapped.shape[0], heads))
    return QuantLinear(mapped, _dense(path, bias) if bias is not None else None)


def _set_module(model, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _set_param(model, name: str, value: torch.Tensor) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, nn.Parameter(value, requires_grad=False))


def _rebuild_rotary(model, config) -> None:
    """The rotary module's inv_freq is computed at construction: build it again off the meta device."""
    decoder = model.model
    if hasattr(decoder, "rotary_emb"):
        decoder.rotary_emb = type(decoder.rotary_emb)(config=config)
    meta = [n for n, b in model.named_buffers() if b.is_meta]
    if meta:
        raise MirrorDeployError(f"buffers {', '.join(meta)} could not be rebuilt for a GGUF model",
                                "export with --target-weights int4 instead")
