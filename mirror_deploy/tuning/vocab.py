"""`mirror-deploy cut-vocab DIR` (and `tune --draft-vocab`): choose V, the draft head's vocabulary, by
measurement, and cut it into the artifact's OpenVINO draft graphs (export/vocab_cut.py; FR-Spec).

1. The ranking: token counts over the calibration text (every counted prompt, plus the deployed target's
   greedy continuations of 12 of them), plus the draft's own expected counts there (the sum of
   its softmax rows, which spreads mass to tokens that fit the same contexts), ties broken by token id
   (BPE ids follow merge order, a frequency order of the tokenizer's own corpus).
2. Held-out prompts (one per category, never counted): the target's continuation, the share of its
   tokens inside the top V (coverage), and the draft's greedy agreement with it restricted to the top V
   (acceptance per token), for each candidate V.
3. Cost: each candidate cut compiled on the profile's draft device and timed at width 1, interleaved
   with the target's γ+1-row window, so the choice is the V with the best predicted SD rate
   E[tokens per window] / (γ·draft call + window).
4. The cut graphs, the id file and the manifest are written under new names, the manifest replaced
   last, then the old files removed: an interruption leaves the artifact as it was.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..artifact import Manifest, read_manifest, sha256_file
from ..decoding.config import GenerationConfig
from ..decoding.drive import DraftDriver
from ..decoding.engine import Engine
from ..errors import MirrorDeployError
from ..learned_draft import trained_prompts
from ..export.openvino_ir import ir_io
from ..export.shapes import DRAFT_TOP_M
from ..export.vocab_cut import cut_draft_ir
from ..runtimes.loader import draft_graph_name, draft_vocab_ids
from .calibration import prompt_sha256
from .prompts import pick, read_prompts
from .store import replace_manifest

CANDIDATES = (4096, 8192, 16384, 32768, 65536)
MIN_VOCAB_TO_CUT = 16384   # below this the head is a small share of the draft; `auto` leaves it whole
MIN_SIZE = DRAFT_TOP_M     # the draft graph's own top-m must fit inside V


@dataclass
class VocabOptions:
    size: str = "auto"          # auto | full | a number of tokens
    heldout: int = 6            # held-out prompts (one per category first)
    continued: int = 12         # counted prompts the target also continues (the rest count as text)
    new_tokens: int = 32        # target continuation tokens per prompt
    rounds: int = 5             # interleaved timing rounds (medians)
    seed: int = 0
    calibration: Path | None = None


@dataclass
class Candidate:
    size: int
    coverage: float             # held-out target tokens inside the top V
    acceptance: float           # draft greedy = target token, restricted to the top V (held out)
    draft_ms: float = 0.0       # width-1 draft call
    predicted_sd: float = 0.0   # tokens per ms of an SD window (relative)


@dataclass
class VocabChoice:
    size: int | None            # None: the head stays whole
    candidates: list[Candidate] = field(default_factory=list)
    window_ms: float = 0.0
    counted_tokens: int = 0
    heldout_tokens: int = 0


def _sizes(opts: VocabOptions, vocab: int, current: int) -> list[int]:
    if opts.size == "full":
        return []
    if opts.size == "auto":
        return [v for v in CANDIDATES if v < current] if vocab >= MIN_VOCAB_TO_CUT else []
    try:
        size = int(opts.size)
    except ValueError:
        raise MirrorDeployError(f"--size {opts.size!r} is not auto, full or a number of tokens",
                                "use e.g. --size 32768 or --size auto") from None
    if not MIN_SIZE <= size <= current:
        held = "the vocabulary" if current == vocab else f"the draft's head (cut to {current} tokens already)"
        raise MirrorDeployError(f"--size {size} is outside [{MIN_SIZE}, {current}]: the draft returns its top "
                                f"{MIN_SIZE} tokens, and {held} holds {current}",
                                f"use a size of at most {current}" + ("" if current == vocab else
                                                                      ", or re-export to widen the head"))
    return [size]


def _cuttable(manifest: Manifest) -> list[str]:
    return [g for g in ("draft_stateful", "draft_static") if g in manifest.graphs]


def _sequences(engine: Engine, prompts, new_tokens: int, chat: bool) -> list[tuple[list[int], int]]:
    cfg = GenerationConfig(max_new_tokens=new_tokens, mode="ar", stop_at_eos=False)
    out = []
    for p in prompts:
        ids = engine.encode(p.prompt, chat)
        if len(ids) + new_tokens + 2 > engine.manifest.max_context:
            continue
        out.append((ids + engine.generate(ids, cfg).tokens, len(ids)))
    return out


def _draft_logits(engine: Engine, tokens: list[int]) -> np.ndarray:
    engine.draft.reset()
    logits = DraftDriver(engine.draft).commit(tokens[:-1])
    engine.draft.reset()
    return logits


def rank_tokens(engine: Engine, texts: list[list[int]], vocab: int, allowed: np.ndarray | None) -> np.ndarray:
    """Every allowed token id, most frequent first (see the module docstring)."""
    score = np.zeros(vocab)
    for tokens in texts:
        score += np.bincount(tokens, minlength=vocab)
        logits = _draft_logits(engine, tokens)
        for at in range(0, len(logits), 64):   # float64 softmax in slices: a real vocabulary is large
            rows = logits[at:at + 64].astype(np.float64)
            probs = np.exp(rows - rows.max(axis=1, keepdims=True))
            score += (probs / probs.sum(axis=1, keepdims=True)).sum(axis=0)
    order = np.lexsort((np.arange(vocab), -score))
    if allowed is not None:
        order = order[np.isin(order, allowed)]
    return order


def heldout_rates(engine: Engine, sequences, ranking: np.ndarray, sizes: list[int]) -> dict[int, tuple[float, float]]:
    """V -> (coverage, acceptance) over the held-out continuations; key 0 is the whole head."""
    position = np.full(engine.manifest.draft["vocab_size"], len(ranking), np.int64)
    position[ranking] = np.arange(len(ranking))
    hits = {v: [] for v in (0, *sizes)}
    cover = {v: [] for v in sizes}
    for tokens, prompt_len in sequences:
        logits = _draft_logits(engine, tokens)[prompt_len - 1:]
        target = np.asarray(tokens[prompt_len:])
        hits[0].append(logits.argmax(axis=1) == target)
        for v in sizes:
            kept = ranking[:v]
            hits[v].append(kept[logits[:, kept].argmax(axis=1)] == target)
            cover[v].append(position[target] < v)
    rate = {v: float(np.concatenate(h).mean()) for v, h in hits.items()}
    return {0: (1.0, rate[0]), **{v: (float(np.concatenate(cover[v]).mean()), rate[v]) for v in sizes}}


def _timed_candidates(engine: Engine, manifest: Manifest, ranking, sizes, opts: VocabOptions, scratch: Path):
    """Median ms of a width-1 call of each cut (and the current head), and of the target's γ+1 window."""
    from ..timing import draft_call_items, interleaved, target_items
    from ..runtimes.loader import open_graph
    from ..decoding.draft import DraftRunner

    name = draft_graph_name(manifest, engine.profile)
    current = engine.draft.vocab_ids
    rng = np.random.default_rng(opts.seed)
    context = min(256, manifest.max_context // 2)
    items = target_items(engine, context, (manifest.gamma + 1,), rng)
    items.update(draft_call_items(engine.draft, manifest.draft["vocab_size"], context, (1,), rng, "head 0"))
    for v in sizes:
        xml = cut_draft_ir(engine.folder / manifest.graphs[name].file, scratch / f"cut{v}.xml",
                           *_rows_and_ids(ranking[:v], current))
        graph = open_graph(scratch, _renamed(manifest, name, xml), name, engine.profile.draft, "draft")
        graph.vocab_ids = ranking[:v]
        items.update(draft_call_items(DraftRunner(graph, manifest), manifest.draft["vocab_size"], context, (1,),
                                      rng, f"head {v}"))
    ms = {k: t * 1e3 for k, t in interleaved(items, opts.rounds).items()}
    return ms[f"target step × {manifest.gamma + 1}"], {v: ms[f"head {v} × 1"] for v in (0, *sizes)}


def _renamed(manifest: Manifest, name: str, xml: Path) -> Manifest:
    from copy import deepcopy
    m = deepcopy(manifest)
    m.graphs[name].file = xml.name
    return m


def _rows_and_ids(ids: np.ndarray, current: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the graph's current head that hold `ids` (the head may be cut already)."""
    if current is None:
        return ids, ids
    where = {int(t): i for i, t in enumerate(current)}
    return np.array([where[int(t)] for t in ids], np.int64), ids


def sd_rate(acceptance: float, gamma: int, draft_ms: float, window_ms: float) -> float:
    """Tokens per ms of an SD window of γ with per-token acceptance `acceptance` (independent tokens)."""
    expected = sum(acceptance ** k for k in range(gamma + 1))
    return expected / (gamma * draft_ms + window_ms)


def choose_vocab(engine: Engine, opts: VocabOptions, console=None) -> tuple[VocabChoice, np.ndarray]:
    """Measure and choose; returns the choice and the ranking (allowed ids, most frequent first)."""
    m = engine.manifest
    if not m.has_draft or engine.draft is None:
        raise MirrorDeployError(f"{engine.folder} is a target-only artifact: there is no draft head to cut",
                                "export with --draft to use a draft model")
    name = draft_graph_name(m, engine.profile)
    if name not in _cuttable(m):
        raise MirrorDeployError(f"profile {engine.profile.name} runs {name} on {engine.profile.draft.backend}; the "
                                "vocabulary cut applies to the OpenVINO drafts (draft_stateful, draft_static)",
                                "use a profile whose draft runs on OpenVINO (e.g. --profile cpu)")
    vocab = m.draft["vocab_size"]
    current = engine.draft.vocab_ids   # the head's ids if it is cut already (runtimes/loader.with_vocab)
    sizes = _sizes(opts, vocab, vocab if current is None else len(current))
    if not sizes:
        return VocabChoice(None), np.arange(vocab)
    prompts, _ = read_prompts(opts.calibration)
    chat = bool(getattr(engine.tokenizer, "chat_template", None))
    # Held out from the prompts a learned draft did not train on, where there are enough: measured, a
    # 4-layer learned draft agreed 0.61 on a held-out set where 5 of 6 prompts had trained it, 0.20 on unseen.
    trained = trained_prompts(m)
    unseen = [p for p in prompts if prompt_sha256(p.prompt) not in trained]
    heldout = pick(unseen if len(unseen) > opts.heldout else prompts, min(opts.heldout, len(prompts) - 1), opts.seed)
    training = [p for p in prompts if p not in heldout]
    say = console.print if console else (lambda *a: None)
    continued = pick(training, min(opts.continued, len(training)), opts.seed)
    say(f"calibration: {len(training)} counted prompts ({len(continued)} continued by the target), "
        f"{len(heldout)} held out")
    # The target's continuations are the costly part (an fp32 target on one core makes ~5 tokens/s); the
    # other counted prompts add their text and the draft's expected counts over it.
    counted = _sequences(engine, continued, opts.new_tokens, chat)
    texts = [engine.encode(p.prompt, chat) for p in training if p not in continued]
    counted += [(t, None) for t in texts if 2 <= len(t) < engine.manifest.max_context - 2]
    held = _sequences(engine, heldout, opts.new_tokens, chat)
    if not held:
        raise MirrorDeployError("no held-out calibration prompt fits the artifact's KV capacity",
                                "lower --new-tokens or re-export with a larger --max-context")
    ranking = rank_tokens(engine, [t for t, _ in counted], vocab, current)
    rates = heldout_rates(engine, held, ranking, sizes)
    say(f"cost: {len(sizes)} candidate cut(s) compiled and timed against the target window")
    with tempfile.TemporaryDirectory(prefix=".cut-vocab-", dir=engine.folder) as scratch:
        window_ms, draft_ms = _timed_candidates(engine, m, ranking, sizes, opts, Path(scratch))
    whole = len(current) if current is not None else vocab
    candidates = [Candidate(whole, 1.0, rates[0][1], draft_ms[0])]
    candidates += [Candidate(v, rates[v][0], rates[v][1], draft_ms[v]) for v in sizes]
    for c in candidates:
        c.predicted_sd = sd_rate(c.acceptance, m.gamma, c.draft_ms, window_ms)
    best = max(candidates, key=lambda c: c.predicted_sd)
    if opts.size != "auto":
        best = candidates[-1]
    choice = VocabChoice(None if best is candidates[0] else best.size, candidates, window_ms,
                         sum(len(t) for t, _ in counted), sum(len(t) - n for t, n in held))
    return choice, ranking


def write_cut(folder: Path, ranking: np.ndarray, choice: VocabChoice) -> Manifest:
    """Cut every OpenVINO draft graph of the artifact to ranking[:V] and record it (see step 4)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    size = choice.size
    if size < MIN_SIZE:
        raise MirrorDeployError(f"a draft vocabulary of {size} tokens is below the draft's top-{MIN_SIZE}",
                                f"cut to at least {MIN_SIZE} tokens")
    ids = np.asarray(ranking[:size], np.int64)
    old_files = {f for g in _cuttable(manifest) for f in manifest.graphs[g].sha256}
    if manifest.draft_vocab:
        old_files.add(manifest.draft_vocab["file"])
    if manifest.draft_streams:   # trained through the old head: dropped, `learn-streams` trains them anew
        old_files |= manifest.stream_files()
        for name in manifest.draft_streams["graphs"].values():
            manifest.graphs.pop(name, None)
        manifest.draft_streams = None
    current = draft_vocab_ids(folder, manifest) if manifest.draft_vocab else None
    id_file = f"draft_vocab_{size}.npy"
    written = []
    try:
        np.save(folder / id_file, ids)
        written.append(folder / id_file)
        for name in _cuttable(manifest):
            entry = manifest.graphs[name]
            xml = cut_draft_ir(folder / entry.file, folder / f"{name}_v{size}.xml", *_rows_and_ids(ids, current))
            written += [xml, xml.with_suffix(".bin")]
            entry.file = xml.name
            entry.sha256 = {f.name: sha256_file(f) for f in (xml, xml.with_suffix(".bin"), folder / id_file)}
            entry.inputs, entry.outputs = ir_io(xml)
        by_size = {c.size: c for c in choice.candidates}
        manifest.draft_vocab = {
            "file": id_file, "size": size, "graphs": _cuttable(manifest),
            "ranking": "calibration token counts + the draft's expected counts, ties by token id",
            "counted_tokens": choice.counted_tokens, "heldout_tokens": choice.heldout_tokens,
            "heldout_coverage": by_size[size].coverage if size in by_size else None,
            "heldout_acceptance": {"whole": choice.candidates[0].acceptance if choice.candidates else None,
                                   "cut": by_size[size].acceptance if size in by_size else None},
            "candidates": [asdict(c) for c in choice.candidates], "window_ms": choice.window_ms}
        retuned = manifest.tuning is not None
        manifest.tuning = None   # its cost curves were measured with the old head
        replace_manifest(folder, manifest)
    except BaseException:
        for f in written:
            f.unlink(missing_ok=True)
        raise
    keep = {f for g in manifest.graphs.values() for f in g.sha256}
    for f in old_files - keep:
        (folder / f).unlink(missing_ok=True)
    if retuned:
        (folder / "tuning.json").unlink(missing_ok=True)
    return manifest


def cut_vocab(folder: Path, opts: VocabOptions, profile: str | None = None, console=None) -> VocabChoice:
    engine = Engine(folder, profile)
    try:
        choice, ranking = choose_vocab(engine, opts, console)
    finally:
        engine.target.close()
    if choice.size is not None:
        had_streams = bool(engine.manifest.draft_streams)
        write_cut(Path(folder), ranking, choice)
        if had_streams and console is not None:
            console.print("[yellow]note:[/] the draft's speculative streams were trained through the old head and "
                          "were removed; run `mirror-deploy learn-streams` again")
    return choice


def print_choice(choice: VocabChoice, console) -> None:
    from rich.table import Table

    if not choice.candidates:
        console.print("draft vocabulary left whole (nothing to cut: --size full, or a small vocabulary)")
        return
    table = Table(title=f"draft head vocabulary (held-out: {choice.heldout_tokens} target tokens; target window "
                        f"{choice.window_ms:.2f} ms)")
    for col in ("V", "coverage", "draft = target", "draft call ms", "÷ whole head", "predicted SD ÷ whole"):
        table.add_column(col, justify="right")
    base = choice.candidates[0]
    for c in choice.candidates:
        mark = " ◀" if c.size == choice.size or (choice.size is None and c is base) else ""
        table.add_row(f"{c.size}{mark}", f"{c.coverage:.2%}", f"{c.acceptance:.2%}", f"{c.draft_ms:.2f}",
                      f"{c.draft_ms / base.draft_ms:.2f}×", f"{c.predicted_sd / base.predicted_sd:.2f}×")
    console.print(table)
    console.print(f"chosen: {'whole head' if choice.size is None else f'V = {choice.size}'}")
