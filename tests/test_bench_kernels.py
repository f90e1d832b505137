"""`python -m mirror_deploy.bench.kernels`: bad input is refused before anything is built, and the torch
route multiplies what it claims to (the table's "row bits" column compares its rows across call widths)."""
import numpy as np
import pytest

from mirror_deploy.bench import kernels


@pytest.mark.parametrize("argv, problem", [
    (["--gguf", "no-such-file.gguf"], "--gguf no-such-file.gguf is not a file"),
    (["--layers", "0"], "must be at least 1"),
])
def test_bad_input_is_an_error_with_its_fix(argv, problem, capsys):
    with pytest.raises(SystemExit) as exit:
        kernels.main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 1 and problem in err and "fix:" in err


def test_torch_route_matches_its_dequantized_weights():
    rng = np.random.default_rng(0)
    weights = kernels._weights(1, rng)
    route = kernels.torch_route(weights, threads=1, compiled=False)
    a = rng.standard_normal((8, 1536)).astype(np.float32)
    b = rng.standard_normal((8, 8960)).astype(np.float32)
    outs = route(a, b)
    for w, y in zip(weights, outs):
        x = a if w.shape[0] == 1536 else b
        exact = x @ w
        # int4 weights and bf16 activations: close to the fp32 product, not equal
        assert y.shape == exact.shape and np.corrcoef(y.ravel(), exact.ravel())[0, 1] > 0.98
    assert all(np.array_equal(p[:2], q) for p, q in zip(outs, route(a[:2], b[:2])))


def test_bench_commands_end_bad_input_with_the_fix():
    """The benchmarks run as `python -m mirror_deploy.bench.MODULE`: a path that is not what they need is
    one error line with its fix and exit status 1, not a traceback."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "mirror_deploy.bench.formats", "no-such-artifact"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "artifact folder no-such-artifact does not exist" in done.stderr
    assert "fix:" in done.stderr and "Traceback" not in done.stderr


def test_segment_bench_refuses_a_path_that_is_no_checkpoint_before_loading():
    from pathlib import Path

    from mirror_deploy.bench.target_attention import cut_model
    from mirror_deploy.errors import MirrorDeployError
    with pytest.raises(MirrorDeployError, match="no-such-checkpoint does not exist"):
        cut_model(Path("no-such-checkpoint"), 2)
