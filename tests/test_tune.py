"""`mirror-deploy tune`: deterministic statistics and choice, tuned defaults that stay lossless, a
tuning file `check` guards, and bad input refused with the artifact left as it was."""
from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mirror_deploy import cli
from mirror_deploy.check import FAIL, PASS, check_artifact
from mirror_deploy.decoding.config import GenerationConfig as G
from mirror_deploy.decoding.engine import Engine
from mirror_deploy.errors import MirrorDeployError
from mirror_deploy.tuning import store, tune
from mirror_deploy.tuning.prompts import pick, read_prompts
from mirror_deploy.tuning.simulate import needed_ranks, replay
from mirror_deploy.tuning.teacher import measure_sequence

QUIET = Console(quiet=True)
FAST = dict(prompts=6, new_tokens=16, rounds=1, measure_prompts=1)


def _copy(folder, tmp_path, name):
    return shutil.copytree(folder, tmp_path / name)


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def tuned(tiny_artifacts, tmp_path_factory):
    folder = _copy(tiny_artifacts["llama"], tmp_path_factory.mktemp("tuned"), "art")
    return folder, tune.tune_artifact(folder, tune.TuneOptions(seed=3, **FAST), QUIET)


def test_tuning_is_deterministic_for_a_seed(tuned, tmp_path, monkeypatch):
    """Everything but wall-clock timings follows from the seed; with the same timings, the same choice."""
    first_folder, first = tuned
    monkeypatch.setattr(tune, "measure_curves", lambda *a, **k: first["curves_ms"])
    monkeypatch.setattr(tune, "probe_overheads", lambda *a, **k: first["overhead_ms_per_step"])
    again = tune.tune_artifact(_copy(first_folder, tmp_path, "again"), tune.TuneOptions(seed=3, **FAST), QUIET)
    for key in ("calibration", "statistics", "choice", "top_mirror_configs", "sd_by_gamma", "predicted_tokens_per_s"):
        assert again[key] == first[key], key
    prompts, _ = read_prompts()
    assert [p.line for p in pick(prompts, 6, 3)] != [p.line for p in pick(prompts, 6, 4)]
    assert len({p.category for p in pick(prompts, 6, 3)}) == 6      # one per category first


def test_the_learned_exits_training_prompts_are_measured_last(tiny_artifacts, tmp_path):
    """Exit hit rates measured on the exits' own training text are optimistic: tune picks other prompts
    first, and says when it has to use training prompts."""
    from mirror_deploy.artifact import read_manifest
    from mirror_deploy.tuning.attach import attach
    from mirror_deploy.tuning.calibration import prompt_sha256
    from mirror_deploy.tuning.translator import AffineTranslator

    folder = _copy(tiny_artifacts["llama"], tmp_path, "art")
    prompts, _ = read_prompts()
    fitting, _, _, _ = tune.encode_prompts(Engine(folder), tune.TuneOptions(prompts=len(prompts)), folder, QUIET)
    held = {p.line for p in pick([p for p, _ in fitting], 6, seed=9)}    # one per category stays unseen
    manifest = read_manifest(folder)     # identity translators, recorded as trained on all but `held`
    attach(folder, {b: AffineTranslator(manifest.target["hidden_size"]) for b in manifest.exit_layers}, None,
           [prompt_sha256(p.prompt) for p in prompts if p.line not in held])
    engine = Engine(folder)
    chosen, _, _, overlap = tune.encode_prompts(engine, tune.TuneOptions(prompts=6), folder, QUIET)
    assert {p.line for p, _ in chosen} == held and overlap == 0
    console = Console(record=True, width=200)
    chosen, _, _, overlap = tune.encode_prompts(engine, tune.TuneOptions(prompts=8), folder, console)
    assert held < {p.line for p, _ in chosen} and len(chosen) == 8 and overlap == 2
    assert "2 of the 8 calibration prompts trained" in console.export_text()


def test_tune_records_its_figures_and_the_manifest_hash(tuned):
    folder, data = tuned
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["tuning"]["file"] == "tuning.json"
    assert json.loads((folder / "tuning.json").read_text()) == json.loads(json.dumps(data))
    stats = data["statistics"]
    assert set(stats["exit_hit_rate"]) == {"1", "2", "3"}          # every exported boundary
    for rates in stats["exit_hit_rate"].values():
        assert list(rates.values()) == sorted(rates.values())      # a wider top-κ never hits less
    coverage = next(iter(stats["branch_coverage_at_chosen_gamma"].values()))
    assert coverage["0"] == 0 and list(coverage.values()) == sorted(coverage.values())
    assert len(stats["acceptance_per_depth"]) == 4
    for mode in ("ar", "sd", "mirror"):
        row = data["check"]["modes"][mode]
        assert row["equal_to_ar"] and row["tokens_per_s"] > 0 and row["predicted_tokens_per_s"] > 0
    # The zero-draft bound prices every step at a full γ window, while Mirror's policy may run shorter ones; on
    # tiny models whose window costs are timing noise the ratio went past 1 (1.22 in one run of three), so only
    # its presence and sign are this test's subject.
    assert 0 < data["mirror_over_bound"] and 0 < data["check"]["mirror_over_bound"]["measured"]


def test_replay_matches_a_real_mirror_run(tiny_artifacts):
    """The replayed steps are the real run's steps, and the replayed ranking is the worker's."""
    engine = Engine(tiny_artifacts["llama"])
    m = engine.manifest
    ids = engine.encode("def fib(n):", chat=False)
    seq = measure_sequence(engine, ids, 24, "code")
    cfg = G(max_new_tokens=24, mode="mirror", schedule="serial", stop_at_eos=False, gamma=m.gamma,
            branch_budget=m.branch_batch, exit_layer=m.exit_layer, kappa=m.kappa)
    real = engine.generate(ids, cfg)
    assert real.tokens == seq.tokens[len(ids):]
    steps = replay([seq], m.gamma)
    # The last step may accept drafts past the requested length, which the replay cannot see.
    assert [s.accepted for s in real.metrics.steps][:-1] == steps.accepted.tolist()[:-1]
    ranks = needed_ranks([seq], steps, m.exit_layer, m.kappa, m.gamma)[:-1]
    recorded = np.array([s.needed_rank for s in real.metrics.steps])[:-1]   # in the whole ranking
    assert [0 <= r < m.branch_batch for r in recorded] == [s.reused for s in real.metrics.steps][:-1]
    for budget in range(1, m.branch_batch + 1):
        covered = lambda r: (r >= 0) & (r < budget)
        assert (covered(ranks) == covered(recorded)).mean() >= 0.9, (budget, ranks, recorded)


def _write_choice(folder, data, **mirror):
    edited = json.loads(json.dumps(data))
    edited["choice"]["mirror"].update(mirror)
    store.write_tuning(folder, edited)


def test_tuned_artifact_decodes_every_mode_equal_to_ar(tuned, tmp_path):
    folder = _copy(tuned[0], tmp_path, "art")
    _write_choice(folder, tuned[1], exit_layer=3, kappa=2, gamma=2, branch_budget=1)   # not the defaults
    engine = Engine(folder)
    for prompt in ["Hello world", "def f(n):", "x"]:
        expected = engine.generate(prompt, G(max_new_tokens=20, mode="ar", stop_at_eos=False)).tokens
        for mode, schedule in [("sd", "serial"), ("mirror", "serial"), ("mirror", "overlapped")]:
            for adaptive in (False, True):
                result = engine.generate(prompt, G(max_new_tokens=20, mode=mode, schedule=schedule, lookup=False,
                                                   adaptive_gamma=adaptive, stop_at_eos=False))
                assert result.tokens == expected, (prompt, mode, schedule, adaptive)
                tuned_gamma = 2 if mode == "mirror" else tuned[1]["choice"]["sd"]["gamma"]
                windows = [s.window for s in result.metrics.steps]
                branches = max(s.branches for s in result.metrics.steps)
                assert result.metrics.gamma == tuned_gamma
                assert branches <= (2 if mode == "mirror" else 0)   # budget 1 (+ the bonus guess)
                if adaptive:   # the window policy sizes each window within the tuned values
                    assert max(windows) <= tuned_gamma
                else:          # held at them
                    assert set(windows) == {tuned_gamma}
                if mode == "mirror":
                    assert engine.target.kappa == 2 and engine.target.exit_layers[engine.target.split - 1] == 3
    flagged = engine.generate("abc", G(max_new_tokens=8, mode="mirror", gamma=4, kappa=4, stop_at_eos=False))
    assert flagged.metrics.gamma == 4 and engine.target.kappa == 4                 # flags override


def test_edited_tuning_file_is_caught(tuned, tmp_path):
    folder = _copy(tuned[0], tmp_path, "art")
    path = folder / "tuning.json"
    path.write_text(path.read_text().replace('"gamma": ', '"gamma": 1', 1))
    report = check_artifact(folder, skip_parity=True)
    row = next(r for r in report.rows if r.check == "tuning")
    assert row.result == FAIL and "differs from the hash" in row.detail and not report.ok
    with pytest.raises(MirrorDeployError, match="differs from the hash"):
        Engine(folder)
    result = CliRunner().invoke(cli.app, ["check", str(folder), "--skip-parity"], env={"COLUMNS": "200"})
    assert result.exit_code == 1


def test_tuning_outside_the_artifact_limits_is_caught(tuned, tmp_path):
    folder = _copy(tuned[0], tmp_path, "art")
    assert next(r for r in check_artifact(folder, skip_parity=True).rows if r.check == "tuning").result == PASS
    _write_choice(folder, tuned[1], exit_layer=0, branch_budget=9)
    row = next(r for r in check_artifact(folder, skip_parity=True).rows if r.check == "tuning")
    assert row.result == FAIL and "was not exported" in row.detail and "budget 9" in row.detail


def _tune_cli(folder, *args):
    return CliRunner().invoke(cli.app, ["tune", str(folder), "--prompts", "2", "--new-tokens", "8",
                                        "--rounds", "1", "--measure-prompts", "0", *args], env={"COLUMNS": "200"})


def test_absent_devices_are_refused_like_run(tiny_artifacts, tmp_path):
    folder = _copy(tiny_artifacts["llama"], tmp_path, "art")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["profile"]["draft"]["device"] = "NPU"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(folder)
    result = _tune_cli(folder)
    assert result.exit_code == 2 and "'NPU' is not present" in result.output
    assert _snapshot(folder) == before


@pytest.mark.parametrize("content, phrase", [
    (None, "does not exist"),
    ("", "is empty"),
    ('{"category": "chat", "prompt": "hi"}\nnot json\n', "line 2, is not a JSON object"),
    ('{"category": "qa", "prompt": "' + "long " * 80 + '"}\n', "line 1 of"),
])
def test_bad_calibration_files(tiny_artifacts, tmp_path, content, phrase):
    folder = _copy(tiny_artifacts["llama"], tmp_path, "art")
    calibration = tmp_path / "prompts.jsonl"
    if content is not None:
        calibration.write_text(content)
    before = _snapshot(folder)
    result = _tune_cli(folder, "--calibration", str(calibration))
    assert result.exit_code == 2 and phrase in result.output, result.output
    assert _snapshot(folder) == before


def test_interrupted_tune_leaves_the_artifact_as_it_was(tuned, tmp_path, monkeypatch):
    folder = _copy(tuned[0], tmp_path, "art")
    before = _snapshot(folder)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(tune, "measure_modes", interrupt)
    result = _tune_cli(folder, "--measure-prompts", "1")
    assert result.exit_code == 130 and _snapshot(folder) == before
    monkeypatch.undo()

    def fail_first_rename(src, dst):             # interrupted before the renames: temp files go too
        raise KeyboardInterrupt
    monkeypatch.setattr(store.os, "replace", fail_first_rename)
    with pytest.raises(KeyboardInterrupt):
        store.write_tuning(folder, tuned[1])
    assert _snapshot(folder) == before and not [p for p in folder.iterdir() if ".tmp-" in p.name]
    monkeypatch.undo()
    real_replace, renamed = os.replace, []

    def ctrl_c_between_renames(src, dst):        # Ctrl-C right after tuning.json is in place
        real_replace(src, dst)
        renamed.append(dst)
        if len(renamed) == 1:                    # what Python does when SIGINT arrives (no real signal:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)   # the runtimes' threads are alive)
    monkeypatch.setattr(store.os, "replace", ctrl_c_between_renames)
    edited = json.loads(json.dumps(tuned[1]))
    edited["seed"] = 99
    with pytest.raises(KeyboardInterrupt):       # held until the manifest is in place too
        store.write_tuning(folder, edited)
    monkeypatch.undo()
    assert len(renamed) == 2 and Engine(folder, load_draft=False).tuning["seed"] == 99


def test_bench_exits_runs_mirror_configs_beside_sd(tiny_artifacts, tmp_path, capsys):
    from mirror_deploy.bench import exits
    out = tmp_path / "exits"
    assert exits.main([str(tiny_artifacts["llama"]), "--configs", "2:2", "--max-new-tokens", "6",
                       "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    methods = ["ar", "sd", "mirror", "mirror@2:2"]
    assert {r["method"] for r in records} == set(methods)
    assert all(r["figures"]["mean_window"] <= 2 for r in records if r["method"] == "mirror@2:2")   # γ = 2 held
    table = capsys.readouterr().out
    assert all(f"| {m} |" in table for m in methods)
    assert exits.main([str(tiny_artifacts["llama"]), "--configs", "14"]) == 2
    assert "EXIT:GAMMA" in capsys.readouterr().err
    bad = tmp_path / "bad"
    assert exits.main([str(tiny_artifacts["llama"]), "--configs", "99:2", "--out", str(bad)]) == 2
    assert "exit layer 99 was not exported" in capsys.readouterr().err and not bad.exists()


def test_tune_over_placements_keeps_the_fastest(tiny_artifacts, tmp_path, monkeypatch):
    """`tune --profile cpu --profile cpu-sim`: each placement tuned, the fastest kept and recorded, and it
    becomes the profile a plain run uses."""
    folder = _copy(tiny_artifacts["llama"], tmp_path, "placed")
    fake = {"cpu": 10.0, "cpu-sim": 12.0}
    monkeypatch.setattr(tune, "placement_speed", lambda data: fake[data["profile"]])
    data = tune.tune_artifact(folder, tune.TuneOptions(seed=3, **FAST), QUIET, placements=["cpu", "cpu-sim"])
    assert data["placement"]["chosen"] == "cpu-sim" == data["profile"]
    assert data["placement"]["best_mode_tokens_per_s"] == fake
    assert json.loads((folder / "tuning.json").read_text())["profile"] == "cpu-sim"
    assert Engine(folder).profile.name == "cpu-sim"
    fake.update({"cpu": 13.0})
    result = CliRunner().invoke(cli.app, ["tune", str(folder), "--profile", "cpu", "--profile", "cpu-sim",
                                          "--prompts", "6", "--new-tokens", "16", "--rounds", "1",
                                          "--measure-prompts", "1"])
    assert result.exit_code == 0, result.output
    assert "chosen: cpu" in result.output and Engine(folder).profile.name == "cpu"


def test_placement_speed_reads_the_measured_best_mode(tuned):
    _, data = tuned
    mode = data["choice"]["best_mode"]
    assert tune.placement_speed(data) == data["check"]["modes"][mode]["tokens_per_s"]


def test_sd_takes_lookup_beside_the_draft_where_tune_measured_it_faster(tuned, tmp_path):
    """`tune` records whether SD ran faster with lookup windows beside the draft; where it did, a run that
    names no lookup setting gets it, an explicit False (and bench's plain `sd` column) does not, and the
    output is AR's either way."""
    from mirror_deploy.bench.methods import EngineMethod
    assert "sd" in tuned[1]["lookup_beside"]
    folder = _copy(tuned[0], tmp_path, "art")
    edited = json.loads(json.dumps(tuned[1]))
    edited["lookup_beside"] = {"sd": {"chosen": True}}
    store.write_tuning(folder, edited)
    engine = Engine(folder)
    prompt = "def f(n):\n    return n\ndef f(n):\n    ret"
    expected = engine.generate(prompt, G(max_new_tokens=24, mode="ar", stop_at_eos=False)).tokens
    tuned_run = engine.generate(prompt, G(max_new_tokens=24, mode="sd", stop_at_eos=False))
    plain = engine.generate(prompt, G(max_new_tokens=24, mode="sd", lookup=False, stop_at_eos=False))
    assert tuned_run.tokens == plain.tokens == expected
    assert tuned_run.summary["lookup_windows"] > 0 and plain.summary["lookup_windows"] == 0
    assert EngineMethod(engine, "sd").generate(engine.encode(prompt), 24).figures["lookup_windows"] == 0


def test_lookup_beside_stays_on_through_a_tie_and_goes_off_when_clearly_slower():
    """Two tune runs on the real pair measured sd+lookup at 0.976x and 1.017x plain sd: a tie that flipped
    the default. Within the tolerance it stays on; clearly slower, or unequal to AR, it is off."""
    def measured(on, off, equal=True):
        return {"sd": {"tokens_per_s": off}, tune.BESIDE: {"tokens_per_s": on, "equal_to_ar": equal}}
    assert tune.lookup_choice(measured(29.73, 30.47))["sd"]["chosen"]
    assert tune.lookup_choice(measured(31.16, 30.65))["sd"]["chosen"]
    assert not tune.lookup_choice(measured(28.0, 30.47))["sd"]["chosen"]
    assert not tune.lookup_choice(measured(40.0, 30.47, equal=False))["sd"]["chosen"]
    assert not tune.lookup_choice({"sd": {"tokens_per_s": 30.0}})["sd"]["chosen"]
