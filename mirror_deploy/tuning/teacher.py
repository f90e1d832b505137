"""Calibration sequences and their teacher-forced statistics, measured through the artifact itself.

A calibration sequence is a prompt and the deployed target's own greedy continuation of it. One pass of
the target over it gives the early exit's top-κ at every exported boundary for every position; one
draft prefill over it gives the draft's greedy choice (and runner-ups) at every position. Under greedy
decoding that is enough to replay any speculative run on the sequence exactly: the draft's k-th window
token, given k-1 accepted ones, is its greedy choice on the true context (simulate.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..decoding.config import GenerationConfig
from ..decoding.drive import DraftDriver
from ..decoding.engine import Engine

RUNNER_UPS = 4   # the draft's candidates per position, as decoding/branches.draft_view takes them


@dataclass
class Sequence:
    """Rows are indexed by the position they predict, minus `prompt_len` (0 = first new token)."""
    tokens: list[int]
    prompt_len: int
    category: str
    exit_ids: dict[int, np.ndarray]        # exit layer -> [new, κmax] top-κ ids
    exit_logprobs: dict[int, np.ndarray]   # exit layer -> [new, κmax]
    draft_top: np.ndarray                  # [new] the draft's greedy token
    draft_alt_ids: np.ndarray              # [new, RUNNER_UPS]
    draft_alt_probs: np.ndarray            # [new, RUNNER_UPS]
    draft_own: np.ndarray                  # [new] probability of the greedy token

    @property
    def new(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def agree(self) -> np.ndarray:
        """Per new position: does the draft's greedy choice on the true context equal the target's?"""
        return self.draft_top == np.asarray(self.tokens[self.prompt_len:])


def continuation(engine: Engine, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """The target's own greedy continuation (autoregressive on the deployed target)."""
    cfg = GenerationConfig(max_new_tokens=new_tokens, mode="ar", stop_at_eos=False)
    return engine.generate(prompt_ids, cfg).tokens


def exit_pass(engine: Engine, tokens: list[int], first_row: int, chunk: int = 256) -> tuple[dict, dict]:
    """The target over `tokens[:-1]` segment by segment; the exit head at every boundary on the rows that
    predict positions first_row+1.. (each row predicts the next position)."""
    target = engine.target
    target.reset()
    ids, lps = {layer: [] for layer in target.exit_layers}, {layer: [] for layer in target.exit_layers}
    body = tokens[:-1]
    for at in range(0, len(body), chunk):
        seq = min(chunk, len(body) - at)
        feeds, outputs = target.window_feeds(at, seq), {}
        rows = np.arange(max(first_row - at, 0), seq)
        hidden = np.asarray(body[at:at + seq], np.int64)[None]
        for i, layer in enumerate([*target.exit_layers, None]):
            hidden = target.run_segments(i, i + 1, hidden, feeds, outputs)
            if layer is not None and len(rows):
                out = target.head(hidden, rows, exit_head=True)
                ids[layer].append(out["top_ids"][0])
                lps[layer].append(out["top_logprobs"][0])
        target.commit_segments(outputs, range(len(target.kv)), at, seq)
    target.reset()
    return ({k: np.concatenate(v) for k, v in ids.items()}, {k: np.concatenate(v) for k, v in lps.items()})


def draft_pass(engine: Engine, tokens: list[int], first_row: int) -> tuple[np.ndarray, ...]:
    """The draft's greedy token, runner-ups and own probability for positions first_row+1.."""
    engine.draft.reset()
    logits = DraftDriver(engine.draft).commit(tokens[:-1])[first_row:]
    engine.draft.reset()
    top, alt_ids, alt_probs, own = [], [], [], []
    for at in range(0, len(logits), 32):       # float64 softmax in slices: a real vocab is large
        rows = logits[at:at + 32].astype(np.float64)
        rows -= rows.max(axis=1, keepdims=True)
        probs = np.exp(rows)
        probs /= probs.sum(axis=1, keepdims=True)
        best = probs.argmax(axis=1)
        alt = np.argpartition(-probs, RUNNER_UPS, axis=1)[:, :RUNNER_UPS]
        top.append(best)
        alt_ids.append(alt)
        alt_probs.append(np.take_along_axis(probs, alt, axis=1))
        own.append(probs[np.arange(len(best)), best])
    return tuple(np.concatenate(x) for x in (top, alt_ids, alt_probs, own))


def measure_sequence(engine: Engine, prompt_ids: list[int], new_tokens: int, category: str) -> Sequence:
    tokens = list(prompt_ids) + continuation(engine, prompt_ids, new_tokens)
    first_row = len(prompt_ids) - 1
    exit_ids, exit_lps = exit_pass(engine, tokens, first_row)
    top, alt_ids, alt_probs, own = draft_pass(engine, tokens, first_row)
    return Sequence(tokens, len(prompt_ids), category, exit_ids, exit_lps, top, alt_ids, alt_probs, own)


def exit_hit_rates(sequences: list[Sequence], kappas: list[int]) -> dict[int, dict[int, float]]:
    """Exit layer -> κ -> share of new positions whose target token is inside the exit's top-κ."""
    out: dict[int, dict[int, float]] = {}
    for layer in sequences[0].exit_ids:
        hits = np.concatenate([
            np.cumsum(s.exit_ids[layer] == np.asarray(s.tokens[s.prompt_len:])[:, None], axis=1) > 0
            for s in sequences])
        out[layer] = {k: float(hits[:, k - 1].mean()) for k in kappas}
    return out
