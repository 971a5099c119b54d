"""scoring/paired.py on hand-made evaluation records, the arithmetic worked in the comments."""

from __future__ import annotations

import json
import math

import pytest

from reasoning_rl.scoring.paired import compare, main, paired_difference, problem_values, read_problems


def record(problem_id: str, greedy_correct: bool, answers: list[str | None], answer: str = "8", **extra) -> dict:
    samples = [{"text": f"#### {a}", "answer": a, "correct": a == answer} for a in answers]
    majority = max((a for a in answers if a is not None), key=answers.count, default=None)
    return {"id": problem_id, "answer": answer, "greedy": {"correct": greedy_correct}, "samples": samples,
            "majority_answer": majority, **extra}  # fmt: skip


def test_paired_difference_by_hand():
    # differences 1, 0, 1, 0: mean 0.5; sample variance (4 x 0.25) / 3 = 1/3; SE sqrt(1/3 / 4) = 0.288675
    diff, se = paired_difference([1, 1, 1, 0], [0, 1, 0, 0])
    assert diff == 0.5
    assert se == pytest.approx(math.sqrt(1 / 12))
    # the same difference on every problem: no spread, SE 0 (an unpaired SE would not be 0)
    assert paired_difference([1, 0.5], [0.5, 0]) == (0.5, 0.0)
    assert math.isnan(paired_difference([1], [0])[1])  # one pair: no SD
    with pytest.raises(ValueError):
        paired_difference([1, 0], [1])


def test_problem_values_by_hand():
    # samples 8, 9, 9, None: majority 9 (wrong), one correct of four, two distinct answers (None is not one)
    values = problem_values(record("q1", True, ["8", "9", "9", None], rerank_answer="8"))
    assert values == {"maj_at_1": 1.0, "maj_at_k": 0.0, "rerank_at_k": 1.0, "pass_at_k": 1.0,
                      "sample_accuracy": 0.25, "distinct_answers": 2.0}  # fmt: skip
    assert math.isnan(problem_values(record("q1", True, ["8"]))["rerank_at_k"])  # the run did not rerank


def test_compare_pairs_problems_by_id_and_refuses_different_test_sets():
    a = {"q1": problem_values(record("q1", True, ["8", "8"])), "q2": problem_values(record("q2", True, ["8", "1"]))}
    b = {"q2": problem_values(record("q2", False, ["1", "1"])), "q1": problem_values(record("q1", True, ["8", "3"]))}
    table = compare(a, b)
    # maj@1: a 1, 1; b 1 (q1), 0 (q2): differences 0, 1 -> mean 0.5, SE sqrt(0.5 / 2) = 0.5
    assert table["maj_at_1"] == {"a": 1.0, "b": 0.5, "diff": 0.5, "se": 0.5}
    # sample accuracy: a 1, 0.5; b 0.5, 0: differences 0.5, 0.5 -> SE 0
    assert table["sample_accuracy"] == {"a": 0.75, "b": 0.25, "diff": 0.5, "se": 0.0}
    assert "rerank_at_k" not in table  # neither reranked
    with pytest.raises(ValueError, match="different problems"):
        compare(a, {"q1": b["q1"]})


def test_the_per_problem_table_reads_back_as_the_records_it_came_from(tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        "".join(json.dumps(record(f"q{i}", i % 2 == 0, ["8", "9"], rerank_answer="9")) + "\n" for i in range(4))
    )
    table = tmp_path / "kept" / "problems.csv"
    assert main([str(samples), "--write-problems", str(table)]) == 0
    assert read_problems(table) == read_problems(samples)
    assert main([str(samples), str(table)]) == 0
    assert "| maj_at_1 | 0.500 | 0.500 | +0.000 | 0.000 | +nan |" in capsys.readouterr().out
    (tmp_path / "other.csv").write_text("id,maj_at_1\nq0,1\n")
    assert main([str(samples), str(tmp_path / "other.csv")]) == 2
    assert "not a per-problem table" in capsys.readouterr().err
