"""`python -m mirror_deploy.tuning.coverage`: branch coverage past the artifact's budget, and the exit as a
verdict predictor, on the tiny artifact's calibration replays."""
from __future__ import annotations

import json

from mirror_deploy.tuning import coverage


def test_coverage_reports_every_budget_and_grows_with_it(tiny_artifacts, tmp_path, capsys):
    out = tmp_path / "coverage.json"
    assert coverage.main([str(tiny_artifacts["llama"]), "--gammas", "1,2", "--budgets", "1,4,8",
                          "--prompts", "3", "--new-tokens", "8", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    rows = figures["coverage"]
    assert {r["gamma"] for r in rows} == {1, 2} and all(r["steps"] > 0 for r in rows)
    for r in rows:
        c = [r["coverage"][b] for b in ("1", "4", "8")]
        assert c == sorted(c) and 0.0 <= c[0] and c[-1] <= 1.0, r
    for r in figures["exit_agreement"]:
        assert 0.0 <= r["exit_top1_is_draft"] <= 1.0 and r["positions"] > 0
    printed = capsys.readouterr().out
    assert "b=8" in printed and "verdict predictor" in printed


def test_coverage_refuses_a_window_longer_than_the_artifacts(tiny_artifacts, capsys):
    assert coverage.main([str(tiny_artifacts["llama"]), "--gammas", "99"]) == 2
    assert "at most γ=4" in capsys.readouterr().err
    assert coverage.main([str(tiny_artifacts["llama"]), "--budgets", "four"]) == 2
    assert "--budgets" in capsys.readouterr().err
