"""onnxruntime-genai as a peer: its speculative decoding (or the target alone) over models its own
model builder wrote, from a separate venv (the builder needs transformers 5)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ...errors import MirrorDeployError
from ..methods import MethodRun
from .common import build_once, cache_entry, free, greedy_only, per_call, require, run_step


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
    out = cache_entry(cache, f"ortgenai-fp32+{draft_precision}", target_dir, draft_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def build_one(model_dir, dest: Path, precision: str, scratch: Path) -> None:
        cmd = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(dest),
               "-p", precision, "-e", "cpu", "-c", str(scratch)]
        if precision == "int4":
            cmd += ["--extra_options", "block_size=128"]
        run_step(cmd, f"onnxruntime-genai model builder on {model_dir}", env)

    def build(temps: dict[int, Path]) -> None:
        scratch = temps[0] / ".builder-cache"  # the builder's temporary external-data files
        build_one(target_dir, temps[0], "fp32", scratch)
        build_one(draft_dir, temps[0] / "draft", draft_precision, scratch)
        shutil.rmtree(scratch, ignore_errors=True)

    return build_once([out], build)[0]


class OrtGenAI:
    """onnxruntime-genai on CPU over a `build_ortgenai_models` folder: speculative (draft declared as
    `model.draft`, `max_draft_tokens`) or, with speculative=False, the target alone. `threads` is each
    session's intra-op thread count (1 = our placement)."""

    def __init__(self, model_dir, speculative: bool = True, max_draft_tokens: int = 4, threads: int = 1):
        og = require("onnxruntime_genai")
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
        greedy_only(self.name, temperature)
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
        figures = per_call(len(tokens), len(tokens)) | {"total_s": total}
        if self.speculative:
            stats = gen.get_speculative_stats()
            figures |= per_call(len(tokens), int(stats["target_forward_passes"])) | {
                "acceptance": stats["acceptance_rate"], "draft_calls": int(stats["draft_forward_passes"])}
        return MethodRun(tokens, total - (first - t0), first - t0, figures)

    def close(self) -> None:
        self.model = None
        free()
