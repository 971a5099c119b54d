"""scoring/orm_diagnosis.py on hand-made evaluation records, the arithmetic worked in the comments."""

from __future__ import annotations

import json

import pytest

from reasoning_rl.scoring.orm_diagnosis import arithmetic_is_consistent, checked_vote, diagnose, main


def sample(text: str, answer: str, correct: bool, score: float) -> dict:
    return {"text": text, "answer": answer, "correct": correct, "score": score}


RIGHT_8 = sample("5+3=<<5+3=8>>8\n#### 8", "8", True, 0.4)
SLIP_9 = sample("5+3=<<5+3=9>>9\n#### 9", "9", False, 0.6)
RIGHT_2 = sample("4-2=<<4-2=2>>2\n#### 2", "2", True, 0.1)
BARE_3 = sample("#### 3", "3", False, 0.1)  # wrong without a slip: no annotation at all
RECORDS = [
    {"answer": "8", "majority_answer": "9", "rerank_answer": "9", "samples": [RIGHT_8, SLIP_9, SLIP_9]},
    {"answer": "2", "majority_answer": "2", "rerank_answer": "2", "samples": [RIGHT_2, BARE_3]},
]


def test_arithmetic_is_consistent_checks_every_annotation():
    assert arithmetic_is_consistent("5+3=<<5+3=8>>8\n8*2=<<8*2=16>>16\n#### 16")
    assert not arithmetic_is_consistent("5+3=<<5+3=8>>8\n8*2=<<8*2=61>>61\n#### 61")  # the second one slips
    assert arithmetic_is_consistent("#### 3")  # nothing to check


def test_checked_vote_votes_among_consistent_samples_else_among_all():
    assert checked_vote([SLIP_9, RIGHT_8, SLIP_9]) == "8"  # the two 9s slip: only the 8 is left
    assert checked_vote([SLIP_9, SLIP_9, sample("5+3=<<5+3=7>>7", "7", False, 0.0)]) == "9"  # all slip: plain vote


def test_diagnose_on_hand_worked_records():
    d = diagnose(RECORDS)
    assert (d["problems"], d["samples"], d["pairs"]) == (2, 5, 3)  # pairs: 1 x 2 in question 1, 1 x 1 in question 2
    assert d["slip_rate_wrong"] == pytest.approx(2 / 3)  # the two 9s slip, the bare 3 does not
    assert d["slip_rate_correct"] == 0
    # ORM: 0.4 < 0.6 twice (0 + 0), then 0.1 = 0.1 (1/2): 0.5 / 3
    assert d["orm_within_auc"] == pytest.approx(1 / 6)
    # check: 1 > 0 twice (1 + 1), then 1 = 1 (1/2): 2.5 / 3
    assert d["check_within_auc"] == pytest.approx(5 / 6)
    # question 1's scores 0.4, 0.6, 0.6: mean 0.5333, variance (0.1333^2 + 2 * 0.0667^2) / 3 = 0.008889, SD 0.09428;
    # question 2's: SD 0. Their mean: 0.04714. The question means 0.5333 and 0.1: SD = half their gap, 0.21667
    assert d["orm_within_sd"] == pytest.approx(0.09428 / 2, abs=1e-5)
    assert d["orm_between_sd"] == pytest.approx((0.5333333 - 0.1) / 2)
    # picks: majority 9 (wrong), 2 (right); ORM 9, 2; checked vote 8 (only consistent one), 2 (tie of 2 and 3: first)
    assert (d["maj_at_k"], d["orm_rerank_at_k"], d["checked_vote_at_k"], d["pass_at_k"]) == (0.5, 0.5, 1.0, 1.0)


def test_the_command_prints_one_column_per_file_and_refuses_records_without_scores(tmp_path, capsys):
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert main([str(scored)]) == 0
    assert "| check_within_auc | 0.833 |" in capsys.readouterr().out
    unscored = tmp_path / "unscored.jsonl"
    unscored.write_text(json.dumps({**RECORDS[1], "samples": [{"text": "#### 2", "answer": "2", "correct": True}]}))
    assert main([str(unscored)]) == 2
    assert "no ORM score on every sample" in capsys.readouterr().err
