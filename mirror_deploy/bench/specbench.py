"""SpecBench prompts (480 questions, six tasks): the first turn of each, in the chat template."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import MirrorDeployError

MT_BENCH = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
TASKS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")


@dataclass
class BenchPrompt:
    task: str
    question_id: int
    text: str
    ids: list[int]


# The questions ship with the package (data/specbench/NOTICE.md: origin, commit, license).
PACKAGED = Path(__file__).resolve().parent / "data" / "specbench" / "question.jsonl"
PACKAGED_SHA256 = "4b6d33e79484f9841c487ee87d1cf6aa8c6066f61d5d482ff09e5a007fafdf04"


def default_path() -> Path:
    env = os.environ.get("MIRROR_DEPLOY_SPECBENCH")
    if env:
        return Path(env)
    return PACKAGED


def _check_packaged(path: Path, data: bytes) -> None:
    """The packaged file is the published one: figures from an edited copy would not be SpecBench's."""
    if path.resolve() == PACKAGED and hashlib.sha256(data).hexdigest() != PACKAGED_SHA256:
        raise MirrorDeployError(f"the packaged SpecBench questions at {path} differ from the published file "
                                "(sha256 mismatch)", "reinstall mirror-deploy, or pass --specbench PATH")


def task_of(category: str) -> str:
    return "mt_bench" if category in MT_BENCH else category


def prompt_room(manifest, max_new_tokens: int, gamma: int | None = None, branch_budget: int | None = None) -> int:
    """The longest prompt that leaves the KV capacity room for the generation and the widest step (γ + 1
    window rows, and the draft's branches beside them)."""
    return (manifest.max_context - max_new_tokens
            - ((gamma or manifest.gamma) + 1) * ((branch_budget or manifest.branch_batch) + 2) - 1)


def load_prompts(tokenizer, per_task: int = 1, path: Path | None = None, chat: bool = True,
                 tasks: tuple[str, ...] = TASKS, max_tokens: int | None = None) -> tuple[list[BenchPrompt], int]:
    """`per_task` questions of each task, spread over the task's list (every k-th), skipping those
    longer than `max_tokens` (they would not fit the compiled KV capacity). Returns (prompts, skipped)."""
    path = Path(path or default_path())
    if not path.is_file():
        raise MirrorDeployError(f"SpecBench questions not found at {path}",
                                "pass --specbench PATH or set MIRROR_DEPLOY_SPECBENCH")
    data = path.read_bytes()
    _check_packaged(path, data)
    rows = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    by_task: dict[str, list[dict]] = {t: [] for t in tasks}
    for row in rows:
        task = task_of(row["category"])
        if task in by_task:
            by_task[task].append(row)
    prompts = []
    use_chat = chat and bool(getattr(tokenizer, "chat_template", None))
    skipped = 0
    for task, items in by_task.items():
        step = max(len(items) // max(per_task, 1), 1)
        chosen = 0
        for row in items[::step] + [r for i, r in enumerate(items) if i % step]:
            if chosen == per_task:
                break
            text = row["turns"][0]
            if use_chat:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                    tokenize=True)
            else:
                ids = tokenizer.encode(text)
            if max_tokens is not None and len(ids) > max_tokens:
                skipped += 1
                continue
            prompts.append(BenchPrompt(task, row["question_id"], text, list(ids)))
            chosen += 1
    return prompts, skipped
