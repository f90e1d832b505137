"""What the learned exit trains on: hidden states at the exit boundaries and the final distribution.

hidden_states[L] from HF (`output_hidden_states`) is the output of layer L-1, i.e. the input of the
target's suffix when the early exit sits at boundary L: exactly what the exported prefix hands over.
Only the final distribution's top-k (ids + log-probs) is kept: the full one is 151,936 floats a token.

Rows are the continuation positions (what the exit sees while decoding, and what held-out figures are
measured on) plus, for training only, the prompt positions after the preamble every prompt shares (the
chat template's system turn would otherwise be the same rows many times): more rows for the cost of
the same forward pass (on the real 1.5B target, layer 18, they took the held-out top-8 hit from 58.7% to
60.9% in an A/B on one calibration set).
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MirrorDeployError
from ..export.architectures import arch_for
from ..models import cache_dir
from .calibration import CalibrationSequence, model_fingerprint


class FrozenHead(torch.nn.Module):
    """The target's own final norm + LM head, frozen, detached from the rest of the model (so the
    decoder's weights can be freed once features are collected)."""

    def __init__(self, norm: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.norm = copy.deepcopy(norm).float().requires_grad_(False)
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def of(cls, model) -> FrozenHead:
        head = model.get_output_embeddings()
        return cls(arch_for(model.config.model_type).final_norm_of(model), head.weight, head.bias)

    def support_logits(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits of `ids` [rows, k] only: a gather of k head rows per token instead of the whole vocabulary."""
        return self.logits_of_normed(self.norm(hidden), ids)

    def logits_of_normed(self, normed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same from the head's input (the final norm already applied)."""
        logits = torch.einsum("rd,rkd->rk", normed, self.weight[ids])
        return logits if self.bias is None else logits + self.bias[ids]

    @torch.no_grad()
    def topk(self, hidden: torch.Tensor, k: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-vocabulary top-k (ids, log-probs), `chunk` rows at a time to bound memory."""
        ids, values = [], []
        for rows in hidden.split(chunk):
            logits = torch.nn.functional.linear(self.norm(rows), self.weight, self.bias)
            top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
            ids.append(top.indices)
            values.append(top.values)
        return torch.cat(ids), torch.cat(values)


@dataclass
class Features:
    """One row per training position of the calibration sequences."""
    hidden: dict[int, np.ndarray]   # boundary -> [rows, d] float32
    final_ids: np.ndarray           # [rows, k] int64: the final distribution's top-k ...
    final_logprobs: np.ndarray      # [rows, k] float32: ... and their log-probs (full softmax)
    sequence: np.ndarray            # [rows] int: which calibration sequence a row comes from
    category: list[str]             # per sequence
    continuation: np.ndarray        # [rows] bool: a continuation position (else a prompt position)
    head_input: np.ndarray          # [rows, d] float32: what the LM head reads (final norm applied), so
                                    # the final logit of any token can be computed again in training

    @property
    def rows(self) -> int:
        return len(self.sequence)

    def select(self, mask: np.ndarray) -> Features:
        return Features({b: h[mask] for b, h in self.hidden.items()}, self.final_ids[mask],
                        self.final_logprobs[mask], self.sequence[mask], self.category, self.continuation[mask],
                        self.head_input[mask])

    def continuation_rows(self) -> Features:
        return self.select(self.continuation)


def check_boundaries(boundaries: list[int], layers: int) -> list[int]:
    bad = [b for b in boundaries if not 1 <= b <= layers - 1]
    if not boundaries or bad:
        raise MirrorDeployError(f"exit boundaries {bad or boundaries} are outside [1, {layers - 1}] for a "
                                f"{layers}-layer target", f"give boundaries between 1 and {layers - 1}")
    return sorted(set(boundaries))


def shared_preamble(sequences: list[CalibrationSequence]) -> int:
    """Length of the prompt prefix every sequence shares (0 for a single sequence: nothing repeats)."""
    if len(sequences) < 2:
        return 0
    prompts = [s.ids[:s.prompt_len] for s in sequences]
    n = 0
    while all(len(p) > n for p in prompts) and len({p[n] for p in prompts}) == 1:
        n += 1
    return n


@torch.no_grad()
def collect_features(model, sequences: list[CalibrationSequence], boundaries: list[int],
                     support: int = 32) -> Features:
    """Teacher-forced fp32 forwards, one sequence at a time (no padding, so positions are exact)."""
    boundaries = check_boundaries(boundaries, model.config.num_hidden_layers)
    hidden = {b: [] for b in boundaries}
    ids, logprobs, owner, continuation, head_input = [], [], [], [], []
    first = max(shared_preamble(sequences), 1)
    captured = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, args, _o: captured.append(args[0]))
    for n, seq in enumerate(sequences):
        if not len(seq.continuation_positions):
            continue
        prompt_rows = list(range(first, seq.prompt_len - 1))
        rows = torch.tensor(prompt_rows + list(seq.continuation_positions))
        # logits_to_keep: the head only on the rows used (it is ~15-30% of a small model's compute)
        captured.clear()
        out = model(torch.tensor([seq.ids]), output_hidden_states=True, use_cache=False, logits_to_keep=rows)
        head_input.append(captured[-1][0].float().numpy())
        for b in boundaries:
            hidden[b].append(out.hidden_states[b][0, rows].float().numpy())
        top = torch.log_softmax(out.logits[0].float(), dim=-1).topk(support, dim=-1)
        ids.append(top.indices.numpy())
        logprobs.append(top.values.numpy())
        owner.append(np.full(len(rows), n))
        continuation.append(np.arange(len(rows)) >= len(prompt_rows))
    hook.remove()
    if not owner:
        raise MirrorDeployError("the calibration sequences have no continuation tokens",
                                "ask for at least 1 new token per prompt")
    return Features({b: np.concatenate(h) for b, h in hidden.items()}, np.concatenate(ids),
                    np.concatenate(logprobs), np.concatenate(owner), [s.category for s in sequences],
                    np.concatenate(continuation), np.concatenate(head_input))


def cached_features(model_dir: str | Path, model, sequences: list[CalibrationSequence], boundaries: list[int],
                    support: int = 32, cache: Path | None = None) -> Features:
    """`collect_features`, remembered on disk per (checkpoint, sequences, boundaries, support): retraining
    with other settings then skips the teacher-forced forwards."""
    boundaries = check_boundaries(boundaries, model.config.num_hidden_layers)
    key = hashlib.sha256(json.dumps([model_fingerprint(model_dir), [s.ids for s in sequences], boundaries,
                                     support, "prompt-rows"]).encode()).hexdigest()[:24]
    path = Path(cache or cache_dir()) / "calibration" / f"features-{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return Features({b: data[f"hidden_{b}"] for b in boundaries}, data["final_ids"], data["final_logprobs"],
                            data["sequence"], [s.category for s in sequences], data["continuation"],
                            data["head_input"])
    features = collect_features(model, sequences, boundaries, support)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.stem + ".tmp.npz")
    np.savez(scratch, final_ids=features.final_ids, final_logprobs=features.final_logprobs,
             sequence=features.sequence, continuation=features.continuation,
             head_input=features.head_input, **{f"hidden_{b}": h for b, h in features.hidden.items()})
    scratch.replace(path)
    return features


def split_by_sequence(features: Features, held_out: float, seed: int) -> tuple[Features, Features]:
    """Train / held-out split by whole sequence (tokens of one text are not independent), stratified by
    category so every task is in both halves."""
    rng = np.random.default_rng(seed)
    present = sorted(set(features.sequence.tolist()))
    test = set()
    for category in sorted(set(features.category)):
        members = [s for s in present if features.category[s] == category]
        rng.shuffle(members)
        test.update(members[:max(1, round(held_out * len(members)))] if len(members) > 1 else [])
    mask = np.isin(features.sequence, sorted(test))
    if mask.all() or not mask.any():
        raise MirrorDeployError(f"{len(present)} calibration sequences cannot be split into train and held-out",
                                "use at least two prompts per category")
    return features.select(~mask), features.select(mask)
