"""Calibration prompts for `mirror-deploy tune`: the file shipped with the package (chat, code,
translation, summarization, QA, math; never SpecBench) or a user's own, one {"category", "prompt"}
JSON object a line. A seeded, category-balanced pick keeps a short tune representative."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MirrorDeployError

SHIPPED = Path(__file__).with_name("calibration_prompts.jsonl")


@dataclass
class CalibrationPrompt:
    category: str
    prompt: str
    line: int            # 1-based line in its file, for error messages


def read_prompts(path: Path | None = None) -> tuple[list[CalibrationPrompt], str]:
    """Every prompt of the file and the file's sha256 (recorded in tuning.json)."""
    path = Path(path) if path is not None else SHIPPED
    if not path.is_file():
        raise MirrorDeployError(f"calibration file {path} does not exist",
                                "pass --calibration FILE with one {\"category\", \"prompt\"} JSON object a line, "
                                "or leave the flag out to use the prompts shipped with mirror-deploy")
    raw = path.read_bytes()
    prompts = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, category = row["prompt"], str(row.get("category", "other"))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MirrorDeployError(f"calibration file {path}, line {number}, is not a JSON object with a "
                                    f"\"prompt\" string", "write one {\"category\": ..., \"prompt\": ...} a line") from None
        if not isinstance(text, str) or not text.strip():
            raise MirrorDeployError(f"calibration file {path}, line {number}, has an empty prompt",
                                    "remove the line or give it some text")
        prompts.append(CalibrationPrompt(category, text, number))
    if not prompts:
        raise MirrorDeployError(f"calibration file {path} is empty", "give at least one prompt, one JSON object a line")
    return prompts, hashlib.sha256(raw).hexdigest()


def pick(prompts: list[CalibrationPrompt], count: int, seed: int) -> list[CalibrationPrompt]:
    """`count` prompts, round-robin over categories (each category shuffled by `seed`), so two prompts
    cover two categories before any category gets a second."""
    if count < 1:
        raise MirrorDeployError(f"--prompts {count}: tuning needs at least one calibration prompt", "use e.g. 12")
    rng = np.random.default_rng(seed)
    by_category: dict[str, list[CalibrationPrompt]] = {}
    for p in prompts:
        by_category.setdefault(p.category, []).append(p)
    queues = [[group[i] for i in rng.permutation(len(group))] for group in by_category.values()]
    chosen: list[CalibrationPrompt] = []
    while len(chosen) < min(count, len(prompts)):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen
