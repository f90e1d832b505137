"""`mirror-deploy learn-draft TARGET DRAFT OUT --layers L`: a draft a fraction of the size of DRAFT, taught
by TARGET, written as a checkpoint folder that `export --draft OUT` deploys like any other draft.

1. Text: the target's greedy continuations of the calibration prompts (what a draft must predict while
   decoding; cached per checkpoint, as the learned exit's), plus code from the Python standard library.
   A quarter of each category's calibration sequences is held out.
2. The teacher: one target pass over every sequence, its top-k log-probs kept (tuning/distill.py).
3. The student: DRAFT cut to L layers (the first L-1 and the last), then trained for `--minutes`.
4. OUT gets the student's weights and config, the tokenizer, and `learned_draft.json`: the target it was
   taught by (its weights' sha256, which `export` and the runtime loader check), the layers kept, and the
   held-out agreement of the full draft, the cut before training, and the learned draft.
Written in a folder beside OUT and moved into place at the end: an interrupted run leaves OUT as it was.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import MirrorDeployError
from ..learned_draft import FORMAT, PROVENANCE, read_provenance

HELD_OUT = 0.25   # share of each category's calibration sequences held out


def _save(model, tokenizer, folder: Path, record: dict) -> None:
    model.config.__dict__.pop("quantization_config", None)   # a GGUF-loaded draft is dense once loaded
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / PROVENANCE).write_text(json.dumps(record, indent=1) + "\n")


def learn_draft(target_path: Path, draft_path: Path, out: Path, layers: int, minutes: float, prompts: Path | None,
                new_tokens: int, code_tokens: int, seed: int, console, max_passes: int = 100,
                lr: float = 1e-4) -> dict:
    import torch
    from ..export.loading import open_source
    from ..export.pipeline import same_vocabulary, staging_folder
    from .calibration import cached_sequences, load_prompts, prompt_sha256
    from .distill import agreement, bf16_native, cut_layers, default_keep, teach, train
    from .learn_streams import code_sequences
    from .progress import phase_bars
    from .streams import split_by_category

    out = Path(out).expanduser()
    if minutes <= 0:
        raise MirrorDeployError(f"--minutes {minutes} is not positive", "give the training time, e.g. --minutes 10")
    target, draft = open_source(target_path, "target"), open_source(draft_path, "draft")
    keep = default_keep(draft.shape.num_layers, layers)
    if read_provenance(draft.path):
        raise MirrorDeployError(f"{draft.path} is itself a learned draft", "cut from the draft it was learned from")
    tokenizer = target.load_tokenizer()
    if tokenizer is None:
        raise MirrorDeployError(f"{target.path} has no tokenizer", "use a checkpoint saved with its tokenizer")
    same_vocabulary(target, draft, tokenizer)
    prompt_set = load_prompts(prompts)
    train_at, held_at = split_by_category([p.category for p in prompt_set], HELD_OUT, seed)
    if not held_at:
        counts = {c: sum(p.category == c for p in prompt_set) for c in {p.category for p in prompt_set}}
        raise MirrorDeployError(f"the calibration prompts ({counts} by category) are too few to hold a quarter of "
                                "a category out, so none is held out to measure the learned draft on",
                                "give at least 4 prompts of one category")
    bf16 = bf16_native()
    torch.manual_seed(seed)
    start = time.perf_counter()
    with phase_bars(console) as progress:
        with progress("the target's continuations of the calibration prompts (cached)"):
            sequences = cached_sequences(target.path, target.load_model, tokenizer, prompt_set, new_tokens)
        train_seqs, held = [sequences[i] for i in train_at], [sequences[i] for i in held_at]
        train_seqs += code_sequences(tokenizer, code_tokens, seed=seed) if code_tokens else []
        with progress(f"the target's top-k over {len(train_seqs) + len(held)} sequences",
                      len(train_seqs) + len(held)) as advance:
            model = target.load_model()
            taught = teach(model, train_seqs, bf16, advance)
            taught_held = teach(model, held, bf16, advance)
            target_record = {k: v for k, v in target.describe().items()
                             if k in ("path", "weights_sha256", "config_sha256", "model_type")}
            del model
            target.release()
        with progress("held-out agreement of the full draft, then of the cut"):
            student = draft.load_model()
            full = agreement(student, taught_held, bf16)
            cut_layers(student, keep)
            untrained = agreement(student, taught_held, bf16)
        with progress(f"teaching {len(keep)} layers for {minutes:g} min", 1) as advance:
            report = train(student, taught, minutes * 60, max_passes, lr, seed, bf16,
                           log=lambda text: advance(f"teaching {len(keep)} layers: {text}", step=0))
        with progress("held-out agreement of the learned draft"):
            learned = agreement(student, taught_held, bf16)
        record = {
            "format": FORMAT, "layers_kept": keep, "of_layers": draft.shape.num_layers,
            "base_draft": {k: v for k, v in draft.describe().items() if k in ("path", "weights_sha256")},
            "target": target_record,
            "trained_on": sorted({prompt_sha256(prompt_set[i].text) for i in train_at}),
            "held_out": {"full_draft": full, "cut_untrained": untrained, "learned": learned,
                         "sequences": len(held), "what": "greedy agreement with the target's argmax on held-out "
                                                         "calibration continuations"},
            "training": {**asdict(report), "sequences": len(taught), "code_tokens": code_tokens,
                         "new_tokens": new_tokens, "bf16": bf16, "lr": lr, "seed": seed}}
        with progress(f"writing {out}"), staging_folder(out) as stage:
            _save(student, draft.load_tokenizer() or tokenizer, stage, record)
    return {**record, "seconds": time.perf_counter() - start, "out": str(out)}
