"""mirror-deploy's 4-bit kernel (mirror_deploy/kernels): built here with g++ and cmake against the installed
openvino, right against the float product, and row-invariant by construction: a row's bits are the same
alone, in any window of 1-8 rows and beyond (passes of 8), on random and on real weights, on both ISA paths."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REAL_MODEL_CACHE
from mirror_deploy.errors import MirrorDeployError
from mirror_deploy.kernels import layout, status
from mirror_deploy.kernels.build import build, build_dir
from mirror_deploy.kernels.verify import TOLERANCE, compile_matmuls, relative_error


@pytest.fixture(scope="module")
def kernel():
    build()
    s = status()
    if s.isa == "none" and "lacks AVX2" in s.why:
        pytest.skip(f"this CPU has no path for the kernel: {s.why}")
    assert s.available, s.why
    return s


def _packed(w: np.ndarray, group: int = 128):
    codes, scale, minimum = layout.quantize(w, group)
    return layout.pack(codes, scale, minimum, group), layout.dequantize(codes, scale, minimum, group)


def _rows_alone_equal_rows_together(weights: list[layout.Q4Weights], seed: int = 0) -> None:
    request = compile_matmuls(weights, threads=2)
    rng = np.random.default_rng(seed)
    widths = sorted({w.k for w in weights})
    x = {k: rng.standard_normal((17, k)).astype(np.float32) for k in widths}
    alone = [[y.copy() for y in request.infer({f"x{k}": v[i:i + 1] for k, v in x.items()}).values()]
             for i in range(17)]
    for rows in (*range(2, 9), 9, 17):
        for start in (0, 17 - rows):
            together = list(request.infer({f"x{k}": v[start:start + rows] for k, v in x.items()}).values())
            for j, y in enumerate(together):
                for r in range(rows):
                    assert np.array_equal(y[r], alone[start + r][j][0]), (rows, start, r, j)


def test_the_kernel_equals_the_float_product_of_its_weights(kernel):
    assert relative_error() < TOLERANCE


def test_every_row_has_its_own_bits_in_any_window_random_weights(kernel):
    rng = np.random.default_rng(1)
    weights = [_packed((rng.standard_normal((n, k)) * 0.05).astype(np.float32))[0]
               for n, k in ((64, 512), (256, 128), (48, 384))]
    _rows_alone_equal_rows_together(weights)


def test_every_row_has_its_own_bits_in_any_window_real_weights(kernel):
    """Real Qwen2.5-Coder-0.5B projections, as published (its GGUF's blocks, dequantized by gguf-py): read from
    the file alone, so this test neither waits for nor repeats the checkpoint conversion of test_real_weights."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from mirror_deploy.models import gguf_path, pull_gguf

    path = pull_gguf("qwen2.5-coder-0.5b-instruct", cache=REAL_MODEL_CACHE, progress=False)
    assert path == gguf_path("qwen2.5-coder-0.5b-instruct", REAL_MODEL_CACHE)
    names = ("blk.3.attn_q.weight", "blk.3.ffn_down.weight", "blk.3.ffn_gate.weight")
    tensors = {t.name: t for t in GGUFReader(path).tensors if t.name in names}
    weights = [_packed(np.ascontiguousarray(dequantize(tensors[n].data, tensors[n].tensor_type), np.float32))[0]
               for n in names]
    assert [(w.n, w.k) for w in weights] == [(896, 896), (896, 4864), (4864, 896)]
    _rows_alone_equal_rows_together(weights)


def test_both_isa_paths_give_the_same_bits(kernel, tmp_path):
    """The AVX2 path, forced on this machine, against the path chosen at load: same bits, every row."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, numpy as np\n"
        "from mirror_deploy.kernels import layout, status\n"
        "from mirror_deploy.kernels.verify import compile_matmuls\n"
        "rng = np.random.default_rng(2)\n"
        "w = layout.pack(*layout.quantize(rng.standard_normal((80, 640)).astype(np.float32), 128), 128)\n"
        "y = compile_matmuls([w], threads=2).infer({'x640': rng.standard_normal((6, 640)).astype(np.float32)})\n"
        "np.save(sys.argv[1], list(y.values())[0]); print(status().isa, '|', status().why)\n")
    env = {**os.environ}
    results = {}
    for forced in ("", "avx2"):
        env["MIRROR_DEPLOY_Q4_ISA"] = forced
        done = subprocess.run([sys.executable, str(script), str(tmp_path / f"y{forced}.npy")], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        results[forced] = done.stdout.strip()
    assert results["avx2"].startswith("avx2 | forced")
    assert results[""].startswith(kernel.isa)
    assert np.array_equal(np.load(tmp_path / "y.npy"), np.load(tmp_path / "yavx2.npy"))


def test_a_wrong_build_fails_the_check():
    """A build whose scale is broken on purpose (a compiler flag) is caught by the kernel's own check."""
    build("-DMIRROR_Q4_BROKEN_SCALE")
    code = "from mirror_deploy.kernels.verify import relative_error as e; print(e('-DMIRROR_Q4_BROKEN_SCALE'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)   # its own process:
    assert done.returncode == 0, done.stderr                            # one op type per process
    assert float(done.stdout) > TOLERANCE


def test_an_altered_library_is_refused_with_the_fix(kernel, tmp_path, monkeypatch):
    import openvino as ov

    from mirror_deploy.kernels import load_into

    monkeypatch.setenv("MIRROR_DEPLOY_CACHE", str(tmp_path))
    copy = build_dir() / "libmirror_q4.so"
    shutil.copytree(kernel.path.parent, copy.parent)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    assert not status().available and "sha256" in status().why
    with pytest.raises(MirrorDeployError) as raised:
        load_into(ov.Core())
    assert "mirror_deploy.kernels build --force" in raised.value.fix
    stamp = copy.parent / "stamp.json"
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "abi": 0}))
    assert "ABI" in status().why


def test_an_unknown_forced_path_is_reported_not_swapped(kernel, tmp_path):
    done = subprocess.run([sys.executable, "-m", "mirror_deploy.kernels", "status"],
                          env={**os.environ, "MIRROR_DEPLOY_Q4_ISA": "sse9"}, capture_output=True, text=True,
                          timeout=60)
    assert "stock" in done.stdout and "MIRROR_DEPLOY_Q4_ISA=sse9 is unknown" in done.stdout
