"""The draft side: a slot-tree KV cache, fresh rollouts and batched branch rollouts.

Invariant between steps: the committed context is x[0:n] with root = x[n-1]; the draft cache holds x[0:n-1]
as committed slots and the fed part of the window chain [root, y1..yf] as speculative slots
(`window_slots`): f = γ-1 when each call yields one token, fewer with speculative streams (a call yields
its row's token and S more, tuning/streams.py), whose last call's tokens are never fed. Drafts committed
without K/V are fed in the next call, before its first token. Slots
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
    streams: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None   # [n, S, ...] logits, top ids, top probs

    @property
    def per_call(self) -> int:
        """Tokens one row yields: its own and one per stream."""
        return 1 + (0 if self.streams is None else self.streams[0].shape[1])

    def stream(self, j: int) -> "CallRows":
        """Stream j's rows, shaped like the draft's own."""
        logits, ids, probs = (a[:, j] for a in self.streams)
        return CallRows(logits, ids, probs, self.vocab_ids, self.vocab)

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
    kinds: list[int] = field(default_factory=list)   # per token: 0 = a row's own, j = its stream j

    def add(self, rows: CallRows, i: int, cfg: GenerationConfig, rng, kind: int = 0) -> int:
        token, probs = rows.choose(i, cfg, rng)
        self.kinds.append(kind)
        self.tokens.append(token)
        self.probs.append(probs)
        self.top_ids.append(rows.top_ids[i])
        self.top_probs.append(rows.top_probs[i])
        return token

    def take(self, rows: CallRows, i: int, cfg: GenerationConfig, rng, limit: int) -> list[int]:
        """Row i's token, then its streams' (each a proposal from its own distribution, so sampling
        stays exact), while the window is shorter than `limit`; returns the tokens added."""
        new = []
        for j in range(rows.per_call):
            if len(self.tokens) >= limit:
                break
            new.append(self.add(rows if j == 0 else rows.stream(j - 1), i, cfg, rng, j))
        return new


@dataclass
class Branch:
    depth: int                      # r: correction at window position r (γ+1 = bonus)
    token: int                      # v
    position: int                   # position of v
    parent: int                     # slot v attends after
    slots: list[int] = field(default_factory=list)   # slots of v, z1, .. (fed tokens)
    window: Window = field(default_factory=Window)

    def next_feeds(self, at: int) -> list[tuple[int, int, int]]:
        """(token, parent slot, position) of each token this branch feeds next call, its first taking
        slot `at`: v at first, then the tokens the last call chose (one, or more with streams)."""
        if not self.slots:
            return [(self.token, self.parent, self.position)]
        feeds, parent = [], self.slots[-1]
        for i, token in enumerate(self.window.tokens[len(self.slots) - 1:]):
            feeds.append((token, parent, self.position + len(self.slots) + i))
            parent = at + i
        return feeds

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
        self.cache = DraftCache(store, manifest.max_context, getattr(graph, "buckets", ()))   # a BucketedDraft's
        self.static_seq = graph.static_dims["seq"] if graph.static_dims else None
        self.streams = getattr(graph, "streams", 0)   # S: tokens a call yields beyond its row's own
        self.prefill_chunk = self.static_seq or prefill_chunk
        self.window_slots: list[int] = []
        self.pending: list[int] = []  # committed tokens not yet fed (autoregressive steps), root last
        self.busy = 0.0               # seconds inside draft calls since last read
        self.calls = self.proposed = 0  # rollout calls and the window tokens they proposed, since reset

    def reset(self) -> None:
        self.calls = self.proposed = 0
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
        streams = None
        if self.streams:
            streams = tuple(out[k][0, :n] for k in ("stream_logits", "stream_top_ids", "stream_top_probs"))
        return CallRows(out["logits"][0, :n], out["top_ids"][0, :n], out["top_probs"][0, :n], self.vocab_ids,
                        self.vocab, streams)

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
        """⌈γ / (1 + S)⌉ sequential calls from the committed context, each feeding the tokens the last one
        chose; `missing` are committed tokens without K/V, fed in the first call just before the root."""
        rng = None if cfg.greedy else keyed_rng(cfg.seed, window_id, FRESH_STREAM)
        if self.static_seq and len(missing) >= self.static_seq:   # more than a static call holds
            split = len(missing) - self.static_seq + 1
            self.prefill(list(missing[:split]), root_pos - len(missing))
            missing = missing[split:]
        feed = [*missing, root]
        self.cache.ensure_room(len(missing) + gamma)   # only committed slots are live here
        first = self.cache.used
        parents = [COMMITTED] + list(range(first, first + len(feed) - 1))
        positions = list(range(root_pos - len(missing), root_pos + 1))
        rows, row = self.call(feed, parents, positions), len(feed) - 1
        self.cache.commit(list(range(first, first + len(missing))))
        self.window_slots = [first + len(missing)]
        window = Window()
        while True:
            new = window.take(rows, row, cfg, rng, gamma)
            self.calls, self.proposed = self.calls + 1, self.proposed + len(new)
            if len(window.tokens) >= gamma:
                return window
            first, done = self.cache.used, len(window.tokens)
            parents = [self.window_slots[-1]] + list(range(first, first + len(new) - 1))
            rows, row = self.call(new, parents, list(range(root_pos + done - len(new) + 1, root_pos + done + 1))), \
                len(new) - 1
            self.window_slots += list(range(first, first + len(new)))

    def roll_out_branches(self, branches: list[tuple[int, int]], drafts: list[int], root_pos: int,
                          cfg: GenerationConfig, window_id: int,
                          poll: Callable[[], tuple[int, int] | None], length: int | None = None) -> BranchRun:
        """Roll out `length` tokens (default: the current window's γ) on every branch, batched one depth
        per call (1 + S depths with streams). `CONTINUATION` in `branches`
        adds the bonus branch rooted at the draft's own guess after y_γ, which joins one call later.
        Drafts a branch's parent needs that have no K/V yet (y_γ for a bonus branch, more with streams)
        are fed in the first call, ahead of the branches that attend to them.
        Between calls `poll()` may deliver the verdict (A, c): then only branch (A+1, c) goes on, or
        none if it is absent."""
        gamma = len(drafts)
        length = length or gamma
        continuation = CONTINUATION in branches
        bonus = continuation or any(r == gamma + 1 for r, _ in branches)
        fed = len(self.window_slots) - 1
        deepest = gamma if bonus else max((r - 1 for r, _ in branches), default=0)
        unfed = list(drafts[fed:deepest])
        moved = self.cache.ensure_room(len(unfed) + length * len(branches))
        if moved is not None:
            self.window_slots = [int(moved[s]) for s in self.window_slots]
        first = self.cache.used
        extra = [(t, self.window_slots[-1] if i == 0 else first + i - 1, root_pos + fed + 1 + i)
                 for i, t in enumerate(unfed)]
        self.window_slots = self.window_slots + list(range(first, first + len(unfed)))
        chain = self.window_slots
        run = BranchRun({}, chain[gamma] if bonus else None)
        for r, v in branches:
            if (r, v) != CONTINUATION:
                run.branches[(r, v)] = Branch(r, v, root_pos + r, chain[r - 1])
        active = list(run.branches.values())
        rngs = {}
        width = self.static_seq
        while width and len(extra) > width:      # a static draft takes at most its width a call
            self.call(*map(list, zip(*extra[:width])))
            extra = extra[width:]
        while active or extra:
            first = self.cache.used
            feeds, spans = list(extra), []
            for b in active:
                mine = b.next_feeds(first + len(feeds))
                if width and feeds and len(feeds) + len(mine) > width:
                    continue          # no room left in this static call: the branch goes on next call
                spans.append((b, len(feeds), len(mine)))
                feeds += mine
            rows = self.call(*map(list, zip(*feeds)))
            run.calls += 1
            self.calls += 1
            for b, at, n in spans:
                if b.key not in rngs:
                    rngs[b.key] = None if cfg.greedy else keyed_rng(cfg.seed, window_id, *b.key)
                b.slots += list(range(first + at, first + at + n))
                self.proposed += len(b.window.take(rows, at + n - 1, cfg, rngs[b.key], length))
            if extra and continuation:
                run.guess = rows.argmax(len(extra) - 1)                 # the likeliest bonus token (after y_γ)
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
        fed = len(self.window_slots) - 1
        path = self.window_slots[:min(accepted, fed) + 1]
        missing = list(drafts[fed:accepted])       # accepted drafts that never got K/V
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
