"""A small draft from the big one: keep a few of the draft's layers, then teach them the target's own
next-token distribution (teacher-forced distillation; `mirror-deploy learn-draft`, tuning/learn_draft.py).

- The student is the draft with only the layers in `keep` (the others dropped, the embedding, final norm
  and head kept): a call then costs about len(keep)/N of the draft's layers plus its head.
- The teacher is the target, run once over every training sequence (no generation): its top-k
  log-probabilities at every position are the soft labels. The student's loss is the cross-entropy
  against them, renormalized over the top k (k = 32 holds almost all of the mass a draft can hope to match).
- Only the kept layers and the final norm learn; the embedding and head are the draft's (the head is most
  of a small draft's weights and already speaks the target's vocabulary).
- bfloat16 autocast where the CPU multiplies bf16 natively (2.6× the fp32 rate on the 1.5B target here),
  else fp32. Training never changes what decoding outputs: the target verifies every proposed token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEACHER_TOP_K = 32


def bf16_native() -> bool:
    """Does this CPU multiply bf16 in hardware (AVX-512 BF16 or AMX)? Elsewhere bf16 is emulated, slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast(enabled: bool):
    import torch
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def default_keep(num_layers: int, layers: int) -> list[int]:
    """The first layers-1 layers and the last one: the last layer maps the residual stream into the space the
    head reads, so a cut that keeps it starts far closer to the full draft than the first `layers` alone."""
    if not 1 <= layers < num_layers:
        from ..errors import MirrorDeployError
        raise MirrorDeployError(f"--layers {layers}: the draft has {num_layers} layers, so a cut keeps 1 to "
                                f"{num_layers - 1}", "use e.g. --layers 4")
    return [*range(layers - 1), num_layers - 1]


def cut_layers(model, keep: list[int]):
    """The model with only the decoder layers in `keep` (in place), its config saying so."""
    import torch
    decoder = model.get_decoder()
    decoder.layers = torch.nn.ModuleList([decoder.layers[i] for i in keep])
    for index, layer in enumerate(decoder.layers):   # the KV cache is indexed by a layer's position
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = index
    config = model.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    return model


@dataclass
class TaughtSequence:
    ids: np.ndarray          # [n] token ids
    first: int               # first position whose prediction is scored at evaluation (the continuation's)
    top_ids: np.ndarray      # [n, k] the teacher's top-k next tokens at every position
    top_logprobs: np.ndarray  # [n, k]


def teach(target, sequences, bf16: bool, advance=lambda: None, k: int = TEACHER_TOP_K) -> list[TaughtSequence]:
    """The target's top-k next-token log-probabilities at every position of every sequence."""
    import torch
    taught = []
    with torch.no_grad(), autocast(bf16):
        for seq in sequences:
            ids = torch.tensor([list(seq.ids)])
            logprobs = torch.log_softmax(target(input_ids=ids, use_cache=False).logits[0].float(), -1)
            values, indices = logprobs.topk(min(k, logprobs.shape[-1]), -1)
            taught.append(TaughtSequence(np.asarray(seq.ids, np.int64), max(seq.prompt_len - 1, 0),
                                         indices.numpy().astype(np.int32), values.numpy().astype(np.float16)))
            advance()
    return taught


def agreement(model, taught: list[TaughtSequence], bf16: bool) -> float:
    """Held-out greedy agreement: the share of continuation positions where the model's argmax is the
    teacher's (the acceptance rate of a one-token greedy window)."""
    import torch
    hits = total = 0
    model.eval()
    with torch.no_grad(), autocast(bf16):
        for seq in taught:
            logits = model(input_ids=torch.from_numpy(seq.ids)[None], use_cache=False).logits[0]
            scored = slice(seq.first, len(seq.ids) - 1)
            hits += int((logits[scored].argmax(-1).numpy() == seq.top_ids[scored, 0]).sum())
            total += scored.stop - scored.start
    return hits / max(total, 1)


def trainable(model) -> list:
    """The kept layers and the final norm learn; embedding and head stay the draft's."""
    for p in model.parameters():
        p.requires_grad = False
    decoder = model.get_decoder()
    params = [p for layer in decoder.layers for p in layer.parameters()]
    norm = getattr(decoder, "norm", None)
    params += list(norm.parameters()) if norm is not None else []
    for p in params:
        p.requires_grad = True
    return params


@dataclass
class TrainReport:
    steps: int
    tokens: int
    seconds: float
    passes: float        # passes over the training text
    first_loss: float    # mean over the first min(20, one pass) steps, and over the last as many
    last_loss: float


def train(model, taught: list[TaughtSequence], seconds: float, max_passes: int, lr: float, seed: int, bf16: bool,
          log=lambda text: None) -> TrainReport:
    """AdamW on the soft cross-entropy, one sequence a step, until `seconds` or `max_passes` are spent."""
    import torch
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    # The softmax runs over the tokens the teacher ever ranks, not the whole vocabulary: the head is most of
    # a small draft's multiply-adds (151,936 rows against 4 layers), and mass outside the teacher's top k
    # is not scored anyway. A cut vocabulary (cut-vocab) is what the deployed draft scores too.
    vocab = np.unique(np.concatenate([seq.top_ids.reshape(-1) for seq in taught]))
    rows = torch.from_numpy(vocab.astype(np.int64))
    weight = head.weight.detach()[rows]
    bias = None if getattr(head, "bias", None) is None else head.bias.detach()[rows]
    columns = [torch.from_numpy(np.searchsorted(vocab, seq.top_ids[:-1]).astype(np.int64)) for seq in taught]
    model.train()
    start, steps, tokens, losses = time.perf_counter(), 0, 0, []
    order: list[int] = []
    while steps < max_passes * len(taught) and time.perf_counter() - start < seconds:
        if not order:
            order = list(rng.permutation(len(taught)))
        index = order.pop()
        seq = taught[index]
        with autocast(bf16):
            hidden = decoder(input_ids=torch.from_numpy(seq.ids)[None], use_cache=False).last_hidden_state
            logits = torch.nn.functional.linear(hidden[0, :-1], weight, bias).float()
        logq = torch.log_softmax(logits, -1)
        teacher = torch.softmax(torch.from_numpy(seq.top_logprobs[:-1].astype(np.float32)), -1)
        loss = -(teacher * logq.gather(-1, columns[index])).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps, tokens = steps + 1, tokens + len(seq.ids)
        losses.append(loss.item())
        if steps % 20 == 0:
            log(f"{steps} steps, loss {np.mean(losses[-20:]):.3f}, "
                f"{tokens / (time.perf_counter() - start):.0f} tokens/s")
    model.eval()
    window = max(1, min(20, len(taught)))   # at most one pass: the first and last windows are different steps
    return TrainReport(steps, tokens, time.perf_counter() - start, steps / max(len(taught), 1),
                       float(np.mean(losses[:window])) if losses else float("nan"),
                       float(np.mean(losses[-window:])) if losses else float("nan"))
