"""Speculative streams: one draft call proposes k tokens instead of one (issue 17; the paper's second half).

The draft runs as usual over the fed tokens; at each output row its head input z0 (the final norm's output)
gives the draft's own next token y1 as before. A stream block then walks on without another pass through
the decoder: z_j = z_(j-1) + W_out·SiLU(W_in·[z_(j-1) ; e(y_j)]), and the draft's own (frozen, possibly cut)
head scores z_j for token y_(j+1). One block, applied recurrently, serves every stream position (an
MTP-style chain, Hydra's conditioning on the tokens already chosen; the Medusa heads that see only z0 guess
y2 blind to y1, which the target has usually just confirmed). The block is small (3·d² weights: 2.4 M for
the 0.5B draft) and reads the head once more per stream token, so a call with one stream costs about the
head's share more, not a second pass.

Trained offline on the target's own greedy continuations (the text the draft must predict while decoding),
teacher-forced: rows are continuation positions t, inputs z0 = the draft's head input at t and y_j = the
sequence's tokens, targets the sequence's token after each. Cross-entropy over the head's kept vocabulary;
the decoder, embedding and head stay frozen. Acceptance per stream position is measured on held-out
sequences the way a window uses it: position j counts only where the draft's own token and the streams
before it were right.

    python -m mirror_deploy.tuning.streams ART   (or `mirror-deploy learn-streams ART`)
"""
from __future__ import annotations

import time
from dataclasses import astuple, dataclass, field

import numpy as np
import torch

from .calibration import CalibrationSequence


@dataclass(frozen=True)
class StreamConfig:
    streams: int = 1          # extra tokens per draft call (k - 1)
    epochs: int = 6
    batch: int = 128
    lr: float = 2e-3
    seed: int = 0
    held_out: float = 0.3     # fraction of sequences (per category) kept out of training


class StreamBlock(torch.nn.Module):
    """(z, e(y)) -> z': the head input after one more token, without the decoder."""

    def __init__(self, hidden: int):
        super().__init__()
        self.w_in = torch.nn.Linear(2 * hidden, hidden, bias=False)
        self.w_out = torch.nn.Linear(hidden, hidden, bias=False)
        torch.nn.init.zeros_(self.w_out.weight)   # starts as the identity (Medusa's zero-initialised residual)

    def forward(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return z + self.w_out(torch.nn.functional.silu(self.w_in(torch.cat([z, e], dim=-1))))

    def arrays(self) -> dict[str, np.ndarray]:
        """The weights as the graph uses them: x @ w (rows in, columns out)."""
        return {"w_in": self.w_in.weight.detach().T.contiguous().numpy().astype(np.float32),
                "w_out": self.w_out.weight.detach().T.contiguous().numpy().astype(np.float32)}


@dataclass
class StreamFeatures:
    """Per sequence: the draft's head input at every position and the sequence's ids."""
    head_input: list[np.ndarray]      # [len, d] float32
    ids: list[np.ndarray]             # [len] int64
    starts: list[int]                 # first continuation row (prompt_len - 1)
    category: list[str]


@torch.no_grad()
def draft_features(model, sequences: list[CalibrationSequence], advance=None) -> StreamFeatures:
    """The draft's head input over each sequence (its final norm's output), one pass per sequence;
    `advance()` after each (a progress bar)."""
    feats = StreamFeatures([], [], [], [])
    for s in sequences:
        if advance is not None:
            advance()
        ids = torch.tensor([s.ids])
        out = model.model(input_ids=ids) if hasattr(model, "model") else model.transformer(input_ids=ids)
        feats.head_input.append(out.last_hidden_state[0].float().numpy())
        feats.ids.append(np.asarray(s.ids, np.int64))
        feats.starts.append(s.prompt_len - 1)
        feats.category.append(s.category)
    return feats


def split(feats: StreamFeatures, held_out: float, seed: int) -> tuple[list[int], list[int]]:
    """Sequence indices (train, held out), held out per category so every kind of text is measured."""
    return split_by_category(feats.category, held_out, seed)


def split_by_category(categories: list[str], held_out: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, held out) of sequences of these categories: a `held_out` share of each category that
    has more than one sequence, picked by `seed`."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cat in sorted(set(categories)):
        members = [i for i, c in enumerate(categories) if c == cat]
        rng.shuffle(members)
        cut = int(round(len(members) * held_out)) if len(members) > 1 else 0
        test += members[:cut]
        train += members[cut:]
    return sorted(train), sorted(test)


@dataclass
class Rows:
    z0: torch.Tensor          # [n, d] head input at t
    tokens: torch.Tensor      # [n, k+1] sequence ids s_(t+1) .. s_(t+k+1) (y1, then each stream's target)
    columns: torch.Tensor     # [n, k+1] their columns in the head (-1: outside a cut head)
    teacher: torch.Tensor     # [n, k, d] the draft's own head input at t+1 .. t+k (its next call's rows)


def rows_of(feats: StreamFeatures, which: list[int], streams: int, column_of: np.ndarray,
            prompt_rows: bool = False) -> Rows:
    """Positions t of the chosen sequences that have `streams` + 1 tokens after them: continuation
    positions, and with `prompt_rows` the prompt's too (more rows from the same passes)."""
    z, toks, teach = [], [], []
    for i in which:
        h, ids, start = feats.head_input[i], feats.ids[i], 0 if prompt_rows else feats.starts[i]
        last = len(ids) - streams - 2
        if last < start:
            continue
        t = np.arange(start, last + 1)
        z.append(h[t])
        toks.append(np.stack([ids[t + 1 + j] for j in range(streams + 1)], axis=1))
        teach.append(np.stack([h[t + 1 + j] for j in range(streams)], axis=1))
    if not z:
        d = feats.head_input[0].shape[1] if feats.head_input else 0
        return Rows(torch.zeros(0, d), torch.zeros(0, streams + 1, dtype=torch.long),
                    torch.zeros(0, streams + 1, dtype=torch.long), torch.zeros(0, streams, d))
    tokens = np.concatenate(toks)
    return Rows(torch.from_numpy(np.concatenate(z)), torch.from_numpy(tokens), torch.from_numpy(column_of[tokens]),
                torch.from_numpy(np.concatenate(teach)))


@dataclass
class StreamReport:
    streams: int
    train_rows: int
    held_out_rows: int
    acceptance: list[float]           # held out, per window position: the draft's own token, then each stream's
    draft_second: float               # held out: the draft's own token after y1 when y1 is fed (a second call)
    train_seconds: float
    losses: list[float] = field(default_factory=list)


class StreamTrainer:
    """The frozen head (kept rows of the draft's LM head) and embedding, and the block being trained."""

    def __init__(self, embedding: torch.Tensor, head: torch.Tensor, head_ids: np.ndarray, config: StreamConfig):
        self.embedding, self.head, self.config = embedding, head, config
        self.block = StreamBlock(head.shape[1])
        self.head_ids = np.asarray(head_ids, np.int64)
        self.column_of = np.full(embedding.shape[0], -1, np.int64)
        self.column_of[head_ids] = np.arange(len(head_ids))

    def walk(self, z0: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Stream logits [n, V] for each stream position, conditioned on the given tokens."""
        z, logits = z0, []
        for j in range(self.config.streams):
            z = self.block(z, self.embedding[tokens[:, j]])
            logits.append(z @ self.head.T)
        return logits

    def fit(self, rows: Rows, log=print) -> list[float]:
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        opt = torch.optim.AdamW(self.block.parameters(), lr=cfg.lr, weight_decay=0.0)
        steps = cfg.epochs * max(1, -(-len(rows.z0) // cfg.batch))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps, pct_start=0.1)
        losses = []
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(rows.z0), generator=gen)
            total, count = 0.0, 0
            for b in order.split(cfg.batch):
                loss = 0.0
                for j, logits in enumerate(self.walk(rows.z0[b], rows.tokens[b])):
                    # The draft's own next call is the teacher: its whole distribution after y_j, not
                    # just the sequence's token (thousands of rows would be memorised, not learned).
                    with torch.no_grad():
                        teacher = torch.log_softmax(rows.teacher[b, j] @ self.head.T, -1)
                    loss = loss + torch.nn.functional.kl_div(torch.log_softmax(logits, -1), teacher,
                                                             log_target=True, reduction="batchmean")
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total, count = total + float(loss.detach()) * len(b), count + len(b)
            losses.append(total / max(count, 1))
            log(f"  epoch {epoch + 1}/{cfg.epochs}: loss {losses[-1]:.3f}")
        return losses

    @torch.no_grad()
    def acceptance(self, rows: Rows) -> list[float]:
        """Per window position, the share accepted among rows that reached it (greedy, the draft's own
        choices fed to the block as a run does)."""
        own = (rows.z0 @ self.head.T).argmax(-1)
        first_ok = own == rows.columns[:, 0]
        chosen = [self._vocab(own)]
        z, alive, rates = rows.z0, first_ok, [float(first_ok.float().mean()) if len(own) else 0.0]
        for j in range(self.config.streams):
            z = self.block(z, self.embedding[chosen[-1]])
            pick = (z @ self.head.T).argmax(-1)
            ok = pick == rows.columns[:, j + 1]
            rates.append(float(ok[alive].float().mean()) if alive.any() else 0.0)
            alive = alive & ok
            chosen.append(self._vocab(pick))
        return rates

    def _vocab(self, columns: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids of head columns."""
        return torch.from_numpy(self.head_ids)[columns]


def train_streams(feats: StreamFeatures, embedding: torch.Tensor, head: torch.Tensor, head_ids: np.ndarray,
                  config: StreamConfig, extra: StreamFeatures | None = None, log=print) -> tuple[StreamBlock, StreamReport]:
    """Train on the calibration sequences' training part (every position) and all of `extra`; measure on
    the held-out calibration sequences' continuations."""
    trainer = StreamTrainer(embedding, head, head_ids, config)
    train_idx, test_idx = split(feats, config.held_out, config.seed)
    train = rows_of(feats, train_idx, config.streams, trainer.column_of, prompt_rows=True)
    if extra is not None:
        more = rows_of(extra, list(range(len(extra.ids))), config.streams, trainer.column_of, prompt_rows=True)
        train = Rows(*(torch.cat([a, b]) for a, b in zip(astuple(train), astuple(more))))
    test = rows_of(feats, test_idx, config.streams, trainer.column_of)
    t0 = time.perf_counter()
    losses = trainer.fit(train, log)
    seconds = time.perf_counter() - t0
    rates = trainer.acceptance(test)
    second = draft_second(feats, test_idx, head, trainer.column_of)
    return trainer.block, StreamReport(config.streams, len(train.z0), len(test.z0), rates, second, seconds, losses)


@torch.no_grad()
def draft_second(feats: StreamFeatures, which: list[int], head: torch.Tensor, column_of: np.ndarray) -> float:
    """What a second draft call would do instead: the draft's token at t+1 (y1 fed) right, given its token
    at t was right."""
    hits = seen = 0
    for i in which:
        h, ids, start = feats.head_input[i], feats.ids[i], feats.starts[i]
        if len(ids) - start < 3:
            continue
        pick = (torch.from_numpy(h[start:len(ids) - 1]) @ head.T).argmax(-1).numpy()
        truth = column_of[ids[start + 1:]]
        ok = pick == truth
        seen += int(ok[:-1].sum())
        hits += int((ok[:-1] & ok[1:]).sum())
    return hits / seen if seen else 0.0
