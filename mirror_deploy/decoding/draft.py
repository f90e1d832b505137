"""The draft side: a slot-tree KV cache, fresh rollouts and batched branch rollouts.

Invariant between steps: the committed context is x[0:n] with root = x[n-1]; the draft cache holds x[0:n-1]
as committed slots and the window chain [root, y1..y(γ-1)] as speculative slots (`window_slots`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..artifact import Manifest
from ..runtimes.base import CompiledGraph
from ..runtimes.kv import COMMITTED, DraftCache
from .config import GenerationConfig
from .sampling import FRESH_STREAM, choose, keyed_rng


@dataclass
class Window:
    """Draft tokens y1..yγ after `root`, with the draft's probabilities when sampling."""
    tokens: list[int]
    probs: list[np.ndarray | None]


@dataclass
class Branch:
    depth: int                      # r: correction at window position r (γ+1 = bonus)
    token: int                      # v
    position: int                   # position of v
    slots: list[int] = field(default_factory=list)   # slots of v, z1, .. (fed tokens)
    window: Window = field(default_factory=lambda: Window([], []))

    @property
    def key(self) -> tuple[int, int]:
        return self.depth, self.token


@dataclass
class BranchRun:
    branches: dict[tuple[int, int], Branch]
    bonus_slot: int | None          # slot of yγ when a bonus branch fed it
    calls: int = 0
    aborted: bool = False
    seconds: float = 0.0


class DraftRunner:
    def __init__(self, graph: CompiledGraph, manifest: Manifest, prefill_chunk: int = 128):
        d = manifest.draft
        self.graph = graph
        self.cache = DraftCache(range(d["num_layers"]), manifest.max_context, d["kv_heads"], d["head_dim"])
        self.static_seq = graph.static_dims["seq"] if graph.static_dims else None
        self.prefill_chunk = self.static_seq or prefill_chunk
        self.window_slots: list[int] = []
        self.busy = 0.0               # seconds inside draft calls since last read

    def reset(self) -> None:
        self.cache.committed = self.cache.used = 0
        self.window_slots = []

    def take_busy(self) -> float:
        busy, self.busy = self.busy, 0.0
        return busy

    def call(self, tokens, parents, positions) -> np.ndarray:
        """One graph call over new tokens; returns their logits [len(tokens), vocab]."""
        feeds, _ = self.cache.call_feeds(tokens, parents, positions, self.static_seq)
        t0 = time.perf_counter()
        out = self.graph.run(feeds)
        self.busy += time.perf_counter() - t0
        self.cache.append(out, tokens, parents, positions)
        return out["logits"][0, :len(tokens)]

    def prefill(self, tokens: list[int]) -> None:
        """Committed K/V for `tokens` (the prompt without its last token)."""
        for i in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[i:i + self.prefill_chunk]
            self.call(chunk, [COMMITTED] + list(range(self.cache.used, self.cache.used + len(chunk) - 1)),
                      list(range(i, i + len(chunk))))
            self.cache.committed = self.cache.used

    def rollout_fresh(self, root: int, root_pos: int, gamma: int, cfg: GenerationConfig, window_id: int,
                      missing: list[int] = ()) -> Window:
        """γ sequential calls from the committed context; `missing` are committed tokens without K/V,
        fed in the first call just before the root."""
        rng = None if cfg.greedy else keyed_rng(cfg.seed, window_id, FRESH_STREAM)
        feed = [*missing, root]
        first = self.cache.used
        parents = [COMMITTED] + list(range(first, first + len(feed) - 1))
        positions = list(range(root_pos - len(missing), root_pos + 1))
        logits = self.call(feed, parents, positions)[-1]
        self.cache.committed += len(missing)
        self.window_slots = [first + len(missing)]
        window = Window([], [])
        for t in range(gamma):
            token, probs = choose(logits, cfg, rng)
            window.tokens.append(token)
            window.probs.append(probs)
            if t == gamma - 1:
                break
            slot = self.cache.used
            logits = self.call([token], [self.window_slots[-1]], [root_pos + t + 1])[0]
            self.window_slots.append(slot)
        return window

    def roll_out_branches(self, branches: list[tuple[int, int]], drafts: list[int], root_pos: int,
                          cfg: GenerationConfig, window_id: int,
                          poll: Callable[[], tuple[int, int] | None]) -> BranchRun:
        """Roll out γ tokens on every branch, batched one depth per call. Between calls `poll()` may
        deliver the verification (A, c): then only branch (A+1, c) goes on, or none if it is absent."""
        t0 = time.perf_counter()
        gamma = len(drafts)
        chain = self.window_slots
        run = BranchRun({}, None)
        tokens, parents, positions, owners = [], [], [], []
        if any(r == gamma + 1 for r, _ in branches):   # bonus branches extend y_γ, which has no K/V yet
            run.bonus_slot = self.cache.used
            tokens, parents, positions, owners = [drafts[-1]], [chain[-1]], [root_pos + gamma], [None]
        for r, v in branches:
            b = Branch(r, v, root_pos + r)
            run.branches[b.key] = b
            tokens.append(v)
            parents.append(chain[r - 1] if r <= gamma else run.bonus_slot)
            positions.append(b.position)
            owners.append(b)
        active = list(run.branches.values())
        rngs = {b.key: None if cfg.greedy else keyed_rng(cfg.seed, window_id, *b.key) for b in active}
        while active:
            first = self.cache.used
            logits = self.call(tokens, parents, positions)
            run.calls += 1
            for row, owner in enumerate(owners):
                if owner is None:
                    continue
                owner.slots.append(first + row)
                token, probs = choose(logits[row], cfg, rngs[owner.key])
                owner.window.tokens.append(token)
                owner.window.probs.append(probs)
            active = [b for b in active if len(b.window.tokens) < gamma]
            verdict = poll()
            if verdict is not None:
                needed = (verdict[0] + 1, verdict[1])
                if needed not in run.branches:
                    run.aborted = bool(active)
                    break
                active = [b for b in active if b.key == needed]
            owners = active
            tokens = [b.window.tokens[-1] for b in active]
            parents = [b.slots[-1] for b in active]
            positions = [b.position + len(b.slots) for b in active]
        run.seconds = time.perf_counter() - t0
        return run

    def advance(self, accepted: int, correction: int, drafts: list[int], root_pos: int, gamma: int,
                cfg: GenerationConfig, window_id: int, run: BranchRun | None) -> tuple[Window, bool]:
        """Commit root + accepted drafts and produce the next window: the branch (A+1, c) if it was
        rolled out to full length (reuse), else a fresh rollout (fallback). Returns (window, reused)."""
        path = self.window_slots[:accepted + 1]
        missing = []
        if accepted == gamma:
            if run is not None and run.bonus_slot is not None:
                path = path + [run.bonus_slot]
            else:
                missing = [drafts[-1]]
        branch = run.branches.get((accepted + 1, correction)) if run else None
        if branch is not None and len(branch.window.tokens) == gamma:
            self.cache.keep_chain(path + branch.slots, n_commit=len(path))
            self.window_slots = list(range(self.cache.committed, self.cache.committed + len(branch.slots)))
            return branch.window, True
        self.cache.keep_chain(path, n_commit=len(path))
        window = self.rollout_fresh(correction, root_pos + accepted + 1, gamma, cfg, window_id, missing)
        return window, False
