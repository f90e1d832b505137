"""Load a source model (checkpoint folder or .gguf file) and describe it for the manifest."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..artifact import sha256_file
from ..errors import MirrorDeployError
from ..tokenizer import load_tokenizer
from .architectures import ArchSpec, arch_for
from .shapes import ModelShape

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def give_back_memory() -> None:
    """Collect, then have glibc return its freed heap to the system: it keeps it otherwise (measured: 0.9
    of the 1.45 GB an export held after freeing the 1.5B target), and the next model's peak stacks on it."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc (macOS, musl): nothing to trim
        pass


@dataclass
class SourceModel:
    path: Path
    config: PretrainedConfig
    arch: ArchSpec
    shape: ModelShape
    model: torch.nn.Module | None = None
    gguf_weights: Path | None = None  # the GGUF whose blocks the graphs keep (`--target-weights gguf`)

    def gguf_args(self) -> tuple[str, dict]:
        if self.path.suffix == ".gguf":
            return str(self.path.parent), {"gguf_file": self.path.name}
        return str(self.path), {}

    def load_model(self) -> torch.nn.Module:
        if self.model is None:
            where, extra = self.gguf_args()
            self.model = AutoModelForCausalLM.from_pretrained(
                where, dtype=torch.float32, attn_implementation="eager", **extra).eval()
        return self.model

    def release(self) -> None:
        """Drop the loaded weights (the exporter frees each model once its graphs are written)."""
        self.model = None
        give_back_memory()

    def load_tokenizer(self):
        where, extra = self.gguf_args()
        try:
            tok = load_tokenizer(where, self.config.model_type, **extra)
        except (OSError, ValueError, TypeError, AttributeError):   # no (usable) tokenizer in the checkpoint;
            return None   # AttributeError: transformers' tiktoken fallback on a folder without one
        if extra:   # transformers' GGUF tokenizer conversion drops special tokens and the file's eos
            from ..models import restore_gguf_tokens
            restore_gguf_tokens(tok, self.path, self.config.eos_token_id)
        return tok

    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids from the config and, where present, generation_config.json."""
        ids = []
        sources = [self.config.eos_token_id]
        gen = self.path / "generation_config.json" if self.path.is_dir() else None
        if gen is not None and gen.is_file():
            sources.append(json.loads(gen.read_text()).get("eos_token_id"))
        for value in sources:
            for i in value if isinstance(value, list) else [value]:
                if isinstance(i, int) and i not in ids:
                    ids.append(i)
        return ids

    def describe(self) -> dict:
        weights = [self.path] if self.path.is_file() else sorted(
            p for p in self.path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        digest = hashlib.sha256()
        for w in weights:
            digest.update(sha256_file(w).encode())
        config = json.dumps(model_defining(self.config.to_dict()), sort_keys=True, default=str)
        return {"path": str(self.path.resolve()), "model_type": self.shape.model_type,
                "eos_token_ids": self.eos_token_ids(),
                "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
                "weights_sha256": digest.hexdigest(), **self.shape.to_dict(), **self._gguf_record()}

    def _gguf_record(self) -> dict:
        if self.gguf_weights is None:
            return {}
        return {"gguf_file": str(self.gguf_weights.resolve()), "gguf_sha256": sha256_file(self.gguf_weights)}


# Keys that say where or with what a config was read or written, not what the model is: `_name_or_path`
# is the path as typed (relative at export, absolute at check), so hashing it failed every relative export.
_PROVENANCE_KEYS = ("transformers_version",)


def model_defining(config: dict) -> dict:
    """The config without provenance: private `_…` keys and the writing library's version."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in _PROVENANCE_KEYS}


def open_source(path: str | Path, role: str) -> SourceModel:
    """Read the config only (fast), so bad input is refused before any weights load."""
    path = Path(path).expanduser()
    fix = "give a Hugging Face checkpoint folder (config.json + weights) or a .gguf file"
    if not path.exists():
        raise MirrorDeployError(f"{role} model path {path} does not exist", fix)
    if path.is_dir() and not (path / "config.json").is_file():
        raise MirrorDeployError(f"{role} model folder {path} has no config.json: not a Hugging Face checkpoint", fix)
    if path.is_file() and path.suffix != ".gguf":
        raise MirrorDeployError(f"{role} model file {path} is not a .gguf file", fix)
    try:
        if path.is_file():
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as err:
        raise MirrorDeployError(f"{role} model at {path} could not be read as a causal LM ({err})", fix) from None
    # Causal first: a saved BertForMaskedLM is better told "not a causal LM" than "unsupported".
    causal = [a for a in (config.architectures or []) if a.endswith("ForCausalLM") or a.endswith("LMHeadModel")]
    if config.architectures and not causal:
        raise MirrorDeployError(f"{role} model at {path} is a {', '.join(config.architectures)}, not a causal LM",
                                "export a text-generation (…ForCausalLM) checkpoint")
    arch = arch_for(config.model_type)
    return SourceModel(path, config, arch, ModelShape.from_config(config))
