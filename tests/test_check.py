"""`mirror-deploy check`: passes on good artifacts, and names what is wrong with a tampered one."""
from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from mirror_deploy import cli
from mirror_deploy.artifact import MANIFEST, read_manifest
from mirror_deploy.check import FAIL, PASS, SKIP, check_artifact
from mirror_deploy.export.pipeline import ExportOptions, export_artifact

runner = CliRunner()


def _copy(folder, tmp_path):
    """Fixtures are session-wide: tamper with a copy."""
    return shutil.copytree(folder, tmp_path / "art")


def _rows(report, result=None):
    return [r for r in report.rows if result is None or r.result == result]


def _check_cli(folder, *args):
    result = runner.invoke(cli.app, ["check", str(folder), *args], env={"COLUMNS": "400"})  # no wrapping
    return result, " ".join(result.output.split())


def test_static_artifact_passes_with_padded_calls(static_artifact):
    report = check_artifact(static_artifact)
    assert report.ok and not _rows(report, SKIP), _rows(report, FAIL)
    by_key = {(r.check, r.graph): r for r in report.rows}
    assert by_key[("static shapes", "draft_static")].result == PASS
    padded = by_key[("parity logits", "draft_static")]
    assert padded.result == PASS and "padded to 5" in padded.detail and padded.error <= 1e-4


def test_cli_check_passes(tiny_artifacts):
    result, text = _check_cli(tiny_artifacts["qwen2"])
    assert result.exit_code == 0, text
    assert "FAIL" not in text and "0 failed" in text and "parity logits" in text


def test_compressed_draft_is_compared_by_top1(tiny_pairs, tmp_path):
    out = export_artifact(*tiny_pairs["llama"], tmp_path / "fp16",
                          ExportOptions(kappa=4, gamma=4, max_context=256, branch_batch=4, draft_weights="fp16"))
    report = check_artifact(out)
    row = next(r for r in report.rows if (r.check, r.graph) == ("parity logits", "draft_stateful"))
    assert report.ok and row.result == PASS
    # fp16 weights really miss the fp32 bound, so the looser rule is what let it pass, and says so
    assert row.error > 1e-4 and "fp16 weights, so top-1 agreement" in row.detail and "top-1" in row.limit


def test_invalid_json_manifest(tiny_artifacts, tmp_path):
    art = _copy(tiny_artifacts["gpt2"], tmp_path)
    text = (art / MANIFEST).read_text()
    (art / MANIFEST).write_text(text.replace('"kappa": 4', '"kappa": 4.5.1', 1))
    result, out = _check_cli(art)
    assert result.exit_code == 1
    assert "manifest.json" in out and "damaged or was edited" in out and "FAIL" in out


def test_edited_number_in_manifest(tiny_artifacts, tmp_path):
    """Still valid JSON and every graph hash still matches, but κ no longer fits the graphs."""
    art = _copy(tiny_artifacts["gpt2"], tmp_path)
    text = (art / MANIFEST).read_text()
    assert text.count('"kappa": 4,') == 1
    (art / MANIFEST).write_text(text.replace('"kappa": 4,', '"kappa": 5,'))
    result, out = _check_cli(art)
    assert result.exit_code == 1 and "FAIL" in out and "manifest.json" in out
    report = check_artifact(art)
    assert not report.ok
    bad = _rows(report, FAIL)
    assert [(r.check, r.graph) for r in bad] == [("manifest", MANIFEST)]
    assert "top_ids ends in 4, the manifest implies 5" in bad[0].detail
    assert all(r.result == PASS for r in report.rows if r.check == "hash")


@pytest.mark.parametrize("damage,file,phrase", [
    ("truncate", "draft_stateful.bin", "hash differs from the manifest (edited or truncated)"),
    ("edit", "target_seg2.onnx", "hash differs from the manifest (edited or truncated)"),
    ("delete", "target_head.onnx", "missing"),
])
def test_damaged_graph_file_is_named(tiny_artifacts, tmp_path, damage, file, phrase):
    art = _copy(tiny_artifacts["llama"], tmp_path)
    path = art / file
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "edit":  # same size, one byte flipped
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    result, text = _check_cli(art, "--skip-parity")
    assert result.exit_code == 1
    assert f"{file}: {phrase}" in text and "FAILED" in text
    graph = next(name for name, e in read_manifest(art).graphs.items() if file in e.sha256)
    report = check_artifact(art, skip_parity=True)
    assert [(r.check, r.graph) for r in _rows(report, FAIL)] == [("hash", graph)]
    assert any(r.check == "load" and r.graph == graph and r.result == SKIP for r in report.rows)


def _moved_sources(art, **changes):
    manifest = read_manifest(art)
    manifest.target.update(changes)
    manifest.save(art)


def test_missing_source_models_fail_parity_unless_skipped(tiny_artifacts, tmp_path):
    art = _copy(tiny_artifacts["llama"], tmp_path)
    _moved_sources(art, path=str(tmp_path / "gone"))
    report = check_artifact(art)
    parity = [r for r in report.rows if r.check.startswith("parity")]
    assert not report.ok and parity and all(r.result == FAIL for r in parity)
    assert "does not exist" in parity[0].detail and "--skip-parity" in parity[0].fix

    result, text = _check_cli(art, "--skip-parity")
    assert result.exit_code == 0, text
    skipped = check_artifact(art, skip_parity=True)
    parity = [r for r in skipped.rows if r.check.startswith("parity")]
    assert parity and all(r.result == SKIP for r in parity) and "skipped" in text


def test_changed_source_model_is_refused(tiny_artifacts, tmp_path):
    art = _copy(tiny_artifacts["llama"], tmp_path)
    _moved_sources(art, weights_sha256="0" * 64)
    report = check_artifact(art)
    parity = [r for r in report.rows if r.check.startswith("parity")]
    assert parity and all(r.result == FAIL and "changed since the export" in r.detail for r in parity)


def test_profile_with_absent_devices(static_artifact):
    """cuda-npu cannot load here; the static draft still compiles on OpenVINO CPU for the NPU."""
    result, text = _check_cli(static_artifact, "--profile", "cuda-npu", "--skip-parity")
    assert result.exit_code == 1
    report = check_artifact(static_artifact, profile="cuda-npu", skip_parity=True)
    failed = {r.graph: r for r in _rows(report, FAIL)}
    assert set(failed) == {"target_seg0", "target_seg1", "target_seg2", "target_seg3", "target_head", "draft_static"}
    assert "'NPU' is not present" in failed["draft_static"].detail and "CPU" in failed["draft_static"].fix
    assert "CUDAExecutionProvider" in failed["target_head"].detail
    compiled = [r for r in report.rows if r.check == "compile" and r.graph == "draft_static"]
    assert [r.result for r in compiled] == [PASS] and "CPU for the NPU" in compiled[0].detail
    assert "present devices: CPU" in text


def test_unknown_folder_is_reported(tmp_path):
    result, text = _check_cli(tmp_path / "nope")
    assert result.exit_code == 1 and "does not exist" in text and "FAIL" in text


def test_wrong_structure_manifest(tiny_artifacts, tmp_path):
    art = _copy(tiny_artifacts["gpt2"], tmp_path)
    data = json.loads((art / MANIFEST).read_text())
    data["graphs"] = ["target_prefix.onnx"]
    (art / MANIFEST).write_text(json.dumps(data))
    report = check_artifact(art)
    assert [(r.check, r.graph, r.result) for r in report.rows] == [("manifest", MANIFEST, FAIL)]


def test_relative_paths_export_then_check_from_another_directory(tiny_pairs, tmp_path, monkeypatch):
    """The config hash once included `_name_or_path` (the path as typed), so every relative export
    failed parity with 'source model changed'."""
    target, draft = tiny_pairs["llama"]
    work = tmp_path / "work"
    shutil.copytree(target.parent, work / "hf")
    monkeypatch.chdir(work)
    result = runner.invoke(cli.app, ["export", "hf/target", "--draft", "hf/draft", "--out", "art",
                                     "--kappa", "4", "--gamma", "4", "--max-context", "256"])
    assert result.exit_code == 0, result.output
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    result, text = _check_cli("../work/art")
    assert result.exit_code == 0 and "0 failed" in text, text


def test_fp32_limit_scales_with_the_logits():
    from mirror_deploy.check import ATOL, RTOL, fp32_limit
    import numpy as np
    assert fp32_limit(np.array([0.5, -2.0]), ATOL) == ATOL               # tiny logits: the floor
    assert fp32_limit(np.array([31.0, -12.0]), ATOL) == pytest.approx(RTOL * 31.0)   # real-model scale


def test_a_quantized_exit_is_judged_by_the_lens_top_token_inside_its_top_k(tmp_path):
    """A flat middle-layer lens: the int4 exit's top-1 often differs from fp32's among near-ties, which is
    fine (it only ranks branches); a broken exit rarely has the lens's top token anywhere in its top-κ."""
    import numpy as np
    from types import SimpleNamespace
    from mirror_deploy.check.report import CheckReport
    from mirror_deploy.check.parity import _exit_row
    rng = np.random.default_rng(0)
    lens = rng.standard_normal((40, 1000)).astype(np.float32)
    order = np.argsort(-lens, axis=-1)[:, :8]
    m = SimpleNamespace(kappa=8, graphs={}, target_weights="int4")

    def judged(ids):
        report = CheckReport(tmp_path, None)
        cat = {"exit_ids": ids, "exit_logprobs": np.take_along_axis(lens, ids, -1)}
        _exit_row(m, report, 18, cat, lens, 1e-4)
        return report.rows[0].result
    near_ties = order[:, [1, 0, 2, 3, 4, 5, 6, 7]]         # every top-1 swapped with the runner-up
    assert judged(near_ties) == PASS
    assert judged(rng.integers(0, 1000, (40, 8))) == FAIL   # a broken exit head
