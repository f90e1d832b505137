"""transformers as a peer: the target alone (`generate`), assisted generation
(`generate(assistant_model=draft)`) and prompt lookup (`generate(prompt_lookup_num_tokens=K)`), PyTorch fp32."""
from __future__ import annotations

import copy
import time

from ..methods import MethodRun
from .common import free, greedy_only, per_call


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
        self.extra: dict = {}   # further generate() arguments of a subclass

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, seed=0) -> MethodRun:
        import torch
        greedy_only(self.name, temperature)
        torch.set_num_threads(self.threads)  # process-wide: set per call, other methods may change it
        ids = torch.tensor([list(prompt_ids)])
        kwargs, calls = dict(self.extra), {"target": 0, "draft": 0}
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
        tokens = out[0, ids.shape[1]:].tolist()[:max_new_tokens]   # prompt lookup may verify one past it
        prefill = (clock.first or t0) - t0
        figures = per_call(len(tokens), calls["target"]) | {"total_s": total}
        if self.draft is not None:
            figures["draft_calls"] = calls["draft"]
        return MethodRun(tokens, total - prefill, prefill, figures)

    def close(self) -> None:
        self.target = self.draft = None
        free()


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


class TransformersLookup(TransformersPlain):
    """Prompt lookup: `generate(prompt_lookup_num_tokens=K)` (the library's n-gram candidate generator,
    matching up to `max_matching_ngram_size` tokens; its defaults: 2)."""

    name = "hf-lookup"

    def __init__(self, target_dir, threads: int = 2, num_tokens: int = 10):
        super().__init__(target_dir, threads)
        # Its candidate generator cuts candidates at EOS and fails on the clean config's eos None: an id
        # past the vocabulary can never be produced, so generation still neither stops at nor masks EOS.
        self.extra = {"prompt_lookup_num_tokens": num_tokens, "eos_token_id": self.target.config.vocab_size}
