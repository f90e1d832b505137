"""Parity rows of `mirror-deploy check`: every exported graph against PyTorch on random tokens, driven through
the KV caches the way decoding drives it (prefill, chunked decode, tree-masked draft branches, padded
static calls). fp32 graphs are held to a bound that scales with the logits; quantized ones to top-1
agreement and KL."""
from __future__ import annotations

import numpy as np

from ..artifact import Manifest
from .report import CheckReport
from ..decoding.drive import DraftDriver, TargetDriver
from ..errors import MirrorDeployError
from ..reference import Reference
from ..runtimes.kv import COMMITTED
from ..runtimes.loader import target_graph_names, target_graphs

# fp32 drift grows with the size of the logits: a 30-layer real model whose logits reach tens drifts by
# ~1e-4 between PyTorch and a runtime, a tiny random one by ~1e-6. The limit is the larger of an absolute
# floor and a fraction of the largest reference logit; a broken graph misses it by orders of magnitude.
ATOL = 1e-4
RTOL = 5e-5   # the real 0.5B draft on ORT drifted 4.2e-4 with logits up to 17 (2.5e-5 relative)
# A compressed draft cannot match to 1e-4; it must still be the same model. A broken graph agrees with
# the reference on about 1/vocab of the rows, a faithful compressed one on nearly all.
# Measured on the real pair, random-token rows: the 0.5B draft with int4 weights (and int8 activations)
# agrees with fp32 on 56% (KL 0.38 nats); an int4 exit head at layer 10 of 28, where the logit lens is
# flat, on 61%. A broken graph agrees on ~1/vocab (0.0007%), so these bounds still catch one.
TOP1_MIN = {"fp16": 0.98, "int8": 0.75, "int4": 0.40, "gguf": 0.75}   # gguf: the reference is its own
# dequantized weights, so only the int8 activations differ (as for int8)
DRAFT_GRAPHS = ("draft", "draft_stateful", "draft_static")


def parity_names(m: Manifest) -> list[str]:
    return ["target", *(f"exit@{layer}" for layer in m.exit_layers)] + [g for g in DRAFT_GRAPHS if g in m.graphs]


def check_parity(m: Manifest, graphs: dict, report: CheckReport, atol: float, seed: int) -> None:
    try:
        ref = Reference.load(m)
    except MirrorDeployError as err:
        for name in parity_names(m):
            report.fail("parity", name, err)
        return
    rng = np.random.default_rng(seed)
    vocab = m.target["vocab_size"]
    if all(g in graphs for g in target_graph_names(m)):
        _guard(report, "parity logits", "target",
               lambda: _target_parity(m, graphs, ref, rng, vocab, report, atol))
    else:
        report.skip("parity logits", "target", "not run: a target graph did not load")
    for name in DRAFT_GRAPHS:
        if name in graphs:
            _guard(report, "parity logits", name, lambda: _draft_parity(m, name, graphs[name], ref, rng,
                                                                              vocab, report, atol))
        elif name in m.graphs:
            report.skip("parity", name, "not run: graph did not load")


def _guard(report, check, graph, fn) -> None:
    try:
        fn()
    except Exception as err:  # a crash mid-comparison is a failed check, reported, not a traceback
        report.add(check, graph, False, f"{type(err).__name__}: {err}")


def _fit(chunks: list[int], room: int) -> list[int]:
    """Shrink the prefill so the schedule fits the KV capacity."""
    extra = sum(chunks[1:])
    return [max(1, min(chunks[0], room - extra)), *chunks[1:]] if room > extra else [room]


def _side_by_side(step, reference_step, ids, chunks) -> tuple[list, list]:
    """Feed the same consecutive chunks of `ids` to the graph under test and to the reference."""
    got, want, at = [], [], 0
    for size in chunks:
        got.append(step(ids[at:at + size]))
        want.append(reference_step(ids[at:at + size]))
        at += size
    return got, want


def _target_parity(m: Manifest, graphs, ref: Reference, rng, vocab, report, atol) -> None:
    """The composed target at its default exit layer against HF logits, then the early exit at every
    exported exit layer against the logit lens there (same windows, fresh KV each time)."""
    chunks = _fit([11, m.gamma + 1, 1, m.gamma + 1], m.max_context)
    ids = rng.integers(0, vocab, sum(chunks))
    reference = ref.target_graphs()
    note = f"segments + head, {len(ids)} tokens in windows {'+'.join(map(str, chunks))}"
    for layer in m.exit_layers:
        run = TargetDriver.for_manifest(target_graphs(m, graphs), m, layer)
        default = layer == m.exit_layer   # the composed logits are compared once, at the default split
        mirror = TargetDriver.for_manifest(target_graphs(m, reference), m, layer).window if default \
            else (lambda chunk: None)
        got, wrap = _side_by_side(run.window, mirror, ids, chunks)
        cat = {k: np.concatenate([g[k] for g in got]) for k in got[0]}
        if default:
            _logits_row(report, "parity logits", "target", cat["logits"],
                        np.concatenate([w["logits"] for w in wrap]), ref.target_logits(ids),
                        m.target_weights, atol, note + f", exit at {layer}")
        _exit_row(m, report, layer, cat, ref.logit_lens(ids, layer), atol)
    _adapter_rows(m, graphs, report, rng, atol)


def _adapter_rows(m: Manifest, graphs, report, rng, atol) -> None:
    """Each learned exit's ONNX graph against the translator weights it was exported from."""
    import torch

    from ..tuning.attach import weights_file
    from ..tuning.translator import load_translators
    names = [k for k in m.graphs if k.startswith("exit_adapter_")]
    if not names:
        return
    weights = weights_file(m)
    translators = load_translators(report.folder / weights)
    for name in names:
        layer = m.graphs[name].layers[0]
        hidden = rng.standard_normal((1, 5, m.target["hidden_size"])).astype(np.float32) * 3
        got = graphs[name].run({"hidden_states": hidden})["adapted"]
        with torch.no_grad():
            want = translators[layer](torch.from_numpy(hidden)).numpy()
        err, limit = float(np.abs(got - want).max()), fp32_limit(want, atol)
        report.add("parity learned exit", name, err <= limit,
                   f"ONNX vs the translator in {weights} on 5 random rows", err, f"≤ {limit:.1e}")


def _exit_row(m: Manifest, report, layer: int, cat: dict, lens: np.ndarray, atol: float) -> None:
    atol = fp32_limit(lens, atol)
    order = np.argsort(-lens, axis=-1, kind="stable")[:, :m.kappa]
    differ = cat["exit_ids"] != order
    chosen = np.take_along_axis(lens, cat["exit_ids"], -1)
    ties = differ & (np.abs(chosen - np.take_along_axis(lens, order, -1)) <= atol)  # reordered near-ties
    lp_err = float(np.abs(cat["exit_logprobs"] - chosen).max())
    wrong = int(differ.sum() - ties.sum())
    detail = (f"ids vs logit lens on hidden_states[{layer}]: {differ.size - wrong}/{differ.size} equal"
              + (f" ({int(ties.sum())} near-tie swaps)" if ties.any() else "") + f"; log-probs {lp_err:.1e}")
    head = m.graphs["exit_head"].weights if "exit_head" in m.graphs else m.target_weights
    if head != "fp32":
        # A quantized head is judged by whether the fp32 logit lens's top token is inside its top-κ: the
        # exit only ranks branches, and at a middle layer the lens is flat, so its top-1 alone is a coin
        # toss among near-ties (measured on the real int4 pair, random tokens: top-1 agreement 25-29% at
        # layer 18 of 28, 50-64% at 10/14/22). A broken graph has the lens's top token in its top-κ on
        # about κ/vocab of the rows.
        agree = float((cat["exit_ids"][:, 0] == order[:, 0]).mean())
        inside = float((cat["exit_ids"] == order[:, :1]).any(axis=1).mean())
        report.add("parity top-κ", f"exit@{layer}", inside >= TOP1_MIN[head],
                   f"{head} head, so compared with the fp32 logit lens: its top-1 inside the top-{m.kappa} on "
                   f"{inside:.1%}, top-1 agreement {agree:.1%}; {detail}", lp_err,
                   f"lens top-1 in top-κ ≥ {TOP1_MIN[head]:.0%}")
        return
    report.add("parity top-κ", f"exit@{layer}", wrong == 0 and lp_err <= atol, detail, lp_err,
               f"≤ {atol:.1e} (scaled like the logits)")


def _tree(width: int, rng, vocab: int) -> tuple[list[int], list[int]]:
    """Branches A and B from the committed prefix and, where the width allows, C forking off A's
    first token (so one call holds a real tree); one row is left free (width ≥ 3) so a static call
    also carries padding. Parents are indices within the call, -1 meaning the committed prefix."""
    budget = width - 1 if width >= 3 else width
    fork = budget // 4
    b = (budget - fork) // 2
    parents: list[int] = []

    def chain(root: int, length: int) -> None:
        for j in range(length):
            parents.append(root if j == 0 else len(parents) - 1)

    chain(-1, budget - fork - b), chain(-1, b), chain(0, fork)
    return [int(t) for t in rng.integers(0, vocab, len(parents))], parents


def _path(parents, j) -> list[int]:
    """Indices from the branch root down to j."""
    path = []
    while j >= 0:
        path.append(j)
        j = parents[j]
    return path[::-1]


def _draft_parity(m: Manifest, name: str, graph, ref: Reference, rng, vocab, report, atol) -> None:
    static = m.graphs[name].static
    run = DraftDriver.for_manifest(graph, m)
    mirror = DraftDriver.for_manifest(ref.draft_graph(static=static), m)
    chunks = _fit([11, 1, m.gamma], m.max_context - m.branch_batch - 1)
    ids = rng.integers(0, vocab, sum(chunks))
    got, wrap = _side_by_side(run.commit, mirror.commit, ids, chunks)
    tokens, parents = _tree(m.branch_batch + 1, rng, vocab)
    slots = [COMMITTED if p < 0 else run.call_slot(p) for p in parents]
    got.append(run.call(tokens, slots)[0])
    wrap.append(mirror.call(tokens, slots)[0])
    want = np.empty_like(got[-1])
    leaves = [j for j in range(len(tokens)) if j not in parents]
    for leaf in leaves:  # one forward per branch gives every node on it
        path = _path(parents, leaf)
        want[path] = ref.draft_logits([*ids, *(tokens[j] for j in path)])[-len(path):]
    hf = [ref.draft_logits(ids), want]
    got, wrap, hf = np.concatenate(got), np.concatenate(wrap), np.concatenate(hf)
    branches = len(leaves)
    cut = getattr(graph, "vocab_ids", None)
    if cut is not None:   # a cut head scores V columns: compare those (its -inf elsewhere is by design)
        got, wrap, hf = got[:, cut], wrap[:, cut], hf[:, cut]
    note = (f"{len(ids)} committed ({'+'.join(map(str, chunks))}), {branches}-branch tree of {len(tokens)}"
            + (f" padded to {run.static_seq}" if static else "")
            + (f"; head cut to {len(cut)} tokens, compared there" if cut is not None else ""))
    _logits_row(report, "parity logits", name, got, wrap, hf, m.graphs[name].weights, atol, note)


def fp32_limit(reference: np.ndarray, atol: float) -> float:
    """The fp32 tolerance for values on the scale of `reference` (see RTOL)."""
    return max(atol, RTOL * float(np.abs(reference).max()))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def mean_kl(reference: np.ndarray, got: np.ndarray) -> float:
    """Mean over rows of KL(softmax(reference) ‖ softmax(got)), in nats."""
    p, q = _log_softmax(reference), _log_softmax(got)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def _logits_row(report, check, name, got, wrap, hf, weights: str, atol: float, note: str) -> None:
    e_hf, e_wrap = float(np.abs(got - hf).max()), float(np.abs(got - wrap).max())
    agree = float((got.argmax(-1) == hf.argmax(-1)).mean())
    errors = f"vs HF {e_hf:.1e}, vs wrapper {e_wrap:.1e}; top-1 {agree:.1%}, KL {mean_kl(hf, got):.1e} nats"
    if weights == "fp32":
        worst, limit = max(e_hf, e_wrap), fp32_limit(hf, atol)
        report.add(check, name, worst <= limit, f"{note}; {errors}", worst,
                   f"≤ {limit:.1e} = max({atol:.0e}, {RTOL:.0e}·max|logit| {np.abs(hf).max():.1f})")
        return
    need = TOP1_MIN[weights]
    report.add(check, name, agree >= need,
               f"{weights} weights, so top-1 agreement and KL instead of an fp32 bound; {note}; {errors}",
               e_hf, f"top-1 ≥ {need:.0%}")
