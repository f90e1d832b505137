"""llama.cpp as a peer: a missing build names `make llama-cpp`; with the build (skipped without it), a tiny
qwen2 pair converted to f32 GGUF gives exactly max_new_tokens, SD equal to AR, and AR equal to
transformers' fp32 greedy on the same model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import REAL_MODEL_CACHE
from mirror_deploy.bench.peers import LlamaCpp, convert_to_gguf, gguf_for, make_peers
from mirror_deploy.bench.peers.llama_cpp import LLAMA_CPP_VERSION
from mirror_deploy.errors import MirrorDeployError
from mirror_deploy.tiny import SPECIALS, build_tiny_pair, tiny_tokenizer

# The build lives in the user's cache (the tests otherwise run on a private one), unless pointed elsewhere.
BUILD = Path(os.environ.get("MIRROR_DEPLOY_LLAMA_CPP") or Path(REAL_MODEL_CACHE) / "llama.cpp" / LLAMA_CPP_VERSION)
needs_build = pytest.mark.skipif(not (BUILD / "bin" / "llama-server").exists(),
                                 reason=f"llama.cpp not built at {BUILD} (make llama-cpp)")

PROMPT = [2, 10, 20, 30, 40, 50, 3, 12, 7, 9]
N = 16
VOCAB = 160   # as test_peers: not 2 x hidden


def test_missing_build_names_make_target(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRROR_DEPLOY_LLAMA_CPP", str(tmp_path / "empty"))
    for make in (lambda: LlamaCpp(tmp_path / "t.gguf"), lambda: convert_to_gguf(tmp_path)):
        with pytest.raises(MirrorDeployError, match="llama.cpp is not built") as err:
            make()
        assert "make llama-cpp" in str(err.value)


def test_peer_names_and_factories():
    class Manifest:   # make_peers reads only these
        target, draft, has_draft, target_weights = {"path": "t"}, None, False, "fp32"
    with pytest.raises(MirrorDeployError, match="need the draft"):
        make_peers(["llama-cpp-sd@1t"], Manifest())
    assert [n for n, _ in make_peers(["llama-cpp@1t", "llama-cpp@2t"], Manifest())] == ["llama-cpp@1t", "llama-cpp@2t"]


def _byte_level_bpe(vocab_size: int):
    """The tiny tokenizer's ids as a byte-level BPE with one merge: the converter writes a BPE vocab only
    from a tokenizer with merges, and llama.cpp refuses a BPE vocab without them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode
    b2u = bytes_to_unicode()
    vocab = {}
    for text, i in tiny_tokenizer(vocab_size).get_vocab().items():
        plain = len(text) == 1 and text not in SPECIALS
        vocab["".join(b2u[b] for b in text.encode()) if plain else text] = i
    vocab["ab"] = vocab.pop("<extra_0>")
    core = Tokenizer(models.BPE(vocab, [("a", "b")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|endoftext|>",
                                   additional_special_tokens=SPECIALS[2:])


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, request):
    if not (BUILD / "bin" / "llama-server").exists():
        pytest.skip(f"llama.cpp not built at {BUILD} (make llama-cpp)")
    mp = pytest.MonkeyPatch()
    request.addfinalizer(mp.undo)
    mp.setenv("MIRROR_DEPLOY_LLAMA_CPP", str(BUILD))
    target, draft = build_tiny_pair(tmp_path_factory.mktemp("llama-cpp"), "qwen2", vocab_size=VOCAB)
    tok = _byte_level_bpe(VOCAB)
    for folder in (target, draft):
        tok.save_pretrained(folder)
    cache = tmp_path_factory.mktemp("gguf")
    # "default": llama.cpp does not know the tiny tokenizer's pre-tokenizer (we send ids, never text)
    return target, convert_to_gguf(target, cache, "default"), convert_to_gguf(draft, cache, "default")


def _run(method, prompt=PROMPT, n=N):
    try:
        return method.generate(prompt, n, 0.0, 0)
    finally:
        method.close()


@needs_build
def test_llama_cpp_sd_equals_ar_and_transformers(ggufs):
    import torch
    from transformers import AutoModelForCausalLM
    target, t_gguf, d_gguf = ggufs
    assert gguf_for(t_gguf) == t_gguf and t_gguf.stat().st_size > 0
    ar_peer, sd_peer = LlamaCpp(t_gguf, threads=1), LlamaCpp(t_gguf, d_gguf, threads=1, draft_max=4)
    assert (ar_peer.name, sd_peer.name) == ("llama-cpp@1t", "llama-cpp-sd@1t")
    ar, sd = _run(ar_peer), _run(sd_peer)
    assert len(ar.tokens) == N and len(sd.tokens) == N
    assert sd.tokens == ar.tokens
    assert ar.seconds > 0 and ar.figures["target_calls"] == N and ar.figures["server_tok_s"] > 0
    assert sd.figures["draft_tokens"] > 0 and 0.0 <= sd.figures["acceptance"] <= 1.0
    assert sd.figures["target_calls"] == N - sd.figures["accepted_tokens"]

    # transformers fp32 greedy on the same checkpoint, with llama.cpp's end-of-generation tokens masked as
    # its ignore_eos masks them (<|endoftext|>, <|im_end|>): the same tokens, bar float near-ties
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    eog = [tiny_tokenizer(VOCAB).convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")]
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=N, do_sample=False,
                             suppress_tokens=eog, pad_token_id=0)
    want = out[0, len(PROMPT):].tolist()
    agree = next((i for i, (a, b) in enumerate(zip(ar.tokens, want)) if a != b), N)
    print(f"\nllama.cpp AR vs transformers fp32 greedy: first {agree}/{N} tokens agree; "
          f"SD acceptance {sd.figures['acceptance']:.2f} ({sd.figures['accepted_tokens']}/{sd.figures['draft_tokens']})")
    assert agree >= 8, (ar.tokens, want)


@needs_build
def test_llama_cpp_server_failure_shows_its_log(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRROR_DEPLOY_LLAMA_CPP", str(BUILD))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(MirrorDeployError, match="llama-server exited"):
        LlamaCpp(bad)
