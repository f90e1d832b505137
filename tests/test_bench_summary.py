"""`bench`'s summary: speedups are ratios of mean tok/s over prompts (medians over repeats), and the
per-repeat range shows how far one repeat's ratio lands from another's."""
import pytest

from mirror_deploy.bench import runner


def _record(method, question, repeat, tok_s, tokens=(1, 2, 3)):
    return {"task": "qa", "question_id": question, "repeat": repeat, "method": method, "tokens": list(tokens),
            "tokens_per_s": tok_s, "figures": {}}


def test_speedup_and_its_range_over_repeats():
    records = [_record("ar", 1, 0, 10.0), _record("ar", 2, 0, 20.0), _record("ar", 1, 1, 10.0),
               _record("ar", 2, 1, 10.0),
               _record("sd", 1, 0, 15.0), _record("sd", 2, 0, 30.0), _record("sd", 1, 1, 20.0),
               _record("sd", 2, 1, 20.0, tokens=(1, 2, 4))]
    row = runner.summarise(records)["overall"]["sd"]
    # medians over repeats: ar 10, 15 (mean 12.5); sd 17.5, 25 (mean 21.25)
    assert row["speedup_vs_ar"] == pytest.approx(21.25 / 12.5)
    # repeat 0: 22.5 / 15 = 1.5; repeat 1: 20 / 10 = 2.0
    assert row["speedup_range"] == pytest.approx([1.5, 2.0])
    assert row["equal_to_ar"] == "1/2"
    assert "| sd | 21.25 | 1.70 | 1.50–2.00 |" in runner.markdown(runner.summarise(records))


def test_one_repeat_has_no_range():
    records = [_record("ar", 1, 0, 10.0), _record("sd", 1, 0, 12.0)]
    assert runner.summarise(records)["overall"]["sd"]["speedup_range"] is None
    assert "| sd | 12.00 | 1.20 | – |" in runner.markdown(runner.summarise(records))
