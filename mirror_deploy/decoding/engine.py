"""`Engine`: an artifact opened on its devices, generating with any mode (the Python API)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..artifact import Manifest, read_manifest
from ..costs.tuned import read_tuning, tuned_best_mode, tuned_defaults, tuned_for
from ..errors import MirrorDeployError
from ..modes import DRAFT_MODES, TARGET_ONLY_MODE
from ..runtimes.kv import capacity_error
from ..runtimes.loader import open_draft, open_target
from ..targets import Profile, load_profile
from .config import DEFAULT_MODE, GenerationConfig
from .draft import DraftRunner
from .lookup import LookupDraft, LookupWindow, tuned_step_seconds
from .lookup_beside import LookupBeside
from .loops import autoregressive
from .speculative import speculative
from .metrics import RunMetrics
from .target import TargetRunner


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str | None
    metrics: RunMetrics
    summary: dict = field(default_factory=dict)


def _check_sizes(folder: Path, manifest: Manifest) -> None:
    """Cheap integrity check at start-up (`mirror-deploy check` verifies full hashes)."""
    for name, graph in manifest.graphs.items():
        for file in graph.sha256:
            if not (folder / file).is_file():
                raise MirrorDeployError(f"artifact {folder} is missing {file} ({name})",
                                        "re-export it, or run `mirror-deploy check DIR` for details")


class Engine:
    """Construction options (artifact, profile) are fixed here; per-request settings go to generate()."""

    def __init__(self, folder: str | Path, profile: str | Profile | None = None, load_draft: bool = True):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        _check_sizes(self.folder, self.manifest)
        if profile is None:
            self.profile = Profile.from_dict(self.manifest.profile)
        else:
            self.profile = profile if isinstance(profile, Profile) else load_profile(profile)
        part = self.profile.target
        # Two one-thread stages in a pipeline can use two cores for the prompt, where the profile asks.
        pipeline = part.prefill_pipeline and (os.cpu_count() or 1) >= 2
        self.target = TargetRunner(open_target(self.folder, self.manifest, self.profile), self.manifest,
                                   pipeline_prefill=pipeline)
        self.draft = DraftRunner(open_draft(self.folder, self.manifest, self.profile), self.manifest) \
            if load_draft and self.manifest.has_draft else None
        self._stream_draft: DraftRunner | None = None    # opened on the first request that asks for streams
        self.tokenizer = self._load_tokenizer()
        self.tuning = read_tuning(self.folder, self.manifest)   # `mirror-deploy tune`'s choice, if any
        self.eos = set(self.manifest.target.get("eos_token_ids") or [])

    def _load_tokenizer(self):
        if not self.manifest.tokenizer:
            return None
        from ..tokenizer import load_tokenizer
        return load_tokenizer(self.folder / self.manifest.tokenizer, self.manifest.target.get("model_type"))

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise MirrorDeployError("this artifact has no tokenizer, so text prompts cannot be encoded",
                                    "pass token ids, or re-export from a checkpoint that has a tokenizer")
        if chat:
            return encode_chat(self.tokenizer, [{"role": "user", "content": prompt}])
        return list(self.tokenizer.encode(prompt))

    def _overhead(self, cfg: GenerationConfig, gamma: int, budget: int) -> int:
        """KV positions a run needs beyond prompt + new tokens: the window and the branches' slots."""
        window = 0 if cfg.mode == "ar" else self._lookup_gamma(cfg, gamma) + 1
        branch_slots = gamma * (budget + 1) if cfg.mode == "mirror" else 0
        return window + branch_slots + 1

    def _lookup_gamma(self, cfg: GenerationConfig, gamma: int) -> int:
        """The longest window a run may verify: beside the model, lookup's windows may run to the
        artifact's widest (a tuned γ = 1 for the model's windows would cap long copies at one token)."""
        return max(gamma, self.manifest.gamma) if cfg.lookup else gamma

    def _window_and_budget(self, cfg: GenerationConfig) -> tuple[int, int]:
        gamma = cfg.gamma or self.manifest.gamma
        return gamma, self.manifest.branch_batch if cfg.branch_budget is None else cfg.branch_budget

    def room(self, prompt_len: int, cfg: GenerationConfig) -> int:
        """The most new tokens a `prompt_len`-token prompt leaves room for (0 or less: none)."""
        policy = self.run_policy(cfg)
        cfg = self.with_tuned_defaults(cfg)
        return self.manifest.max_context - prompt_len - self._overhead(cfg, policy.gamma, policy.budget)

    def check_capacity(self, prompt_len: int, cfg: GenerationConfig, gamma: int, budget: int) -> None:
        """Refuse before any work what would overrun the compiled KV capacity."""
        need = prompt_len + cfg.max_new_tokens + self._overhead(cfg, gamma, budget)
        if need > self.manifest.max_context:
            raise capacity_error(f"a {prompt_len}-token prompt + {cfg.max_new_tokens} new tokens", need,
                                 self.manifest.max_context)

    def default_mode(self) -> tuple[str, str]:
        """(mode, why) for a run that names none: `tune`'s best mode when it was tuned on this profile."""
        if not self.manifest.has_draft:
            return TARGET_ONLY_MODE, "default (target-only artifact)"
        best = tuned_best_mode(self.tuning, self.profile.name)
        if best is not None:
            return best, f"tuned best on {self.profile.name}"
        if self.tuning:
            return DEFAULT_MODE, f"default (tuned on {self.tuning.get('profile')}, not {self.profile.name})"
        return DEFAULT_MODE, "default (not tuned)"

    def with_tuned_defaults(self, cfg: GenerationConfig) -> GenerationConfig:
        """Fill the fields `cfg` leaves None with the tuned choice (the mode first, then its settings);
        explicit values win."""
        if cfg.mode is None:
            cfg = replace(cfg, mode=self.default_mode()[0])
        tuned = tuned_defaults(self.tuning, cfg.mode, self.profile.name, cfg.streams)
        filled = {k: v for k, v in tuned.items() if getattr(cfg, k, 0) is None}
        return replace(cfg, **filled) if filled else cfg

    def run_policy(self, cfg: GenerationConfig):
        """The window policy for a request (decoding/policy.py). Adaptive on an artifact tuned for this
        profile: the cost-aware policy, within the tuned (or named) γ and budget, down to autoregressive
        steps; otherwise the heuristic within [1, γ]."""
        from .policy import CostAwareWindow, HeuristicWindow, TunedCosts
        cfg = self.with_tuned_defaults(cfg)
        gamma, budget = self._window_and_budget(cfg)
        if cfg.mode == "lookup":
            budget = 0                                  # no branches: lookup windows are verified in series
            if cfg.adaptive_gamma and cfg.window_policy != "heuristic":
                return self._lookup_window(gamma)
        if (cfg.mode in ("ar", "lookup") or not cfg.adaptive_gamma or cfg.window_policy == "heuristic"
                or not tuned_for(self.tuning, self.profile.name)):
            return HeuristicWindow(gamma, budget, cfg.adaptive_gamma)
        exit_layer, kappa = cfg.exit_layer or self.manifest.exit_layer, cfg.kappa or self.manifest.kappa
        streams = self.manifest.draft_streams if cfg.streams else None
        costs = TunedCosts.from_tuning(self.tuning, exit_layer, kappa, gamma, budget, streams)
        return CostAwareWindow(cfg.mode, costs, gamma, budget, gamma, exit_layer, kappa)

    def _lookup_window(self, gamma: int) -> LookupWindow:
        """Lookup's window chooser, its step costs starting from `tune`'s curves where tuned for this profile."""
        tuned = tuned_for(self.tuning, self.profile.name)
        return LookupWindow(gamma, prior_seconds=tuned_step_seconds(self.tuning, gamma) if tuned else None)

    def require_draft(self, mode: str) -> None:
        """sd and mirror run the draft model: refuse them, before any work, where there is none."""
        if mode not in DRAFT_MODES or self.draft is not None:
            return
        if not self.manifest.has_draft:
            raise MirrorDeployError(f"mode {mode} needs a draft model, and {self.folder} is a target-only artifact "
                                    "(exported without --draft)", "use --mode ar or --mode lookup, or re-export "
                                    "with `mirror-deploy export TARGET --draft DRAFT`")
        raise MirrorDeployError(f"mode {mode} needs the draft, and this engine was opened without it",
                                "open it with load_draft=True, or use mode ar or lookup")

    def stream_draft(self) -> DraftRunner:
        """The draft graph with speculative streams (`learn-streams`), compiled on first use: requests
        without streams never pay for it."""
        if self._stream_draft is None:
            self.require_draft("sd")
            self._stream_draft = DraftRunner(open_draft(self.folder, self.manifest, self.profile, streams=True),
                                             self.manifest)
        return self._stream_draft

    def generate(self, prompt: str | list[int], config: GenerationConfig | None = None, chat: bool = False,
                 on_tokens: Callable[[list[int]], bool | None] | None = None) -> GenerationResult:
        """`on_tokens(new_ids)` is called as tokens commit; returning True ends the run after that step."""
        cfg = (config or GenerationConfig()).validate()
        ids = self.encode(prompt, chat) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise MirrorDeployError("the prompt is empty", "give at least one token of prompt")
        mode_source = "named" if cfg.mode is not None else self.default_mode()[1]
        policy = self.run_policy(cfg)
        cfg = self.with_tuned_defaults(cfg)
        self.require_draft(cfg.mode)
        gamma, budget = policy.gamma, policy.budget     # the most this run may draft / roll out
        if budget > self.manifest.branch_batch and self.draft is not None and self.draft.static_seq:
            raise MirrorDeployError(f"branch budget {budget} exceeds the static draft's {self.manifest.branch_batch}",
                                    f"use at most {self.manifest.branch_batch} or re-export with a larger --branch-batch")
        self.check_capacity(len(ids), cfg, gamma, budget)
        self.target.configure(cfg.exit_layer or self.manifest.exit_layer, cfg.kappa or self.manifest.kappa,
                              cfg.learned_exit)
        emit = on_tokens or (lambda new: None)
        extra = {}
        self.target.reset()
        if cfg.mode == "ar":
            tokens, metrics = autoregressive(self.target, ids, cfg, self.eos, emit)
        elif cfg.mode == "lookup":
            lookup = LookupDraft(policy if isinstance(policy, LookupWindow) else None)
            tokens, metrics = speculative(self.target, lookup, ids, cfg, gamma, 0, self.eos, emit, policy)
        else:
            model = draft = self.stream_draft() if cfg.streams else self.draft
            if cfg.lookup:
                draft = LookupBeside(draft, LookupDraft(self._lookup_window(self._lookup_gamma(cfg, gamma))),
                                     gamma)
            draft.reset()
            tokens, metrics = speculative(self.target, draft, ids, cfg, gamma, budget, self.eos, emit, policy)
            extra = {"draft_calls": model.calls,
                     "draft_tokens_per_call": model.proposed / model.calls if model.calls else None}
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else None
        return GenerationResult(tokens, text, metrics, {**metrics.summary(), **extra, "mode_source": mode_source})


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template, ready for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise MirrorDeployError("the tokenizer has no chat template",
                                "send a plain prompt (drop --chat, or use /v1/completions)")
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def load(folder: str | Path, profile: str | None = None) -> Engine:
    """Open an exported artifact: `mirror_deploy.load("art").generate("Hello", GenerationConfig(...))`."""
    return Engine(folder, profile)
