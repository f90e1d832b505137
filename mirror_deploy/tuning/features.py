"""What the learned exit trains on: hidden states at the exit boundaries and the final distribution.

hidden_states[L] from HF (`output_hidden_states`) is the output of layer L-1, i.e. the input of the
target's suffix when the early exit sits at boundary L: exactly what the exported prefix hands over.
Only the final distribution's top-k (ids + log-probs) is kept: the full one is 151,936 floats a token.
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
        logits = torch.einsum("rd,rkd->rk", self.norm(hidden), self.weight[ids])
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
    """One row per continuation position of the calibration sequences."""
    hidden: dict[int, np.ndarray]   # boundary -> [rows, d] float32
    final_ids: np.ndarray           # [rows, k] int64: the final distribution's top-k ...
    final_logprobs: np.ndarray      # [rows, k] float32: ... and their log-probs (full softmax)
    sequence: np.ndarray            # [rows] int: which calibration sequence a row comes from
    category: list[str]             # per sequence

    @property
    def rows(self) -> int:
        return len(self.sequence)

    def select(self, mask: np.ndarray) -> Features:
        return Features({b: h[mask] for b, h in self.hidden.items()}, self.final_ids[mask],
                        self.final_logprobs[mask], self.sequence[mask], self.category)


def check_boundaries(boundaries: list[int], layers: int) -> list[int]:
    bad = [b for b in boundaries if not 1 <= b <= layers - 1]
    if not boundaries or bad:
        raise MirrorDeployError(f"exit boundaries {bad or boundaries} are outside [1, {layers - 1}] for a "
                                f"{layers}-layer target", f"give boundaries between 1 and {layers - 1}")
    return sorted(set(boundaries))


@torch.no_grad()
def collect_features(model, sequences: list[CalibrationSequence], boundaries: list[int],
                     support: int = 32) -> Features:
    """Teacher-forced fp32 forwards, one sequence at a time (no padding, so positions are exact)."""
    boundaries = check_boundaries(boundaries, model.config.num_hidden_layers)
    hidden = {b: [] for b in boundaries}
    ids, logprobs, owner = [], [], []
    for n, seq in enumerate(sequences):
        rows = torch.tensor(list(seq.continuation_positions))
        if not len(rows):
            continue
        # logits_to_keep: the head only on the rows used (it is ~15-30% of a small model's compute)
        out = model(torch.tensor([seq.ids]), output_hidden_states=True, use_cache=False, logits_to_keep=rows)
        for b in boundaries:
            hidden[b].append(out.hidden_states[b][0, rows].float().numpy())
        top = torch.log_softmax(out.logits[0].float(), dim=-1).topk(support, dim=-1)
        ids.append(top.indices.numpy())
        logprobs.append(top.values.numpy())
        owner.append(np.full(len(rows), n))
    if not owner:
        raise MirrorDeployError("the calibration sequences have no continuation tokens",
                                "ask for at least 1 new token per prompt")
    return Features({b: np.concatenate(h) for b, h in hidden.items()}, np.concatenate(ids),
                    np.concatenate(logprobs), np.concatenate(owner), [s.category for s in sequences])


def cached_features(model_dir: str | Path, model, sequences: list[CalibrationSequence], boundaries: list[int],
                    support: int = 32, cache: Path | None = None) -> Features:
    """`collect_features`, remembered on disk per (checkpoint, sequences, boundaries, support): retraining
    with other settings then skips the teacher-forced forwards."""
    boundaries = check_boundaries(boundaries, model.config.num_hidden_layers)
    key = hashlib.sha256(json.dumps([model_fingerprint(model_dir), [s.ids for s in sequences], boundaries,
                                     support]).encode()).hexdigest()[:24]
    path = Path(cache or cache_dir()) / "calibration" / f"features-{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return Features({b: data[f"hidden_{b}"] for b in boundaries}, data["final_ids"], data["final_logprobs"],
                            data["sequence"], [s.category for s in sequences])
    features = collect_features(model, sequences, boundaries, support)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.stem + ".tmp.npz")
    np.savez(scratch, final_ids=features.final_ids, final_logprobs=features.final_logprobs,
             sequence=features.sequence, **{f"hidden_{b}": h for b, h in features.hidden.items()})
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
