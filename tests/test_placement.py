"""Placement: the whole-machine `cpu` profile (ONNX Runtime target + stateful OpenVINO draft, every core)
stays lossless, its settings reach the runtimes, bad profiles are refused clearly, and the mode `tune`
measured fastest is what a run uses when it names none."""
from __future__ import annotations

import json
import shutil

import pytest
from rich.console import Console
from typer.testing import CliRunner

from mirror_deploy import cli
from mirror_deploy.bench.methods import EngineMethod
from mirror_deploy.costs.tuned import lookup_beside_chosen
from mirror_deploy.decoding.config import GenerationConfig as G
from mirror_deploy.decoding.engine import Engine
from mirror_deploy.errors import MirrorDeployError
from mirror_deploy.runtimes.openvino import OvGraph
from mirror_deploy.targets import Profile, load_profile
from mirror_deploy.tuning import store, tune

QUIET = Console(quiet=True)
FAST = dict(prompts=6, new_tokens=16, rounds=1, measure_prompts=1)
PROMPTS = ["Hello world", "def f(n):", "x"]


def test_cpu_profile_decodes_every_mode_equal_to_ar(tiny_artifacts):
    engine = Engine(tiny_artifacts["qwen2"], "cpu")
    assert isinstance(engine.draft.graph, OvGraph) and engine.draft.graph.stateful   # the fast stateful draft
    config = engine.draft.graph.compiled.get_property
    assert config("ENABLE_CPU_PINNING") is False
    session = engine.target.graphs.segments[0].session
    assert session.get_session_options().intra_op_num_threads == 0                  # every core
    options = session.get_session_options()
    with pytest.raises(RuntimeError):                                                     # spins within a call
        options.get_session_config_entry("session.intra_op.allow_spinning")             # (ORT's default: on)
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"        # never after it
    for prompt in PROMPTS:
        expected = engine.generate(prompt, G(max_new_tokens=24, mode="ar", stop_at_eos=False)).tokens
        for mode, schedule in [("sd", "serial"), ("mirror", "serial"), ("mirror", "overlapped")]:
            got = engine.generate(prompt, G(max_new_tokens=24, mode=mode, schedule=schedule, stop_at_eos=False))
            assert got.tokens == expected, (prompt, mode, schedule)


def _profile_text(**target) -> str:
    lines = [f"{k} = {json.dumps(v)}" for k, v in {"backend": "onnxruntime", "device": "cpu", **target}.items()]
    return ('name = "mine"\n[target]\n' + "\n".join(lines) +
            '\n[draft]\nbackend = "openvino"\ndevice = "CPU"\nthreads = 1\n')


@pytest.mark.parametrize("target, phrase", [
    ({"threads": -2}, "target.threads = -2 is not a thread count"),
    ({"threads": "all"}, "target.threads = 'all' is not a thread count"),
    ({"threads": 1.5}, "target.threads = 1.5 is not a thread count"),
    ({"threads": True}, "target.threads = True is not a thread count"),
    ({"threads": 1, "spinning": "no"}, "target.spinning = 'no' is not true or false"),
    ({"threads": 1, "prefix_threads": 2}, "prefix_threads is no longer supported"),
    ({"threads": 1, "pinning": True}, "target.pinning applies to the openvino backend only"),
])
def test_bad_thread_values_are_refused(tiny_artifacts, tmp_path, target, phrase):
    path = tmp_path / "mine.toml"
    path.write_text(_profile_text(**target))
    with pytest.raises(MirrorDeployError, match="mine.toml") as caught:
        load_profile(str(path))
    assert phrase in caught.value.problem and caught.value.fix
    result = CliRunner().invoke(cli.app, ["run", str(tiny_artifacts["llama"]), "--prompt", "hi", "--profile",
                                          str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and phrase in " ".join(result.output.split())


def test_manifests_with_the_retired_unset_keys_still_load(tiny_artifacts):
    data = json.loads((tiny_artifacts["llama"] / "manifest.json").read_text())["profile"]
    data["target"].update(prefix_threads=None, suffix_threads=None)      # what older exports recorded
    assert Profile.from_dict(data).target.threads == 1


@pytest.fixture(scope="module")
def tuned_on_cpu(tiny_artifacts, tmp_path_factory):
    """A cpu-sim artifact tuned with --profile cpu."""
    folder = shutil.copytree(tiny_artifacts["llama"], tmp_path_factory.mktemp("placement") / "art")
    return folder, tune.tune_artifact(folder, tune.TuneOptions(seed=1, profile="cpu", **FAST), QUIET)


def _with_best(folder, data, best):
    edited = json.loads(json.dumps(data))
    edited["choice"]["best_mode"] = best
    store.write_tuning(folder, edited)


def test_tune_on_another_profile_makes_it_the_artifacts(tuned_on_cpu):
    folder, data = tuned_on_cpu
    assert data["profile"] == "cpu" and data["choice"]["best_mode"] in ("ar", "sd", "mirror")
    assert json.loads((folder / "manifest.json").read_text())["profile"]["name"] == "cpu"
    assert Engine(folder, load_draft=False).profile == load_profile("cpu")


@pytest.mark.parametrize("best", ["sd", "ar"])
def test_tuned_best_mode_is_the_default_and_a_named_mode_wins(tuned_on_cpu, tmp_path, best):
    folder = shutil.copytree(tuned_on_cpu[0], tmp_path / "art")
    _with_best(folder, tuned_on_cpu[1], best)
    engine = Engine(folder)
    plain = engine.generate("def f(n):", G(max_new_tokens=12, stop_at_eos=False))
    assert plain.summary["mode"] == best and plain.summary["mode_source"] == "tuned best on cpu"
    named = engine.generate("def f(n):", G(max_new_tokens=12, mode="mirror", stop_at_eos=False))
    assert named.summary["mode"] == "mirror" and named.summary["mode_source"] == "named"
    assert plain.tokens == named.tokens
    beside = "+lookup" if best == "sd" and lookup_beside_chosen(tuned_on_cpu[1]) else ""   # as tune measured it
    assert EngineMethod(engine, "best").name == f"best={best}{beside}"
    elsewhere = Engine(folder, "cpu-sim").generate("def f(n):", G(max_new_tokens=4))   # tuning is for cpu only
    assert elsewhere.summary["mode"] == "mirror" and "tuned on cpu, not cpu-sim" in elsewhere.summary["mode_source"]


def test_run_stats_show_the_mode_and_why(tuned_on_cpu, tmp_path):
    folder = shutil.copytree(tuned_on_cpu[0], tmp_path / "art")
    _with_best(folder, tuned_on_cpu[1], "sd")
    run = ["run", str(folder), "--prompt", "def f(n):", "--max-new-tokens", "6", "--stats"]
    shown = " ".join(CliRunner().invoke(cli.app, run, env={"COLUMNS": "200"}).output.split())
    assert "mode chosen by" in shown and "tuned best on cpu" in shown and "│ sd │" in shown
    shown = " ".join(CliRunner().invoke(cli.app, [*run, "--mode", "ar"], env={"COLUMNS": "200"}).output.split())
    assert "named" in shown and "│ ar │" in shown


def test_tune_cli_takes_a_profile(tiny_artifacts, tmp_path):
    folder = shutil.copytree(tiny_artifacts["gpt2"], tmp_path / "art")
    result = CliRunner().invoke(cli.app, ["tune", str(folder), "--prompts", "2", "--new-tokens", "8", "--rounds",
                                          "1", "--measure-prompts", "0", "--profile", "cpu"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "now runs on profile cpu (was cpu-sim)" in " ".join(result.output.split())
    assert json.loads((folder / "tuning.json").read_text())["profile"] == "cpu"


def _bench_order(folder, tmp_path, *flags) -> list[tuple[int, str]]:
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "category": "qa", "turns": [f"say {i}"]}) + "\n"
                                 for i in range(2)))
    out = tmp_path / f"out{len(flags)}"
    result = CliRunner().invoke(cli.app, ["bench", str(folder), "--per-task", "2", "--max-new-tokens", "4", "--modes",
                                          "ar", "--peers", "hf-target", "--specbench", str(questions), "--out",
                                          str(out), *flags], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert all(r["tokens"] == records[0]["tokens"] for r in records if r["question_id"] == 0)   # same greedy text
    return [(r["question_id"], r["method"]) for r in records]


def test_bench_interleaves_peers_only_when_asked(tiny_artifacts, tmp_path):
    folder = tiny_artifacts["qwen2"]
    assert _bench_order(folder, tmp_path) == [(0, "ar"), (1, "ar"), (0, "hf-target"), (1, "hf-target")]
    assert _bench_order(folder, tmp_path, "--interleave-peers") == [(0, "ar"), (0, "hf-target"), (1, "ar"),
                                                                     (1, "hf-target")]
