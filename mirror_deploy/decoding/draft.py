"""The draft side: a slot-tree KV cache, fresh rollouts and batched branch rollouts.

Invariant between steps: the committed context is x[0:n] with root = x[n-1]; the draft cache holds x[0:n-1]
as committed slots and the window chain [root, y1..y(γ-1)] as speculative slots (`window_slots`). Slots
never move except in a compaction, which happens only at the start of a rollout (`ensure_room`), where
the window chain is the only slot list held outside the cache.
While the run takes autoregressive steps (an empty window) the draft is idle: the cache holds x[0:m] and
`pending` the committed x[m:n] (root included), all fed at once when a window is wanted again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..artifact import Manifest
from ..errors import MirrorDeployError
from ..runtimes.base import CompiledGraph
from ..runtimes.draft_cache import DraftCache, store_for
from ..runtimes.kv import COMMITTED
from .config import GenerationConfig
from .branches import CONTINUATION
from .sampling import FRESH_STREAM, choose, keyed_rng


@dataclass
class CallRows:
    """One draft call's outputs for its real (unpadded) tokens: logits, and the draft's own top-m
    tokens and probabilities, computed in the graph. A cut head (export/vocab_cut.py) scores only
    `vocab_ids`: its logits' columns are those ids, and every other token has probability 0."""
    logits: np.ndarray      # [n, vocab] or [n, V] of a cut head
    top_ids: np.ndarray     # [n, m] vocabulary ids (mapped back in the graph)
    top_probs: np.ndarray   # [n, m]
    vocab_ids: np.ndarray | None = None
    vocab: int = 0

    def argmax(self, i: int) -> int:
        best = int(np.argmax(self.logits[i]))
        return best if self.vocab_ids is None else int(self.vocab_ids[best])

    def choose(self, i: int, cfg: GenerationConfig, rng) -> tuple[int, np.ndarray | None]:
        """The draft's token for row i and, when sampling, the whole-vocabulary distribution it came from."""
        if self.vocab_ids is None:
            return choose(self.logits[i], cfg, rng)
        if cfg.greedy:
            return self.argmax(i), None
        local, probs = choose(self.logits[i], cfg, rng)
        full = np.zeros(self.vocab, probs.dtype)
        full[self.vocab_ids] = probs
        return int(self.vocab_ids[local]), full

    def full_logits(self) -> np.ndarray:
        """[n, vocab] logits, -inf outside a cut head's ids (for checks and teacher-forced statistics)."""
        if self.vocab_ids is None:
            return self.logits
        full = np.full((len(self.logits), self.vocab), -np.inf, np.float32)
        full[:, self.vocab_ids] = self.logits
        return full


@dataclass
class Window:
    """Draft tokens y1..yγ after `root`, with the draft's probabilities when sampling and its top-m
    at each position (the next step ranks branches with the draft's runner-up tokens)."""
    tokens: list[int] = field(default_factory=list)
    probs: list[np.ndarray | None] = field(default_factory=list)
    top_ids: list[np.ndarray] = field(default_factory=list)
    top_probs: list[np.ndarray] = field(default_factory=list)
    source: str = "draft"           # who proposed it: draft (the model) or lookup (decoding/lookup.py)

    def add(self, rows: CallRows, i: int, cfg: GenerationConfig, rng) -> int:
        token, probs = rows.choose(i, cfg, rng)
        self.tokens.append(token)
        self.probs.append(probs)
        self.top_ids.append(rows.top_ids[i])
        self.top_probs.append(rows.top_probs[i])
        return token


@dataclass
class Branch:
    depth: int                      # r: correction at window position r (γ+1 = bonus)
    token: int                      # v
    position: int                   # position of v
    parent: int                     # slot v attends after
    slots: list[int] = field(default_factory=list)   # slots of v, z1, .. (fed tokens)
    window: Window = field(default_factory=Window)

    def next_feed(self) -> tuple[int, int, int]:
        """(token, parent slot, position) of this branch's next call."""
        if not self.slots:
            return self.token, self.parent, self.position
        return self.window.tokens[-1], self.slots[-1], self.position + len(self.slots)

    @property
    def key(self) -> tuple[int, int]:
        return self.depth, self.token


@dataclass
class BranchRun:
    branches: dict[tuple[int, int], Branch]
    bonus_slot: int | None          # slot of yγ when a bonus branch fed it
    guess: int | None = None        # the draft's own guess for the bonus token (continuation root)
    calls: int = 0
    aborted: bool = False


class DraftRunner:
    can_branch = True   # Mirror rolls out branches from this runner's windows

    def __init__(self, graph: CompiledGraph, manifest: Manifest, prefill_chunk: int = 128):
        d = manifest.draft
        if "top_ids" not in graph.output_names:
            raise MirrorDeployError(f"the draft graph {graph.name} has no top_ids output (exported by an older "
                                    "mirror-deploy)", "re-export the artifact")
        self.graph = graph
        self.vocab_ids = getattr(graph, "vocab_ids", None)   # a cut head's ids (runtimes/loader.with_vocab)
        self.vocab = d.get("vocab_size", 0)
        store = store_for(graph, range(d["num_layers"]), manifest.max_context, d["kv_heads"], d["head_dim"])
        self.cache = DraftCache(store, manifest.max_context)
        self.static_seq = graph.static_dims["seq"] if graph.static_dims else None
        self.prefill_chunk = self.static_seq or prefill_chunk
        self.window_slots: list[int] = []
        self.pending: list[int] = []  # committed tokens not yet fed (autoregressive steps), root last
        self.busy = 0.0               # seconds inside draft calls since last read

    def reset(self) -> None:
        self.cache.reset()
        self.window_slots = []
        self.pending = []

    def take_busy(self) -> float:
        busy, self.busy = self.busy, 0.0
        return busy

    def observe_step(self, record) -> None:
        pass   # the model's windows are sized by the loop's policy

    def call(self, tokens, parents, positions) -> CallRows:
        """One graph call over new tokens; returns their rows."""
        feeds, _ = self.cache.call_feeds(tokens, parents, positions, self.static_seq)
        t0 = time.perf_counter()
        out = self.graph.run(feeds)
        self.busy += time.perf_counter() - t0
        self.cache.append(out, tokens, parents, positions)
        n = len(tokens)
        return CallRows(out["logits"][0, :n], out["top_ids"][0, :n], out["top_probs"][0, :n], self.vocab_ids,
                        self.vocab)

    def prefill(self, tokens: list[int], start: int = 0) -> None:
        """Committed K/V for `tokens` at positions start.. (the prompt without its last token)."""
        for i in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[i:i + self.prefill_chunk]
            self.cache.ensure_room(len(chunk))    # nothing speculative is held here
            first = self.cache.used
            self.call(chunk, [COMMITTED] + list(range(first, first + len(chunk) - 1)),
                      list(range(start + i, start + i + len(chunk))))
            self.cache.commit(list(range(first, first + len(chunk))))

    def rollout_fresh(self, root: int, root_pos: int, gamma: int, cfg: GenerationConfig, window_id: int,
                      missing: list[int] = ()) -> Window:
        """γ sequential calls from the committed context; `missing` are committed tokens without K/V,
        fed in the first call just before the root."""
        rng = None if cfg.greedy else keyed_rng(cfg.seed, window_id, FRESH_STREAM)
        feed = [*missing, root]
        self.cache.ensure_room(len(missing) + gamma)   # only committed slots are live here
        first = self.cache.used
        parents = [COMMITTED] + list(range(first, first + len(feed) - 1))
        positions = list(range(root_pos - len(missing), root_pos + 1))
        rows, row = self.call(feed, parents, positions), len(feed) - 1
        self.cache.commit(list(range(first, first + len(missing))))
        self.window_slots = [first + len(missing)]
        window = Window()
        for t in range(gamma):
            token = window.add(rows, row, cfg, rng)
            if t == gamma - 1:
                break
            slot = self.cache.used
            rows, row = self.call([token], [self.window_slots[-1]], [root_pos + t + 1]), 0
            self.window_slots.append(slot)
        return window

    def roll_out_branches(self, branches: list[tuple[int, int]], drafts: list[int], root_pos: int,
                          cfg: GenerationConfig, window_id: int,
                          poll: Callable[[], tuple[int, int] | None], length: int | None = None) -> BranchRun:
        """Roll out `length` tokens (default: the current window's γ) on every branch, batched one depth
        per call. `CONTINUATION` in `branches`
        adds the bonus branch rooted at the draft's own guess after y_γ, which joins one call later.
        Between calls `poll()` may deliver the verdict (A, c): then only branch (A+1, c) goes on, or
        none if it is absent."""
        gamma = len(drafts)
        length = length or gamma
        continuation = CONTINUATION in branches
        bonus = continuation or any(r == gamma + 1 for r, _ in branches)
        moved = self.cache.ensure_room(int(bonus) + length * len(branches))
        if moved is not None:
            self.window_slots = [int(moved[s]) for s in self.window_slots]
        chain = self.window_slots
        run = BranchRun({}, None)
        extra = []   # y_γ itself: bonus branches attend to it, and it has no K/V yet
        if bonus:
            run.bonus_slot = self.cache.used
            extra = [(drafts[-1], chain[-1], root_pos + gamma)]
        for r, v in branches:
            if (r, v) != CONTINUATION:
                parent = chain[r - 1] if r <= gamma else run.bonus_slot
                run.branches[(r, v)] = Branch(r, v, root_pos + r, parent)
        active = list(run.branches.values())
        rngs = {}
        while active or extra:
            feeds = extra + [b.next_feed() for b in active]
            first = self.cache.used
            rows = self.call(*map(list, zip(*feeds)))
            run.calls += 1
            for row, b in enumerate(active, start=len(extra)):
                if b.key not in rngs:
                    rngs[b.key] = None if cfg.greedy else keyed_rng(cfg.seed, window_id, *b.key)
                b.slots.append(first + row)
                b.window.add(rows, row, cfg, rngs[b.key])
            if extra and continuation:
                run.guess = rows.argmax(0)                           # the likeliest bonus token
                key = (gamma + 1, run.guess)
                if key not in run.branches:
                    run.branches[key] = Branch(gamma + 1, run.guess, root_pos + gamma + 1, run.bonus_slot)
                    active.append(run.branches[key])
            extra = []
            active = [b for b in active if len(b.window.tokens) < length]
            verdict = poll()
            if verdict is not None:
                needed = (verdict[0] + 1, verdict[1])
                if needed not in run.branches:
                    run.aborted = bool(active)
                    break
                active = [b for b in active if b.key == needed]
        return run

    def advance(self, accepted: int, correction: int, drafts: list[int], root_pos: int, length: int,
                cfg: GenerationConfig, window_id: int, run: BranchRun | None) -> tuple[Window, bool]:
        """Commit root + accepted drafts and produce the next window of `length` tokens: the branch
        (A+1, c) if it was rolled out that far (reuse), else a fresh rollout (fallback); length 0
        leaves the draft idle (an autoregressive step follows). Returns (window, reused)."""
        if not drafts:                 # an autoregressive step: its root was never fed
            self.pending.append(correction)
            return (Window(), False) if length == 0 else (self._resume(root_pos + 1, length, cfg, window_id), False)
        path = self.window_slots[:accepted + 1]
        missing = []
        if accepted == len(drafts):
            if run is not None and run.bonus_slot is not None:
                path = path + [run.bonus_slot]
            else:
                missing = [drafts[-1]]
        branch = run.branches.get((accepted + 1, correction)) if run else None
        if branch is not None and len(branch.window.tokens) == length:
            self.cache.keep_chain(path + branch.slots, n_commit=len(path))   # flags only, no copy
            self.window_slots = list(branch.slots)
            return branch.window, True
        self.cache.keep_chain(path, n_commit=len(path))
        if length == 0:
            self.window_slots, self.pending = [], [*missing, correction]
            return Window(), False
        window = self.rollout_fresh(correction, root_pos + accepted + 1, length, cfg, window_id, missing)
        return window, False

    def _resume(self, root_pos: int, length: int, cfg: GenerationConfig, window_id: int) -> Window:
        """Feed the tokens committed while idle, then roll out a window from the last of them."""
        pending, self.pending = self.pending, []
        split = max(0, len(pending) - self.prefill_chunk)   # the rollout's first call takes the rest
        self.prefill(pending[:split], root_pos - len(pending) + 1)
        return self.rollout_fresh(pending[-1], root_pos, length, cfg, window_id, pending[split:-1])
