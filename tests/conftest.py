"""Shared fixtures: tiny random-weight model pairs and their exported artifacts (built once a session)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from mirror_deploy.export.pipeline import ExportOptions, export_artifact
from mirror_deploy.tiny import build_tiny_pair

ARCHS = ("llama", "qwen2", "gpt2")
# Real weights are pulled once into the user's cache, not the per-session one the tests otherwise use.
REAL_MODEL_CACHE = os.environ.get("MIRROR_DEPLOY_CACHE") or str(Path.home() / ".cache" / "mirror-deploy")


# The files that take longest (per-file sums of `pytest --durations=0`, 2026-12-07, a slow run: real weights
# 154 s, decoding 255 before its sampling tests moved to test_sampling.py, streams 104, lookup 98, ...) go to
# the two workers first, so that no long file starts last and runs alone (`make test` distributes whole
# files: --dist loadfile).
SLOW_FIRST = ("test_real_weights.py", "test_decoding.py", "test_sampling.py", "test_streams.py", "test_lookup.py",
              "test_fused_target.py", "test_gguf.py", "test_openvino_target.py", "test_vocab_cut.py", "test_serve.py", "test_lens.py",
              "test_peers.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))   # stable: each file keeps its order


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    os.environ["MIRROR_DEPLOY_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_pair(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_pairs, tmp_path_factory) -> dict[str, Path]:
    """One cpu-sim artifact per architecture (ℓe = 2 of 4 layers, κ = 4, γ = 4, capacity 256), also exported
    for the cuda profile so it holds the ONNX Runtime draft (draft.onnx) beside the stateful one."""
    root = tmp_path_factory.mktemp("artifacts")
    opts = ExportOptions(kappa=4, gamma=4, max_context=256, branch_batch=4, also_profiles=("cuda",))
    return {arch: export_artifact(t, d, root / arch, opts) for arch, (t, d) in tiny_pairs.items()}


@pytest.fixture(scope="session")
def static_artifact(tiny_pairs, tmp_path_factory) -> Path:
    """A llama artifact with the NPU-shaped static draft (built for a static-draft profile)."""
    root = tmp_path_factory.mktemp("static")
    profile = root / "cpu-static.toml"
    profile.write_text(
        'name = "cpu-static"\ndescription = "NPU-shaped draft on OpenVINO CPU"\n'
        '[target]\nbackend = "onnxruntime"\ndevice = "cpu"\nthreads = 1\n'
        '[draft]\nbackend = "openvino"\ndevice = "CPU"\nthreads = 1\nprecision = "f32"\nstatic = true\n')
    t, d = tiny_pairs["llama"]
    opts = ExportOptions(kappa=4, gamma=4, max_context=256, branch_batch=4, profile=str(profile),
                         also_profiles=("cpu-sim",))
    return export_artifact(t, d, root / "art", opts)
