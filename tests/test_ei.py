"""Expert Iteration's pure pieces, with the bookkeeping worked by hand."""

from __future__ import annotations

from reasoning_rl.algos.ei import dedupe_key, merge_good_solutions, round_questions
from reasoning_rl.tasks import Problem

A1 = "2+3=<<2+3=5>>5\n5*2=<<5*2=10>>10\n#### 10"
A1_REWORDED = "First 2+3=<<2+3=5>>5 apples.\nThen 5*2=<<5*2=10>>10.\n#### 10"  # same operations, other words
A2 = "3+2=<<3+2=5>>5\n5*2=<<5*2=10>>10\n#### 10"  # operands swapped: a different operation sequence
WRONG = "2*3=<<2*3=6>>6\n#### 6"


def test_dedupe_key_follows_the_operations_not_the_wording():
    assert dedupe_key(A1) == dedupe_key(A1_REWORDED)
    assert dedupe_key(A1) != dedupe_key(A2)
    # no arithmetic at all: fall back to the text, so two different bare answers are not duplicates
    assert dedupe_key("#### 7") != dedupe_key("#### 8")
    assert dedupe_key("#### 7\n") == dedupe_key("#### 7")


def test_dedupe_key_tells_apart_a_wrong_result_and_a_wrong_final_answer():
    right = "5+3=<<5+3=8>>8\n#### 8"
    wrong_result = "5+3=<<5+3=9>>9\n#### 9"  # the operations of `right`, but it did not compute them
    wrong_answer = "5+3=<<5+3=8>>8\n#### 9"  # right operation and result, wrong final line
    assert len({dedupe_key(right), dedupe_key(wrong_result), dedupe_key(wrong_answer)}) == 3
    assert dedupe_key(right) == dedupe_key("So 5 + 3=<<5+3=8>>8 in all.\n#### 8")  # wording still does not matter


def test_a_wrong_solution_kept_by_the_orm_does_not_block_the_correct_one():
    # ORM EI: round 1 keeps a wrong solution (the ORM liked it); round 2 samples the correct one with the same
    # operations. It is new for the question, so it is added: |D_2| = 2.
    wrong, right = "5+3=<<5+3=9>>9\n#### 9", "5+3=<<5+3=8>>8\n#### 8"
    d1, _ = merge_good_solutions({}, {"q": [(wrong, True)]})
    d2, added = merge_good_solutions(d1, {"q": [(right, True)]})
    assert d2 == {"q": [wrong, right]} and added == 1


def test_merge_keeps_good_unique_solutions():
    candidates = {
        "q1": [(A1, True), (A1_REWORDED, True), (A2, True), (WRONG, False)],  # A1 and A2 kept; reworded A1 dropped
        "q2": [(WRONG, False), (WRONG, False)],  # nothing correct: q2 gets no entry
    }
    dataset, added = merge_good_solutions({}, candidates)
    assert dataset == {"q1": [A1, A2]}
    assert added == 2


def test_merge_accumulates_across_rounds_without_touching_the_old_dataset():
    d1 = {"q1": [A1]}
    # round 2: A1 again (duplicate of D_1), A2 new for q1; q3 solved for the first time
    d2, added = merge_good_solutions(d1, {"q1": [(A1_REWORDED, True), (A2, True)], "q3": [("#### 4", True)]})
    assert d2 == {"q1": [A1, A2], "q3": ["#### 4"]}  # |D_2| = 3 = |D_1| + 2
    assert added == 2
    assert d1 == {"q1": [A1]}  # D_{i-1} unchanged


def test_merge_of_an_empty_round_keeps_the_dataset():
    dataset, added = merge_good_solutions({"q1": [A1]}, {"q1": [(WRONG, False)]})
    assert dataset == {"q1": [A1]} and added == 0
    assert merge_good_solutions({}, {}) == ({}, 0)


def test_round_questions_draws_a_seeded_subset():
    train = [Problem(f"p{i}", f"q{i}", "#### 1", "1", ()) for i in range(10)]
    assert round_questions(train, None, seed=0) == train
    assert round_questions(train, 20, seed=0) == train
    draw = round_questions(train, 4, seed=3)
    assert len(draw) == 4 and len({p.id for p in draw}) == 4
    assert draw == round_questions(train, 4, seed=3)
    assert draw != round_questions(train, 4, seed=4)
