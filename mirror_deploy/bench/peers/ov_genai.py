"""OpenVINO GenAI as a peer: `openvino_genai.LLMPipeline` over IRs exported once with optimum-cli,
the target alone or speculative with the draft."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ...errors import MirrorDeployError
from ..methods import MethodRun
from .common import build_once, cache_entry, free, greedy_only, per_call, require, run_step

# "Our placement": each model on one core, as our engine runs them; "whole machine": plugin defaults
# (all cores, 2 here). f32 in both, since this CPU otherwise defaults to bf16 and greedy parity breaks.
OV_PLACEMENTS = {"1t": {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False,
                        "INFERENCE_PRECISION_HINT": "f32"},
                 "2t": {"INFERENCE_PRECISION_HINT": "f32"}}


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
    require("optimum.intel")
    if target_weight_format not in OV_TARGET_FORMATS:
        raise MirrorDeployError(f"no OpenVINO GenAI peer for a {target_weight_format} target",
                                f"use an artifact with --target-weights {' / '.join(OV_TARGET_FORMATS)}")

    def quant(fmt: str) -> list[str]:
        return ["--group-size", str(group_size), "--ratio", "1.0", "--sym"] if fmt == "int4" else []

    target_fmt = OV_TARGET_FORMATS[target_weight_format]
    jobs = [(target_dir, target_fmt, quant(target_fmt))]
    if draft_dir is not None:   # else the target alone (a target-only artifact, or a peer without the draft)
        jobs.append((draft_dir, draft_weight_format, quant(draft_weight_format)))
    outs = [cache_entry(cache, f"ov-{fmt}" + (f"-g{group_size}" if extra else ""), model) for model, fmt, extra in jobs]

    def build(temps: dict[int, Path]) -> None:
        argvs = [["--model", str(jobs[i][0]), "--task", "text-generation-with-past", "--weight-format", jobs[i][1],
                  *jobs[i][2], str(temp)] for i, temp in temps.items()]
        run_step([sys.executable, "-c", _OV_EXPORT, json.dumps(argvs)], "optimum-cli export openvino")

    built = build_once(outs, build)
    return built[0], built[1] if draft_dir is not None else None


class OpenVinoGenAI:
    """`openvino_genai.LLMPipeline` on CPU: speculative with `draft_ir`, prompt lookup with `prompt_lookup`
    (`num_assistant_tokens` candidates from n-grams of up to `max_ngram_size`), else the target alone.
    `placement` is "1t" (one thread per model, our engine's setting) or "2t" (plugin defaults)."""

    def __init__(self, target_ir, draft_ir=None, placement: str = "1t", num_assistant_tokens: int = 4,
                 device: str = "CPU", prompt_lookup: bool = False, max_ngram_size: int = 3):
        genai = require("openvino_genai")
        if placement not in OV_PLACEMENTS:
            raise MirrorDeployError(f"unknown placement {placement!r}", f"use one of {', '.join(OV_PLACEMENTS)}")
        props = OV_PLACEMENTS[placement]
        if prompt_lookup and draft_ir is not None:
            raise MirrorDeployError("OpenVINO GenAI runs prompt lookup or a draft model, not both",
                                    "pass draft_ir=None with prompt_lookup=True")
        self.speculative, self.num_assistant_tokens = draft_ir is not None or prompt_lookup, num_assistant_tokens
        self.lookup, self.max_ngram_size = prompt_lookup, max_ngram_size
        kind = "lookup" if prompt_lookup else "sd" if draft_ir is not None else "target"
        self.name = f"ov-genai-{kind}@{placement}"
        extra = {"draft_model": genai.draft_model(str(draft_ir), device, **props)} if draft_ir is not None else {}
        if prompt_lookup:
            extra["prompt_lookup"] = True
        # On CPU, LLMPipeline runs continuous batching with prefix caching on, so a repeated prompt would
        # skip its prefill; off here, so repeats measure the same work (its other defaults kept: unlimited batch).
        sched = genai.SchedulerConfig()
        sched.enable_prefix_caching, sched.max_num_batched_tokens = False, sys.maxsize
        self.pipe = genai.LLMPipeline(str(target_ir), device, scheduler_config=sched, **extra, **props)

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, seed=0) -> MethodRun:
        import numpy as np
        import openvino as ov
        import openvino_genai as genai
        greedy_only(self.name, temperature)
        cfg = genai.GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, ignore_eos=True)
        if self.speculative:
            cfg.num_assistant_tokens = self.num_assistant_tokens
        if self.lookup:
            cfg.max_ngram_size = self.max_ngram_size
        ids = ov.Tensor(np.asarray([list(prompt_ids)], dtype=np.int64))  # token ids in: no re-tokenisation
        t0 = time.perf_counter()
        result = self.pipe.generate(ids, cfg)
        total = time.perf_counter() - t0
        prefill = min(result.perf_metrics.get_ttft().mean / 1e3, total)
        return MethodRun(list(result.tokens[0]), total - prefill, prefill, self._figures(result) | {"total_s": total})

    def _figures(self, result) -> dict:
        n, ext = len(result.tokens[0]), result.extended_perf_metrics if self.speculative else None
        if ext is None:  # the target alone: one call per token
            return per_call(n, n) | {"tpot_ms": result.perf_metrics.get_tpot().mean}
        main, draft = ext.main_model_metrics, ext.draft_model_metrics
        # acceptance here = accepted / drafted tokens (onnxruntime-genai divides by evaluated ones)
        return per_call(n, len(main.raw_metrics.m_durations)) | {
            "acceptance": ext.get_draft_acceptance_rate(), "accepted_tokens": ext.get_num_accepted_tokens(),
            "draft_tokens": ext.get_num_draft_tokens(), "target_tpot_ms": main.get_tpot().mean,
            "draft_tpot_ms": draft.get_tpot().mean}

    def close(self) -> None:
        self.pipe = None
        free()
