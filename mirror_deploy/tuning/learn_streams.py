"""`mirror-deploy learn-streams ART`: train speculative streams for the artifact's draft and compile them in.

1. Text: the target's own greedy continuations of the calibration prompts (what the draft must predict
   while decoding; cached per checkpoint, like the learned exit's), plus `--tokens` of code from the
   Python standard library's own source, present wherever Python is (the block learns from the draft's
   distribution, so any text teaches it; the coder pair reads code).
2. The draft's head input over all of it (one pass per sequence, PyTorch, from the checkpoint the
   artifact was exported from), then the block (tuning/streams.py), the held-out acceptance per window
   position measured on calibration sequences it did not train on.
3. Every OpenVINO draft graph gets a `<name>_streams` variant (export/draft_streams.py); the block's
   weights, the acceptance, the training text's digest and a timed call ratio (one streamed call ÷ one
   plain call, medians of interleaved calls here) go into the manifest's `draft_streams`. Written under
   new names, the manifest replaced last: an interrupted run leaves the artifact as it was.
Runs take streams with `--streams` (or GenerationConfig(streams=True)); `tune` measures whether they pay.
"""
from __future__ import annotations

import os
import sysconfig
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..artifact import GraphEntry, read_manifest, sha256_file
from ..errors import MirrorDeployError
from .store import replace_manifest

STREAMED_GRAPHS = ("draft_stateful", "draft_static")


def code_sequences(tokenizer, tokens: int, length: int = 256, seed: int = 0) -> list:
    """`tokens` of the Python standard library's source in `length`-token pieces (a seeded pick of files,
    every fourth piece of each, so many files are seen)."""
    import random

    from .calibration import CalibrationSequence
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    random.Random(seed).shuffle(files)
    pieces, total = [], 0
    for path in files:
        if total >= tokens:
            break
        ids = tokenizer(path.read_text(encoding="utf-8", errors="ignore"))["input_ids"]
        for start in range(0, len(ids) - length, 4 * length):
            pieces.append(CalibrationSequence("code", tuple(ids[start:start + length]), 1))
            total += length
            if total >= tokens:
                break
    return pieces


def _head_ids(folder: Path, manifest) -> np.ndarray:
    from ..runtimes.loader import draft_vocab_ids
    if manifest.draft_vocab:
        return draft_vocab_ids(folder, manifest)
    return np.arange(manifest.draft["vocab_size"], dtype=np.int64)


def train(folder: Path, manifest, config, prompts, new_tokens: int, code_tokens: int, progress):
    """The block and its report, from the checkpoints the artifact names."""
    import torch

    from ..export.loading import open_source
    from ..reference import open_recorded
    from .calibration import cached_sequences, load_prompts, prompt_sha256
    from .streams import draft_features, train_streams

    prompt_set = load_prompts(prompts)
    # The draft the artifact was exported from, unchanged: streams trained on another draft would be
    # compiled into this one's graphs. The target only writes training text (cached per checkpoint).
    target = open_source(manifest.target["path"], "target")
    draft = open_recorded(manifest, "draft", "learn-streams", alternative="")
    torch.manual_seed(config.seed)
    with progress("target continuations of the calibration prompts"):
        tokenizer = target.load_tokenizer()
        if tokenizer is None:
            raise MirrorDeployError(f"{target.path} has no tokenizer", "export from a checkpoint saved with its tokenizer")
        sequences = cached_sequences(target.path, target.load_model, tokenizer, prompt_set, new_tokens)
        target.release()
    code = code_sequences(tokenizer, code_tokens, seed=config.seed) if code_tokens else []
    with progress(f"the draft over {len(sequences)} calibration and {len(code)} code sequences",
                  len(sequences) + len(code)) as advance:
        model = draft.load_model()
        calibration = draft_features(model, sequences, advance)
        extra = draft_features(model, code, advance) if code else None
        embedding = model.get_input_embeddings().weight.detach().float().clone()
        head_ids = _head_ids(folder, manifest)
        head = model.get_output_embeddings().weight.detach().float()[torch.from_numpy(head_ids)].clone()
        del model
        draft.release()   # the decoder's weights go before training: only the head and embedding stay
    with progress(f"training {config.streams} stream(s)", config.epochs) as advance:
        block, report = train_streams(calibration, embedding, head, head_ids, config, extra=extra,
                                      log=lambda text: advance(description=f"training {config.streams} stream(s), {text.strip()}"))
    trained = sorted({prompt_sha256(p.text) for p in prompt_set})
    return block, report, trained


def call_ratio(folder: Path, manifest, rounds: int = 15) -> float:
    """Median ms of a one-token call of the streamed graph ÷ the plain graph's, interleaved, on the
    artifact's own profile (the figure the policy scales draft costs by)."""
    from ..timing import draft_call_items, interleaved
    from ..decoding.draft import DraftRunner
    from ..runtimes.loader import open_draft
    from ..targets import Profile
    profile = Profile.from_dict(manifest.profile)
    rng = np.random.default_rng(0)
    context = min(128, manifest.max_context // 2)
    items = {}
    for label, streams in (("plain", False), ("streams", True)):
        runner = DraftRunner(open_draft(folder, manifest, profile, streams), manifest)
        items.update(draft_call_items(runner, manifest.draft["vocab_size"], context, (1,), rng, label))
    ms = interleaved(items, rounds)
    return float(ms["streams × 1"] / ms["plain × 1"])


def streamed_graphs(manifest) -> list[str]:
    """The artifact's OpenVINO draft graphs, which take streams; refused where there are none."""
    names = [n for n in STREAMED_GRAPHS if n in manifest.graphs]
    if not names:
        raise MirrorDeployError("this artifact's draft runs on ONNX Runtime only (draft.onnx); streams are "
                                "compiled into OpenVINO drafts", "re-export with an OpenVINO draft profile (cpu, npu)")
    return names


def write_streams(folder: Path, manifest, block, report, trained_on: list[str], code_tokens: int) -> list[str]:
    """Add a streams variant of every OpenVINO draft graph and record them; returns the graphs added.
    New files are named by the block's weights, so a second run never writes over the files the current
    manifest hashes: until the manifest is replaced, the artifact is the old one, whole."""
    import hashlib
    import tempfile

    from ..export.draft_streams import streams_draft_ir
    from ..export.openvino_ir import ir_io
    names = streamed_graphs(manifest)
    old = manifest.stream_files()
    for name in names:
        manifest.graphs.pop(f"{name}_streams", None)
    arrays = block.arrays()
    tag = hashlib.sha256(b"".join(a.tobytes() for a in arrays.values())).hexdigest()[:8]
    written = []
    try:
        weights = folder / f"draft_streams_{tag}.npz"
        if weights.name not in old:    # else: these very weights, hashed by the current manifest
            tmp = Path(tempfile.mkstemp(prefix=".streams-", suffix=".npz", dir=folder)[1])
            written.append(tmp)
            np.savez(tmp, **arrays)
            os.replace(tmp, weights)
            written[-1] = weights
        vocab_ids = _head_ids(folder, manifest) if manifest.draft_vocab else None
        staged = {}
        for name in names:
            entry = manifest.graphs[name]
            xml = folder / f"{Path(entry.file).stem}_s{report.streams}_{tag}.xml"
            if not {xml.name, xml.with_suffix(".bin").name} <= old:
                written += [xml, xml.with_suffix(".bin")]
                streams_draft_ir(folder / entry.file, xml, arrays["w_in"], arrays["w_out"], report.streams, vocab_ids)
            staged[name] = xml
        for name, xml in staged.items():
            base = manifest.graphs[name]
            inputs, outputs = ir_io(xml)
            sha = {f.name: sha256_file(f) for f in (xml, xml.with_suffix(".bin"), weights)}
            if manifest.vocab_cut(name):
                sha[manifest.draft_vocab["file"]] = base.sha256[manifest.draft_vocab["file"]]
            manifest.graphs[f"{name}_streams"] = GraphEntry(file=xml.name, format=base.format, sha256=sha,
                                                             inputs=inputs, outputs=outputs, layers=list(base.layers),
                                                             static=base.static, weights=base.weights)
            if manifest.vocab_cut(name):
                manifest.draft_vocab["graphs"] = sorted({*manifest.draft_vocab["graphs"], f"{name}_streams"})
        manifest.draft_streams = {
            "streams": report.streams, "file": weights.name, "graphs": {n: f"{n}_streams" for n in names},
            "acceptance": report.acceptance, "draft_second": report.draft_second,
            "train_rows": report.train_rows, "held_out_rows": report.held_out_rows, "code_tokens": code_tokens,
            "trained_on": trained_on, "train_seconds": report.train_seconds, "call_ratio": None}
        replace_manifest(folder, manifest)
    except BaseException:
        for f in written:
            if f.name not in old:
                f.unlink(missing_ok=True)
        raise
    keep = {f for g in manifest.graphs.values() for f in g.sha256}
    for f in old - keep:
        (folder / f).unlink(missing_ok=True)
    return names


def learn_streams(folder: Path, config, prompts: Path | None, new_tokens: int, code_tokens: int, console) -> dict:
    from .progress import phase_bars

    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest.has_draft:
        raise MirrorDeployError(f"{folder} is a target-only artifact: streams are the draft's",
                                "re-export with `mirror-deploy export TARGET --draft DRAFT`")
    streamed_graphs(manifest)   # refused before any training
    start = time.perf_counter()
    with phase_bars(console) as progress:
        block, report, trained = train(folder, manifest, config, prompts, new_tokens, code_tokens, progress)
        with progress("compiling the streams into the draft graphs"):
            names = write_streams(folder, manifest, block, report, trained, code_tokens)
        with progress("timing a streamed draft call against a plain one"):
            manifest = read_manifest(folder)
            try:
                manifest.draft_streams["call_ratio"] = call_ratio(folder, manifest)
            except MirrorDeployError as err:   # the profile's draft device is not on this machine
                console.print(f"[yellow]note:[/] streamed call not timed here ({err}); runs assume it costs "
                              "what a plain call does until `tune` measures it")
            replace_manifest(folder, manifest)
    summary = {**asdict(report), "call_ratio": manifest.draft_streams["call_ratio"],
               "seconds": time.perf_counter() - start, "graphs": names}
    return summary
