"""Peers: what a user would run instead of mirror-deploy, as `Method`s on the same models and machine.

- `TransformersPlain` / `TransformersAssisted`: PyTorch fp32, `generate(assistant_model=draft)`.
- `OpenVinoGenAI`: `openvino_genai.LLMPipeline` over IRs from `export_openvino_models` (optimum-cli).
- `OrtGenAI`: onnxruntime-genai speculative decoding over models from `build_ortgenai_models`; its model
  builder needs transformers 5, so it runs in a separate venv (`ORTGENAI_BUILDER_VENV`).

All are greedy only and never stop at (nor mask) EOS, so every method yields exactly max_new_tokens
and outputs compare token by token. Timing: `prefill_seconds` is the time to the first new token,
`seconds` the rest of the call; the first token (or first accepted run) thus falls in prefill.
"""
from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from ..errors import MirrorDeployError
from ..models import cache_dir
from .methods import MethodRun

# "Our placement": each model on one core, as our engine runs them; "whole machine": plugin defaults
# (all cores, 2 here). f32 in both, since this CPU otherwise defaults to bf16 and greedy parity breaks.
OV_PLACEMENTS = {"1t": {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False,
                        "INFERENCE_PRECISION_HINT": "f32"},
                 "2t": {"INFERENCE_PRECISION_HINT": "f32"}}


def _greedy_only(name: str, temperature: float) -> None:
    if temperature > 0:
        raise MirrorDeployError(f"{name} is run greedy only in the peer benchmark (got temperature={temperature})",
                                "use temperature 0 for peer methods")


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise MirrorDeployError(f"{module} is not installed ({e})", "pip install -e '.[peers]'") from e


def _free() -> None:
    gc.collect()  # models hold GBs; give them back before the next method loads


def _per_call(n: int, target_calls: int) -> dict:
    """The one figure every method has: target forward calls, and new tokens per call (1.0 = no gain)."""
    return {"target_calls": target_calls, "tokens_per_target_call": n / target_calls if target_calls else 0.0}


# ---------------------------------------------------------------- transformers

class _Clock:
    """A `generate` streamer that only notes when the first new tokens arrive (its first put is the prompt)."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _load_hf(folder):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():  # fp32 safetensors stay memory-mapped from the file, which ran ~2x slower here
        for p in model.parameters():  # than weights copied into RAM (2.5 vs 1.2 tok/s, 1.5B target)
            p.data = p.data.clone()
    # A clean config: no sampling/penalty defaults from the checkpoint, and eos None so EOS neither stops
    # generation nor is masked (min_new_tokens would mask it, and is refused with an assistant anyway).
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=None,
                                               pad_token_id=model.generation_config.pad_token_id)
    return model


class TransformersPlain:
    """The target alone: `AutoModelForCausalLM.generate`, fp32, greedy, `threads` torch threads."""

    name = "hf-target"

    def __init__(self, target_dir, threads: int = 2):
        self.threads, self.draft = threads, None
        self.target = _load_hf(target_dir)

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, seed=0) -> MethodRun:
        import torch
        _greedy_only(self.name, temperature)
        torch.set_num_threads(self.threads)  # process-wide: set per call, other methods may change it
        ids = torch.tensor([list(prompt_ids)])
        kwargs, calls = {}, {"target": 0, "draft": 0}
        if self.draft is not None:
            # The library adapts draft length and confidence threshold in place, across calls: restore
            # them so every prompt starts from the same state whatever ran before.
            self.draft.generation_config = copy.deepcopy(self._draft_config)
            kwargs["assistant_model"] = self.draft
        hooks = [model.register_forward_pre_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
                 for k, model in (("target", self.target), ("draft", self.draft)) if model is not None]
        clock = _Clock()
        try:
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = self.target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                           do_sample=False, streamer=clock, **kwargs)
                total = time.perf_counter() - t0
        finally:
            for hook in hooks:
                hook.remove()
        tokens = out[0, ids.shape[1]:].tolist()
        prefill = (clock.first or t0) - t0
        figures = _per_call(len(tokens), calls["target"]) | {"total_s": total}
        if self.draft is not None:
            figures["draft_calls"] = calls["draft"]
        return MethodRun(tokens, total - prefill, prefill, figures)

    def close(self) -> None:
        self.target = self.draft = None
        _free()


class TransformersAssisted(TransformersPlain):
    """Assisted generation: `generate(assistant_model=draft)`. `num_assistant_tokens` None keeps the
    library's schedule (up to 20 tokens, cut by its adaptive confidence threshold); an int sets it."""

    name = "hf-assisted"

    def __init__(self, target_dir, draft_dir, threads: int = 2, num_assistant_tokens: int | None = None):
        super().__init__(target_dir, threads)
        self.draft = _load_hf(draft_dir)
        if num_assistant_tokens is not None:
            self.draft.generation_config.num_assistant_tokens = num_assistant_tokens
            self.name = f"hf-assisted@{num_assistant_tokens}"
        self._draft_config = copy.deepcopy(self.draft.generation_config)


# ---------------------------------------------------------------- model folders built once

def _entry(cache, tag: str, *model_dirs) -> Path:
    """A folder in `cache` (default <mirror-deploy cache>/peers) named for its sources and format, plus
    a hash of their full paths."""
    src = [str(Path(p).resolve()) for p in model_dirs]
    key = hashlib.sha1("|".join(src + [tag]).encode()).hexdigest()[:8]
    return Path(cache or cache_dir() / "peers") / f"{'+'.join(Path(p).name for p in src)}-{tag}-{key}"


def _build_once(outs: list[Path], build) -> list[Path]:
    """Build the missing entries of `outs` with `build({index: temp folder})`, each into a temp folder
    beside it, then rename them into place: a crash never leaves a half-built entry that looks complete."""
    temps = {}
    try:
        for i, out in enumerate(outs):
            if not out.is_dir():
                out.parent.mkdir(parents=True, exist_ok=True)
                temps[i] = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        if temps:
            build(temps)
        for i, temp in temps.items():
            try:
                temp.rename(outs[i])
            except OSError:
                if not outs[i].is_dir():  # else a concurrent builder won the rename
                    raise
    finally:
        for temp in temps.values():
            shutil.rmtree(temp, ignore_errors=True)
    return outs


def _run(cmd: list[str], what: str, env: dict | None = None) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if proc.returncode != 0:
        raise MirrorDeployError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}",
                                "rerun that step by hand to see its whole log")


# ---------------------------------------------------------------- OpenVINO GenAI

# optimum-cli's own parser and export command, run for several exports in one Python start (its imports
# take seconds), in a child process so the export's peak memory (a few times the model) is returned.
_OV_EXPORT = """import argparse, json, sys
from optimum.commands.export.openvino import OVExportCommand
for argv in json.loads(sys.argv[1]):
    parser = argparse.ArgumentParser(prog="optimum-cli export openvino")
    OVExportCommand.parse_args(parser)
    OVExportCommand(None, parser.parse_args(argv), from_defaults_factory=True, parser=parser).run()
"""


# Our artifact's --target-weights -> optimum-cli's --weight-format for the peer's target, so both run the
# same kind of weights: int8 is weight-only per-channel there, int4 symmetric in groups of 128 as ours.
OV_TARGET_FORMATS = {"fp32": "fp32", "int8": "int8", "int4": "int4"}


def export_openvino_models(target_dir, draft_dir, cache=None, draft_weight_format: str = "int4",
                           group_size: int = 128, target_weight_format: str = "fp32") -> tuple[Path, Path]:
    """Export once into `cache` (default <mirror-deploy cache>/peers) and return (target_ir, draft_ir), as
    `optimum-cli export openvino --model DIR --task text-generation-with-past --weight-format fp32 OUT`
    for the target (or int8 / int4, matching the artifact's target weights) and
    `... --weight-format int4 --group-size 128 --ratio 1.0 --sym OUT` for the draft."""
    _require("optimum.intel")
    if target_weight_format not in OV_TARGET_FORMATS:
        raise MirrorDeployError(f"no OpenVINO GenAI peer for a {target_weight_format} target",
                                f"use an artifact with --target-weights {' / '.join(OV_TARGET_FORMATS)}")

    def quant(fmt: str) -> list[str]:
        return ["--group-size", str(group_size), "--ratio", "1.0", "--sym"] if fmt == "int4" else []

    target_fmt = OV_TARGET_FORMATS[target_weight_format]
    jobs = [(target_dir, target_fmt, quant(target_fmt)), (draft_dir, draft_weight_format, quant(draft_weight_format))]
    outs = [_entry(cache, f"ov-{fmt}" + (f"-g{group_size}" if extra else ""), model) for model, fmt, extra in jobs]

    def build(temps: dict[int, Path]) -> None:
        argvs = [["--model", str(jobs[i][0]), "--task", "text-generation-with-past", "--weight-format", jobs[i][1],
                  *jobs[i][2], str(temp)] for i, temp in temps.items()]
        _run([sys.executable, "-c", _OV_EXPORT, json.dumps(argvs)], "optimum-cli export openvino")

    target_ir, draft_ir = _build_once(outs, build)
    return target_ir, draft_ir


class OpenVinoGenAI:
    """`openvino_genai.LLMPipeline` on CPU: speculative with `draft_ir`, the target alone without.
    `placement` is "1t" (one thread per model, our engine's setting) or "2t" (plugin defaults)."""

    def __init__(self, target_ir, draft_ir=None, placement: str = "1t", num_assistant_tokens: int = 4,
                 device: str = "CPU"):
        genai = _require("openvino_genai")
        if placement not in OV_PLACEMENTS:
            raise MirrorDeployError(f"unknown placement {placement!r}", f"use one of {', '.join(OV_PLACEMENTS)}")
        props = OV_PLACEMENTS[placement]
        self.speculative, self.num_assistant_tokens = draft_ir is not None, num_assistant_tokens
        self.name = f"ov-genai-{'sd' if self.speculative else 'target'}@{placement}"
        extra = {"draft_model": genai.draft_model(str(draft_ir), device, **props)} if self.speculative else {}
        # On CPU, LLMPipeline runs continuous batching with prefix caching on, so a repeated prompt would
        # skip its prefill; off here, so repeats measure the same work (its other defaults kept: unlimited batch).
        sched = genai.SchedulerConfig()
        sched.enable_prefix_caching, sched.max_num_batched_tokens = False, sys.maxsize
        self.pipe = genai.LLMPipeline(str(target_ir), device, scheduler_config=sched, **extra, **props)

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, seed=0) -> MethodRun:
        import numpy as np
        import openvino as ov
        import openvino_genai as genai
        _greedy_only(self.name, temperature)
        cfg = genai.GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, ignore_eos=True)
        if self.speculative:
            cfg.num_assistant_tokens = self.num_assistant_tokens
        ids = ov.Tensor(np.asarray([list(prompt_ids)], dtype=np.int64))  # token ids in: no re-tokenisation
        t0 = time.perf_counter()
        result = self.pipe.generate(ids, cfg)
        total = time.perf_counter() - t0
        prefill = min(result.perf_metrics.get_ttft().mean / 1e3, total)
        return MethodRun(list(result.tokens[0]), total - prefill, prefill, self._figures(result) | {"total_s": total})

    def _figures(self, result) -> dict:
        n, ext = len(result.tokens[0]), result.extended_perf_metrics if self.speculative else None
        if ext is None:  # the target alone: one call per token
            return _per_call(n, n) | {"tpot_ms": result.perf_metrics.get_tpot().mean}
        main, draft = ext.main_model_metrics, ext.draft_model_metrics
        # acceptance here = accepted / drafted tokens (onnxruntime-genai divides by evaluated ones)
        return _per_call(n, len(main.raw_metrics.m_durations)) | {
            "acceptance": ext.get_draft_acceptance_rate(), "accepted_tokens": ext.get_num_accepted_tokens(),
            "draft_tokens": ext.get_num_draft_tokens(), "target_tpot_ms": main.get_tpot().mean,
            "draft_tpot_ms": draft.get_tpot().mean}

    def close(self) -> None:
        self.pipe = None
        _free()


# ---------------------------------------------------------------- onnxruntime-genai

def build_ortgenai_models(target_dir, draft_dir, cache=None, draft_precision: str = "int4",
                          builder_venv=None) -> Path:
    """Build target (fp32) and draft (int4 block 128, or fp32) with onnxruntime-genai's model builder,
    once, into one folder: the target at its root (its genai_config.json has no draft, so it also runs
    alone), the draft under draft/. The builder needs transformers 5, which conflicts with ours, so it
    runs from `builder_venv` (default $ORTGENAI_BUILDER_VENV or /tmp/ortgenai-venv)."""
    venv = Path(builder_venv or os.environ.get("ORTGENAI_BUILDER_VENV", "/tmp/ortgenai-venv"))
    python = venv / "bin" / "python"
    if not python.exists():
        raise MirrorDeployError(f"onnxruntime-genai's model builder needs transformers 5 (we pin 4.57), so it "
                                f"runs from a separate venv; there is none at {venv}",
                                f"python3 -m venv {venv} && {venv}/bin/pip install torch==2.13.0 "
                                f"'transformers>=5,<6' 'onnxruntime-genai==0.18.*' onnx-ir")
    if draft_precision not in ("int4", "fp32"):
        raise MirrorDeployError(f"unsupported draft precision {draft_precision!r}", "use int4 or fp32")
    out = _entry(cache, f"ortgenai-fp32+{draft_precision}", target_dir, draft_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def build_one(model_dir, dest: Path, precision: str, scratch: Path) -> None:
        cmd = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(dest),
               "-p", precision, "-e", "cpu", "-c", str(scratch)]
        if precision == "int4":
            cmd += ["--extra_options", "block_size=128"]
        _run(cmd, f"onnxruntime-genai model builder on {model_dir}", env)

    def build(temps: dict[int, Path]) -> None:
        scratch = temps[0] / ".builder-cache"  # the builder's temporary external-data files
        build_one(target_dir, temps[0], "fp32", scratch)
        build_one(draft_dir, temps[0] / "draft", draft_precision, scratch)
        shutil.rmtree(scratch, ignore_errors=True)

    return _build_once([out], build)[0]


class OrtGenAI:
    """onnxruntime-genai on CPU over a `build_ortgenai_models` folder: speculative (draft declared as
    `model.draft`, `max_draft_tokens`) or, with speculative=False, the target alone. `threads` is each
    session's intra-op thread count (1 = our placement)."""

    def __init__(self, model_dir, speculative: bool = True, max_draft_tokens: int = 4, threads: int = 1):
        og = _require("onnxruntime_genai")
        model_dir = Path(model_dir)
        self.speculative, self.max_draft_tokens = speculative, max_draft_tokens
        self.name = f"ort-genai-{'sd' if speculative else 'target'}@{threads}t"
        sessions = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        # No ignore-EOS option, and min_length would mask EOS (changing greedy output): EOS is replaced by
        # the last vocabulary id (for Qwen2.5 an untrained padding row); generate() checks it never came.
        self.eos_stand_in = json.loads((model_dir / "genai_config.json").read_text())["model"]["vocab_size"] - 1
        overlay = {"model": {"eos_token_id": self.eos_stand_in, "decoder": {"session_options": sessions}}}
        if speculative:
            # The draft is declared only here: with `model.draft` present the generator always speculates.
            draft = json.loads((model_dir / "draft" / "genai_config.json").read_text())["model"]["decoder"]
            draft["filename"] = f"draft/{draft['filename']}"
            draft["session_options"] = draft.get("session_options", {}) | sessions
            overlay["model"]["draft"] = draft
        config = og.Config(str(model_dir))
        config.overlay(json.dumps(overlay))
        self.model = og.Model(config)

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, seed=0) -> MethodRun:
        import numpy as np
        import onnxruntime_genai as og
        _greedy_only(self.name, temperature)
        prompt = list(prompt_ids)
        t0 = time.perf_counter()
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + max_new_tokens, do_sample=False)
        if self.speculative:
            params.set_speculative_options(max_draft_tokens=self.max_draft_tokens)
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.asarray([prompt], dtype=np.int32))
        gen.generate_next_token()
        first = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        total = time.perf_counter() - t0
        tokens = [int(t) for t in gen.get_sequence(0)[len(prompt):]]
        if len(tokens) < max_new_tokens:
            raise MirrorDeployError(f"{self.name} stopped after {len(tokens)} tokens: it generated token "
                                    f"{self.eos_stand_in}, which stands in for EOS", "use another prompt")
        figures = _per_call(len(tokens), len(tokens)) | {"total_s": total}
        if self.speculative:
            stats = gen.get_speculative_stats()
            figures |= _per_call(len(tokens), int(stats["target_forward_passes"])) | {
                "acceptance": stats["acceptance_rate"], "draft_calls": int(stats["draft_forward_passes"])}
        return MethodRun(tokens, total - (first - t0), first - t0, figures)

    def close(self) -> None:
        self.model = None
        _free()


PEER_NAMES = ("hf-target", "hf-assisted", "hf-assisted@4", "ov-genai-target@1t", "ov-genai-sd@1t",
              "ov-genai-target@2t", "ov-genai-sd@2t", "ort-genai-target@1t", "ort-genai-sd@1t",
              "ort-genai-target@2t", "ort-genai-sd@2t")


def make_peers(names: list[str], manifest) -> list[tuple[str, Callable[[], object]]]:
    """(name, factory) per peer, on the artifact's own source checkpoints. Factories, because each peer
    holds its own copy of the models (6-9 GB): the bench loads one at a time."""
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown:
        raise MirrorDeployError(f"unknown peer(s): {', '.join(unknown)}", f"use: {', '.join(PEER_NAMES)}")
    target, draft = manifest.target["path"], manifest.draft["path"]

    def factory(name: str):
        family, _, placement = name.partition("@")
        if family == "hf-target":
            return TransformersPlain(target)
        if family == "hf-assisted":
            return TransformersAssisted(target, draft, num_assistant_tokens=int(placement) if placement else None)
        if family.startswith("ov-genai"):
            target_ir, draft_ir = export_openvino_models(target, draft,
                                                         target_weight_format=manifest.target_weights)
            return OpenVinoGenAI(target_ir, draft_ir if family.endswith("sd") else None, placement)
        folder = build_ortgenai_models(target, draft)
        return OrtGenAI(folder, speculative=family.endswith("sd"), threads=int(placement.rstrip("t")))

    return [(n, lambda n=n: factory(n)) for n in names]
