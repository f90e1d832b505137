"""Peers on a tiny qwen2 pair: each speculative peer must reproduce its own target-alone greedy output."""
from __future__ import annotations

import pytest

from mirror_deploy.bench.peers import TransformersAssisted, TransformersLookup, TransformersPlain
from mirror_deploy.errors import MirrorDeployError
from mirror_deploy.tiny import build_tiny_pair

PROMPT = [2, 10, 20, 30, 40, 50, 3, 12, 7, 9]
N = 24


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    # vocab 160, not the default 128: a vocab equal to the MLP width (2 x hidden) confuses exporters
    # that find the LM head by its output size.
    return build_tiny_pair(tmp_path_factory.mktemp("peers"), "qwen2", vocab_size=160)


def _run(method, n=N):
    try:
        return method.generate(PROMPT, n, 0.0, 0)
    finally:
        method.close()


def test_transformers_assisted_equals_plain(pair):
    target, draft = pair
    plain = _run(TransformersPlain(target, threads=1))
    assert len(plain.tokens) == N and plain.seconds > 0
    for k in (None, 3):
        run = _run(TransformersAssisted(target, draft, threads=1, num_assistant_tokens=k))
        assert run.tokens == plain.tokens
        assert run.figures["draft_calls"] > 0 and run.figures["target_calls"] < N


REPEATING = [2, 10, 20, 30, 40, 50, 2, 10, 20, 30, 40, 50, 2, 10, 20]   # lookup finds matches in it


def test_transformers_lookup_equals_plain(pair):
    plain = TransformersPlain(pair[0], threads=1)
    lookup = TransformersLookup(pair[0], threads=1, num_tokens=4)
    try:
        want, got = plain.generate(REPEATING, N, 0.0, 0), lookup.generate(REPEATING, N, 0.0, 0)
    finally:
        plain.close(), lookup.close()
    assert got.tokens == want.tokens and len(got.tokens) == N


def test_peers_refuse_sampling(pair):
    method = TransformersPlain(pair[0], threads=1)
    try:
        with pytest.raises(MirrorDeployError, match="greedy"):
            method.generate(PROMPT, 4, 0.7, 0)
    finally:
        method.close()


def test_openvino_genai_sd_equals_target_alone(pair, tmp_path_factory):
    pytest.importorskip("openvino_genai")
    pytest.importorskip("optimum.intel")
    from mirror_deploy.bench.peers import OpenVinoGenAI, export_openvino_models
    target, draft = pair
    # fp32 draft: int4 with group 128 needs channels that are multiples of 128 (the tiny ones are 64)
    target_ir, draft_ir = export_openvino_models(target, draft, tmp_path_factory.mktemp("ov"),
                                                 draft_weight_format="fp32")
    alone = _run(OpenVinoGenAI(target_ir, placement="1t"))
    sd = _run(OpenVinoGenAI(target_ir, draft_ir, placement="1t", num_assistant_tokens=3))
    assert len(alone.tokens) == N and sd.tokens == alone.tokens
    assert 0.0 <= sd.figures["acceptance"] <= 1.0 and sd.figures["draft_tokens"] > 0
    # prompt lookup: the target alone exported (no draft), the same output as the target alone
    target_only, none = export_openvino_models(target, None, tmp_path_factory.mktemp("ov-target"))
    assert none is None
    plain, lookup = (OpenVinoGenAI(target_only, placement="1t", prompt_lookup=flag) for flag in (False, True))
    try:
        want, got = plain.generate(REPEATING, N, 0.0, 0), lookup.generate(REPEATING, N, 0.0, 0)
    finally:
        plain.close(), lookup.close()
    assert got.tokens == want.tokens and lookup.name == "ov-genai-lookup@1t"


def test_ortgenai_build_names_its_missing_builder_venv(pair, tmp_path):
    from mirror_deploy.bench.peers import build_ortgenai_models
    with pytest.raises(MirrorDeployError, match="transformers 5") as err:
        build_ortgenai_models(*pair, cache=tmp_path, builder_venv=tmp_path / "no-venv")
    assert "pip install" in str(err.value)
