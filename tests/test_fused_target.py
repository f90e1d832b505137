"""The fused target segments (GroupQueryAttention over in-place K/V, packed projections): the same logits as
the traced segments and HF, windows after a rollback, in-place binding, capacity, check, export choices."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from rich.console import Console
from transformers import MistralConfig, Qwen3Config

from mirror_deploy.artifact import MANIFEST, read_manifest, sha256_file
from mirror_deploy.check import FAIL, PASS, check_artifact
from mirror_deploy.decoding.drive import TargetDriver
from mirror_deploy.decoding.engine import Engine
from mirror_deploy.errors import MirrorDeployError
from mirror_deploy.export.loading import open_source
from mirror_deploy.export.pipeline import ExportOptions, export_artifact, target_attention
from mirror_deploy.runtimes.kv import InPlaceKV, KVCache
from mirror_deploy.runtimes.loader import open_target
from mirror_deploy.targets import Profile, load_profile
from mirror_deploy.tiny import build_model, perturbed, tiny_config, tiny_tokenizer

QUIET = Console(quiet=True)
OPTS = dict(kappa=4, gamma=4, max_context=64, branch_batch=4)
WINDOWS = [(0, 11), (11, 5), (16, 1), (17, 5), (14, 6)]   # the last starts before the cache end: a rollback


def _config(arch: str):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=1)
    if arch == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    return tiny_config(arch)


def _pair(folder, arch: str):
    """A tiny target (qwen2: with non-zero q/k/v biases, so the packed bias is exercised) and its draft."""
    target = build_model(_config(arch), 0, scale=3.0)
    with torch.no_grad():
        for p in target.parameters():
            if p.dim() == 1 and arch == "qwen2":
                p.add_(torch.randn_like(p) * 0.5)
    paths = []
    for name, model in (("target", target), ("draft", perturbed(target, 0.3, 1))):
        model.save_pretrained(folder / name)
        tiny_tokenizer().save_pretrained(folder / name)
        paths.append(folder / name)
    return paths


@pytest.fixture(scope="module")
def fused_and_eager(tmp_path_factory):
    """Per architecture: the same target exported fused and eager, and the target's HF model. Only qwen2's
    artifacts, which the decoding and check tests run, carry the draft: the others test the target's graphs."""
    out = {}
    for arch in ("llama", "qwen2", "qwen3", "mistral"):
        root = tmp_path_factory.mktemp(arch)
        target, draft = _pair(root, arch)
        draft = draft if arch == "qwen2" else None
        arts = {kind: export_artifact(target, draft, root / kind, ExportOptions(target_attention=kind, **OPTS), QUIET)
                for kind in ("fused", "eager")}
        out[arch] = arts, open_source(target, "target").load_model()
    return out


def _driver(art):
    m = read_manifest(art)
    return TargetDriver.for_manifest(open_target(art, m, Profile.from_dict(m.profile)), m)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_fused_windows_match_eager_and_hf(fused_and_eager, arch):
    arts, model = fused_and_eager[arch]
    assert read_manifest(arts["fused"]).target_attention == "fused"
    ids = np.random.default_rng(1).integers(0, 128, 22)
    with torch.no_grad():
        hf = model(torch.tensor(ids)[None]).logits[0].numpy()
    drivers = {kind: _driver(art) for kind, art in arts.items()}
    assert isinstance(drivers["fused"].kv[0], InPlaceKV) and isinstance(drivers["eager"].kv[0], KVCache)
    for start, seq in WINDOWS:
        got = {kind: d.window(ids[start:start + seq], start=start) for kind, d in drivers.items()}
        np.testing.assert_allclose(got["fused"]["logits"], hf[start:start + seq], atol=1e-4)
        np.testing.assert_allclose(got["fused"]["logits"], got["eager"]["logits"], atol=1e-4)
        np.testing.assert_allclose(got["fused"]["exit_logprobs"], got["eager"]["exit_logprobs"], atol=1e-4)
    assert drivers["fused"].length == 20


def test_fused_kv_is_written_in_place_and_nowhere_else(fused_and_eager):
    """The present outputs ARE the bound buffers (same memory), and a window writes only its own slots."""
    art = fused_and_eager["qwen2"][0]["fused"]
    driver = _driver(art)
    driver.window(np.arange(10))
    cache, graph = driver.kv[1], driver.graphs.segments[1]
    for buf in cache.buffers.values():
        buf[:, :, 13:] = 7.0                                     # sentinel after the next window
    before = {k: b[:, :, :10].copy() for k, b in cache.buffers.items()}
    feeds = {**driver.window_feeds(10, 3), "hidden_states": np.ones((1, 3, 64), np.float32)}
    binding = graph.bind(feeds, cache.bound)
    graph.session.run_with_iobinding(binding)
    outputs = dict(zip([o for o, _ in cache.bound.values()], binding.get_outputs()))
    for past, (present, buf) in cache.bound.items():
        assert outputs[present].data_ptr() == buf.ctypes.data
        assert np.array_equal(buf[:, :, :10], before[past])       # committed slots untouched
        assert (buf[:, :, 13:] == 7.0).all() and not (buf[:, :, 10:13] == 7.0).any()


def test_capacity_overflow_is_refused_before_any_call(fused_and_eager):
    driver = _driver(fused_and_eager["llama"][0]["fused"])
    driver.window(np.arange(60))
    calls = [g.timer.calls for g in driver.graphs.segments]
    with pytest.raises(MirrorDeployError) as err:
        driver.window(np.arange(5))                             # 60 + 5 > 64
    assert "65 KV positions" in err.value.problem and "--max-context" in err.value.fix
    assert [g.timer.calls for g in driver.graphs.segments] == calls and driver.length == 60


@pytest.mark.parametrize("mode,schedule", [("sd", "serial"), ("mirror", "serial"), ("mirror", "overlapped")])
def test_every_mode_equals_ar_on_fused_and_eager(fused_and_eager, mode, schedule):
    from mirror_deploy.decoding.config import GenerationConfig as G
    arts = fused_and_eager["qwen2"][0]
    engines = {kind: Engine(art) for kind, art in arts.items()}
    for prompt in ("Hello world", "def f(n):"):
        ar = {k: e.generate(prompt, G(max_new_tokens=20, mode="ar", stop_at_eos=False)).tokens
              for k, e in engines.items()}
        assert ar["fused"] == ar["eager"]
        got = engines["fused"].generate(prompt, G(max_new_tokens=20, mode=mode, schedule=schedule, stop_at_eos=False))
        assert got.tokens == ar["fused"], (prompt, mode, schedule)


def test_check_passes_on_fused_and_fails_on_corrupted(fused_and_eager, tmp_path):
    art = fused_and_eager["qwen2"][0]["fused"]
    report = check_artifact(art)
    rows = {(r.check, r.graph): r for r in report.rows}
    assert report.ok, [r for r in report.rows if r.result == FAIL]
    assert rows[("fused attention", "target")].result == PASS and "4 of 4 layers" in rows[("fused attention", "target")].detail
    # A wrong weight whose hash is re-recorded: only the parity comparison can catch it.
    bad = shutil.copytree(art, tmp_path / "bad")
    path = bad / "target_seg1.onnx"
    model = onnx.load(str(path))
    weight = next(t for t in model.graph.initializer if t.name.endswith("o_proj.weight"))
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * 1.5, weight.name))
    onnx.save(model, str(path))
    manifest = json.loads((bad / MANIFEST).read_text())
    manifest["graphs"]["target_seg1"]["sha256"]["target_seg1.onnx"] = sha256_file(path)
    (bad / MANIFEST).write_text(json.dumps(manifest))
    failed = {(r.check, r.graph) for r in check_artifact(bad).rows if r.result == FAIL}
    assert ("parity logits", "target") in failed
    # A manifest that calls fused segments eager disagrees with itself.
    manifest["target_attention"] = "eager"
    (bad / MANIFEST).write_text(json.dumps(manifest))
    assert ("manifest", MANIFEST) in {(r.check, r.graph) for r in check_artifact(bad).rows if r.result == FAIL}


def test_schema_2_artifacts_still_load_as_eager(fused_and_eager, tmp_path):
    old = shutil.copytree(fused_and_eager["llama"][0]["eager"], tmp_path / "old")
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["schema_version"] = 2
    del manifest["target_attention"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert read_manifest(old).target_attention == "eager"
    assert check_artifact(old, skip_parity=True).ok


def test_export_choice_of_target_attention(fused_and_eager, tiny_pairs, tmp_path):
    qwen = open_source(tiny_pairs["qwen2"][0], "target")
    gpt2 = open_source(tiny_pairs["gpt2"][0], "target")
    cpu = load_profile("cpu-sim")
    ov_file = tmp_path / "ov-target.toml"
    ov_file.write_text('name = "ov-target"\ndescription = "target on OpenVINO"\n'
                       '[target]\nbackend = "openvino"\ndevice = "CPU"\nthreads = 1\n'
                       '[draft]\nbackend = "openvino"\ndevice = "CPU"\nthreads = 1\n')
    ov = load_profile(str(ov_file))
    assert target_attention(qwen, cpu, ExportOptions()) == "fused"
    assert target_attention(gpt2, cpu, ExportOptions()) == "eager"
    assert target_attention(qwen, ov, ExportOptions()) == "fused"   # OpenVINO-native (test_openvino_target.py)
    assert target_attention(gpt2, ov, ExportOptions()) == "eager"
    assert target_attention(qwen, ov, ExportOptions(target_weights="int4")) == "eager"   # 64 wide: no groups of 128
    for source, profile in ((gpt2, cpu), (gpt2, ov)):
        with pytest.raises(MirrorDeployError, match="--target-attention fused is not available"):
            target_attention(source, profile, ExportOptions(target_attention="fused"))
    with pytest.raises(MirrorDeployError, match="unknown"):
        target_attention(qwen, cpu, ExportOptions(target_attention="flash"))
    # A fused ONNX Runtime artifact opened for an OpenVINO target is refused with the fix, not run wrongly.
    art = fused_and_eager["llama"][0]["fused"]
    with pytest.raises(MirrorDeployError, match="--target-attention eager"):
        open_target(art, read_manifest(art), ov)


def test_large_fused_segments_go_to_a_side_file(tiny_pairs, tmp_path, monkeypatch):
    """Real segments pass protobuf's 2 GiB: their weights go to `.onnx.data`, hashed and checked with the graph."""
    import mirror_deploy.export.fused_target as fused_target
    monkeypatch.setattr(fused_target, "_EXTERNAL_DATA_BYTES", 0)
    art = export_artifact(*tiny_pairs["llama"], tmp_path / "art", ExportOptions(**OPTS), QUIET)
    entry = read_manifest(art).graphs["target_seg1"]
    assert (art / "target_seg1.onnx.data").is_file() and "target_seg1.onnx.data" in entry.sha256
    assert check_artifact(art).ok
