"""A learned early exit (the "tuned lens", Belrose et al. 2023, arXiv 2303.08112) and its measurement.

One affine translator per exit boundary, trained so that head(norm(translator(h_L))) matches the target's
final distribution, through the model's own frozen final norm + LM head. Matching hidden states is the
wrong objective (a least-squares map onto the last hidden state barely beats the logit lens); matching the
distribution is what the early exit is for. The loss is KL(final || exit) on the final distribution's
top-k tokens plus the exit's own best-ranked tokens outside them (hard negatives, re-ranked every few
epochs), both renormalised on that set: a loss on the top-k alone never sees the wrong tokens that push
the right one out of the exit's top-κ. On the real 1.5B target (held-out top-8, layer 18) hard
negatives took the learned exit from 48.9% to 58.7% (logit lens 32.0%). Seeded, deterministic, CPU,
minutes for a few thousand tokens.

    python -m mirror_deploy.tuning.lens MODEL_DIR --boundaries 10,14,18,22 --kappa 8
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MirrorDeployError
from .calibration import cached_sequences, load_prompts, prompt_sha256
from .features import Features, FrozenHead, cached_features, check_boundaries, split_by_sequence
from .translator import AffineTranslator, export_onnx, save_translators


@dataclass(frozen=True)
class LensConfig:
    support: int = 32        # final top-k the loss is computed on
    negatives: int = 32      # the exit's best-ranked tokens outside the support, added to the loss (0: none)
    refresh: int = 5         # epochs between re-ranking the hard negatives
    kappa: int = 8           # top-κ the early exit sends; the hit rate is measured at this width
    epochs: int = 60
    batch: int = 128
    lr: float = 5e-4
    seed: int = 0
    held_out: float = 0.3    # fraction of sequences (per category) kept out of training


@dataclass
class BoundaryReport:
    boundary: int
    train_tokens: int
    held_out_tokens: int
    lens_top1: float         # held-out: exit argmax == final argmax
    lens_topk: float         # held-out: final argmax inside the exit's top-κ
    learned_top1: float
    learned_topk: float
    lens_kl: float           # held-out support KL(final || exit), the training objective
    learned_kl: float
    train_seconds: float
    choice: str              # what the tuner should export at this boundary: "learned" or "logit_lens"


@contextlib.contextmanager
def deterministic(seed: int):
    """Seeded, deterministic torch for the duration (the global flag is restored after)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def support_kl(head: FrozenHead, hidden: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Mean KL(final || exit) over rows, both distributions renormalised on the final top-k support."""
    target = torch.log_softmax(logprobs, dim=-1)
    exit_ = torch.log_softmax(head.support_logits(hidden, ids), dim=-1)
    return (target.exp() * (target - exit_)).sum(-1).mean()


def hard_negatives(head: FrozenHead, translator: AffineTranslator, hidden: torch.Tensor, ids: torch.Tensor,
                   count: int) -> torch.Tensor:
    """Per row, the exit's `count` best-ranked tokens outside the final support `ids` (of its top
    count + k, at most k are inside, so there are always enough)."""
    with torch.no_grad():
        top, _ = head.topk(translator(hidden), count + ids.shape[1])
    outside = ~(top[:, :, None] == ids[:, None, :]).any(-1)
    order = torch.argsort(outside.to(torch.int8), dim=1, descending=True, stable=True)   # outside first, in rank order
    return torch.gather(top, 1, order)[:, :count]


def support_loss(head: FrozenHead, hidden: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                 negatives: torch.Tensor, head_input: torch.Tensor) -> torch.Tensor:
    """KL(final || exit) on the final support plus the negatives, both renormalised there; the final
    logits of the negatives come from the head's stored input. Without negatives: the support KL."""
    if not negatives.shape[1]:
        return support_kl(head, hidden, ids, logprobs)
    tokens = torch.cat([ids, negatives], dim=1)
    target = torch.log_softmax(head.logits_of_normed(head_input, tokens), dim=-1)
    exit_ = torch.log_softmax(head.support_logits(hidden, tokens), dim=-1)
    return (target.exp() * (target - exit_)).sum(-1).mean()


def input_scale(hidden: torch.Tensor) -> torch.Tensor:
    """Per-feature RMS over the training rows (floored: a dead feature must not divide by zero)."""
    rms = hidden.pow(2).mean(0).sqrt()
    return rms.clamp(min=1e-3 * float(rms.mean()) + 1e-12)


def train_translator(head: FrozenHead, hidden: np.ndarray, ids: np.ndarray, logprobs: np.ndarray,
                     head_input: np.ndarray, config: LensConfig) -> AffineTranslator:
    hidden_t, ids_t, logprobs_t = torch.from_numpy(hidden), torch.from_numpy(ids), torch.from_numpy(logprobs)
    head_input_t = torch.from_numpy(head_input)
    with deterministic(config.seed):
        translator = AffineTranslator(hidden.shape[1], input_scale(hidden_t))
        optimizer = torch.optim.Adam(translator.parameters(), lr=config.lr)
        order = torch.Generator().manual_seed(config.seed)
        negatives = ids_t[:, :0]
        for epoch in range(config.epochs):
            if config.negatives and epoch % config.refresh == 0:
                negatives = hard_negatives(head, translator, hidden_t, ids_t, config.negatives)
            for rows in torch.randperm(len(hidden_t), generator=order).split(config.batch):
                loss = support_loss(head, translator(hidden_t[rows]), ids_t[rows], logprobs_t[rows], negatives[rows],
                                    head_input_t[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return translator.eval()


@torch.no_grad()
def hit_rates(head: FrozenHead, hidden: torch.Tensor, final_top1: torch.Tensor, kappa: int) -> tuple[float, float]:
    """(top-1 hit, top-κ hit): how often the final argmax is the exit's argmax / inside its top-κ."""
    ids, _ = head.topk(hidden, kappa)
    return (float((ids[:, 0] == final_top1).float().mean()),
            float((ids == final_top1[:, None]).any(-1).float().mean()))


@torch.no_grad()
def evaluate(head: FrozenHead, translator: AffineTranslator, boundary: int, train: Features, test: Features,
             kappa: int, seconds: float) -> BoundaryReport:
    hidden = torch.from_numpy(test.hidden[boundary])
    ids, logprobs = torch.from_numpy(test.final_ids), torch.from_numpy(test.final_logprobs)
    adapted = translator(hidden)
    lens_top1, lens_topk = hit_rates(head, hidden, ids[:, 0], kappa)
    learned_top1, learned_topk = hit_rates(head, adapted, ids[:, 0], kappa)
    better = (learned_topk, learned_top1) > (lens_topk, lens_top1)
    return BoundaryReport(boundary, train.rows, test.rows, lens_top1, lens_topk, learned_top1, learned_topk,
                          float(support_kl(head, hidden, ids, logprobs)),
                          float(support_kl(head, adapted, ids, logprobs)), seconds,
                          "learned" if better else "logit_lens")


def fit_lens(features: Features, head: FrozenHead, config: LensConfig = LensConfig()
             ) -> tuple[dict[int, AffineTranslator], list[BoundaryReport]]:
    """Train one translator per boundary on the train split (prompt rows included); report hit rates on
    the held-out sequences' continuation rows (what the exit sees while decoding)."""
    if config.support > features.final_ids.shape[1]:
        raise MirrorDeployError(f"loss support {config.support} exceeds the {features.final_ids.shape[1]} "
                                "final top-k ids collected", "collect features with a larger support")
    train, test = split_by_sequence(features, config.held_out, config.seed)
    test = test.continuation_rows()
    ids, logprobs = train.final_ids[:, :config.support], train.final_logprobs[:, :config.support]
    translators, reports = {}, []
    for boundary in sorted(features.hidden):
        start = time.perf_counter()
        translators[boundary] = train_translator(head, train.hidden[boundary], ids, logprobs, train.head_input, config)
        seconds = time.perf_counter() - start
        reports.append(evaluate(head, translators[boundary], boundary, train, test, config.kappa, seconds))
    return translators, reports


def format_table(reports: list[BoundaryReport], kappa: int) -> str:
    lines = [f"{'ℓe':>4} {'train':>6} {'held':>6} │ {'lens top1':>9} {'learned':>8} │ {f'lens top{kappa}':>9} "
             f"{'learned':>8} {'×':>5} │ {'lens KL':>8} {'learned':>8} │ {'train s':>7}  pick"]
    for r in reports:
        ratio = r.learned_topk / r.lens_topk if r.lens_topk else float("inf")
        lines.append(f"{r.boundary:>4} {r.train_tokens:>6} {r.held_out_tokens:>6} │ {r.lens_top1:>9.1%} "
                     f"{r.learned_top1:>8.1%} │ {r.lens_topk:>9.1%} {r.learned_topk:>8.1%} {ratio:>5.2f} │ "
                     f"{r.lens_kl:>8.3f} {r.learned_kl:>8.3f} │ {r.train_seconds:>7.1f}  {r.choice}")
    return "\n".join(lines)


def calibrate(model_dir: str | Path, boundaries: list[int] | None, config: LensConfig = LensConfig(),
              prompts: str | Path | None = None, new_tokens: int = 96, log=print):
    """End to end on a checkpoint folder: calibration text, features, translators, report, and the
    sha256 of every prompt whose text trained them (`tune` keeps those out of its own statistics)."""
    from ..export.loading import open_source
    source = open_source(model_dir, "target")
    boundaries = check_boundaries(boundaries or [source.config.num_hidden_layers // 2], source.config.num_hidden_layers)
    prompt_set = load_prompts(prompts)   # refuse a bad file before loading any weights
    torch.manual_seed(config.seed)
    timings = {}
    start = time.perf_counter()
    model, tokenizer = source.load_model(), source.load_tokenizer()
    if tokenizer is None:
        raise MirrorDeployError(f"{model_dir} has no tokenizer", "use a checkpoint folder saved with its tokenizer")
    timings["load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    sequences = cached_sequences(source.path, model, tokenizer, prompt_set, new_tokens)
    timings["generate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    features = cached_features(source.path, model, sequences, boundaries, support=config.support)
    timings["collect_s"] = time.perf_counter() - start
    head = FrozenHead.of(model)
    source.model = model = None       # the decoder's weights are no longer needed: free them
    log(f"calibration: {len(sequences)} sequences, {int(features.continuation.sum())} continuation tokens "
        f"(+{int((~features.continuation).sum())} prompt rows for training) "
        f"(load {timings['load_s']:.0f} s, generate {timings['generate_s']:.0f} s, collect {timings['collect_s']:.0f} s)")
    start = time.perf_counter()
    translators, reports = fit_lens(features, head, config)
    timings["fit_s"] = time.perf_counter() - start
    train, _ = split_by_sequence(features, config.held_out, config.seed)
    trained_on = sorted({prompt_sha256(prompt_set[i].text) for i in set(train.sequence.tolist())})
    return translators, reports, timings, trained_on


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mirror_deploy.tuning.lens", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", help="Hugging Face checkpoint folder of the target")
    parser.add_argument("--boundaries", default=None, help="exit boundaries, e.g. 10,14,18,22 (default N/2)")
    parser.add_argument("--kappa", type=int, default=LensConfig.kappa)
    parser.add_argument("--support", type=int, default=LensConfig.support)
    parser.add_argument("--negatives", type=int, default=LensConfig.negatives,
                        help="hard negatives per row in the loss (0: the loss on the support alone)")
    parser.add_argument("--epochs", type=int, default=LensConfig.epochs)
    parser.add_argument("--lr", type=float, default=LensConfig.lr)
    parser.add_argument("--seed", type=int, default=LensConfig.seed)
    parser.add_argument("--new-tokens", type=int, default=96, help="greedy continuation length per prompt")
    parser.add_argument("--prompts", default=None, help="JSONL prompt file (default: the shipped set)")
    parser.add_argument("--out", default=None, help="folder for lens.safetensors, lens_report.json, *.onnx")
    return parser.parse_args(argv)


def parse_boundaries(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise MirrorDeployError(f"--boundaries {text!r} is not a comma-separated list of layer numbers",
                                "write it like 10,14,18,22") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        boundaries = parse_boundaries(args.boundaries)
        config = LensConfig(support=args.support, negatives=args.negatives, kappa=args.kappa, epochs=args.epochs,
                            lr=args.lr, seed=args.seed)
        translators, reports, timings, trained_on = calibrate(args.model_dir, boundaries, config, args.prompts,
                                                              args.new_tokens)
    except MirrorDeployError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(reports, args.kappa))
    print(f"fit {timings['fit_s']:.0f} s for {len(reports)} boundaries")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_translators(translators, out / "lens.safetensors")
        for b, tr in translators.items():
            export_onnx(tr, out / f"lens_boundary_{b}.onnx")
        report = {"config": asdict(config), "timings": timings, "boundaries": [asdict(r) for r in reports],
                  "trained_on": trained_on}
        (out / "lens_report.json").write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
