"""Calibration text for the learned early exit: prompts plus the target's own greedy continuations.

The exit is trained to predict the target's final distribution on the text the target itself writes, so
each calibration sequence is a prompt (in the chat template when the tokenizer has one) followed by the
model's greedy continuation. The shipped prompt set covers the task mix of speculative-decoding benchmarks
(chat, code, translation, summarization, QA, math) without using any benchmark's text.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from transformers import GenerationConfig

from ..errors import MirrorDeployError
from ..models import cache_dir

CATEGORIES = ("chat", "code", "translation", "summarization", "qa", "math")
PACKAGED_PROMPTS = "calibration_prompts.jsonl"
_FORMAT_FIX = ('write one JSON object a line: {"category": "<one of ' + ", ".join(CATEGORIES)
               + '>", "prompt": "<text>"}')


@dataclass(frozen=True)
class CalibrationPrompt:
    category: str
    text: str


def prompt_sha256(text: str) -> str:
    """How a calibration prompt is named across files (the learned exit's training set, tune's pick)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CalibrationSequence:
    """Prompt ids followed by the model's greedy continuation; positions >= prompt_len - 1 predict
    continuation tokens, which is what the early exit sees while decoding."""
    category: str
    ids: tuple[int, ...]
    prompt_len: int

    @property
    def continuation_positions(self) -> range:
        return range(self.prompt_len - 1, len(self.ids) - 1)


def load_prompts(path: str | Path | None = None) -> list[CalibrationPrompt]:
    """The shipped prompt set, or a user's JSONL file in the same format."""
    if path is None:
        text = resources.files(__package__).joinpath(PACKAGED_PROMPTS).read_text(encoding="utf-8")
        where = f"packaged {PACKAGED_PROMPTS}"
    else:
        path = Path(path).expanduser()
        if not path.is_file():
            raise MirrorDeployError(f"calibration file {path} does not exist",
                                    "give the path of a JSONL prompt file, or leave it out to use the shipped set")
        text, where = path.read_text(encoding="utf-8"), str(path)
    prompts = [_parse_line(line, where, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not prompts:
        raise MirrorDeployError(f"calibration file {where} holds no prompts", _FORMAT_FIX)
    return prompts


def _parse_line(line: str, where: str, n: int) -> CalibrationPrompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise MirrorDeployError(f"{where} line {n} is not JSON ({err.msg})", _FORMAT_FIX) from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise MirrorDeployError(f"{where} line {n} has no non-empty \"prompt\" string", _FORMAT_FIX)
    if row.get("category") not in CATEGORIES:
        raise MirrorDeployError(f"{where} line {n} has category {row.get('category')!r}", _FORMAT_FIX)
    return CalibrationPrompt(row["category"], row["prompt"])


def prompt_ids(tokenizer, prompt: CalibrationPrompt) -> list[int]:
    """The ids a user turn becomes: the chat template with the assistant turn opened, when there is one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}],
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tokenizer(prompt.text)["input_ids"])


def model_capacity(model) -> int:
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)


def encode_prompts(tokenizer, prompts: list[CalibrationPrompt], new_tokens: int, capacity: int) -> list[list[int]]:
    """Prompt ids, refusing any prompt whose sequence (prompt + continuation) would not fit `capacity`."""
    if new_tokens < 1:
        raise MirrorDeployError(f"calibration continuation length {new_tokens} is not positive",
                                "ask for at least 1 new token per prompt")
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    for n, (prompt, ids) in enumerate(zip(prompts, encoded), 1):
        if len(ids) + new_tokens > capacity:
            raise MirrorDeployError(
                f"calibration prompt {n} ({prompt.category}) is {len(ids)} tokens; with {new_tokens} new tokens it is "
                f"longer than the capacity of {capacity} tokens",
                "shorten or drop that prompt, or ask for fewer new tokens")
    return encoded


def eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for source in (model.config.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        ids |= set(source if isinstance(source, list) else [source])
    return {i for i in ids if isinstance(i, int)}


@torch.no_grad()
def generate_sequences(model, tokenizer, prompts: list[CalibrationPrompt], new_tokens: int,
                       capacity: int | None = None, batch_size: int = 16) -> list[CalibrationSequence]:
    """Greedy continuations in fp32, batched with left padding (one weight pass serves a batch).
    Plain greedy: no repetition penalty or other processor from the model's generation config."""
    capacity = model_capacity(model) if capacity is None else capacity
    encoded = encode_prompts(tokenizer, prompts, new_tokens, capacity)
    stop = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop, default=0)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                              pad_token_id=pad, eos_token_id=sorted(stop) or None)
    sequences = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch])
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for prompt, b, row in zip(prompts[start:], batch, out[:, width:].tolist()):
            sequences.append(CalibrationSequence(prompt.category, tuple(b + _until_eos(row, stop)), len(b)))
    return sequences


def _until_eos(tokens: list[int], stop: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i + 1]
    return tokens


def model_fingerprint(model_dir: str | Path) -> str:
    """Cheap identity of a checkpoint folder: its config and the names, sizes and times of its files."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for f in sorted(p for p in model_dir.iterdir() if p.is_file()):
        stat = f.stat()
        digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cached_sequences(model_dir: str | Path, model, tokenizer, prompts: list[CalibrationPrompt], new_tokens: int,
                     capacity: int | None = None, cache: Path | None = None) -> list[CalibrationSequence]:
    """`generate_sequences`, remembered on disk per (checkpoint, prompts, length): generation is the
    slow part of calibration on a CPU, and its result only depends on those. `model` may be a function
    that loads it, called only when the sequences are not cached."""
    key = hashlib.sha256(json.dumps([model_fingerprint(model_dir), [asdict(p) for p in prompts], new_tokens,
                                     capacity]).encode()).hexdigest()[:24]
    path = Path(cache or cache_dir()) / "calibration" / f"{key}.json"
    if path.is_file():
        return [CalibrationSequence(r["category"], tuple(r["ids"]), r["prompt_len"])
                for r in json.loads(path.read_text())]
    if not isinstance(model, torch.nn.Module):
        model = model()
    sequences = generate_sequences(model, tokenizer, prompts, new_tokens, capacity)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps([{**asdict(s), "ids": list(s.ids)} for s in sequences]))
    scratch.replace(path)  # written whole, then renamed: a killed run leaves no half entry
    return sequences
