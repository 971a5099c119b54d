"""Metrics with numbers worked by hand, including the degenerate cases."""

from __future__ import annotations

import itertools
import math

import pytest

from reasoning_rl.scoring.metrics import majority_vote, pass_at_k, pass_at_k_ladder, rerank_pick, within_question_auc


def test_majority_vote_counts_and_breaks_ties_by_first_occurrence():
    assert majority_vote(["3", "4", "4", None, "3", "4"]) == "4"  # 4 appears 3 times, 3 twice
    assert majority_vote(["5", "7", "7", "5"]) == "5"  # tie 2-2: "5" came first
    assert majority_vote([None, "7"]) == "7"  # a missing answer never wins
    assert majority_vote([None, None]) is None  # no answer at all
    assert majority_vote([]) is None
    assert majority_vote(["9"]) == "9"  # one sample


def test_rerank_picks_the_highest_score():
    assert rerank_pick(["1", "2", "3"], [0.1, 0.9, 0.5]) == "2"
    assert rerank_pick(["1", "2"], [0.7, 0.7]) == "1"  # tie: earliest sample
    assert rerank_pick([None, "2"], [0.9, 0.1]) is None  # the best-scored sample has no answer: no credit
    assert rerank_pick([], []) is None
    with pytest.raises(ValueError):
        rerank_pick(["1"], [0.1, 0.2])


def test_pass_at_k_by_hand():
    # n=4, c=1, k=1: 1 - C(3,1)/C(4,1) = 1 - 3/4 = 0.25 (= c/n, as pass@1 must be)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=5, c=2, k=3: 1 - C(3,3)/C(5,3) = 1 - 1/10 = 0.9
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert pass_at_k(4, 0, 4) == 0.0  # none correct
    assert pass_at_k(4, 4, 1) == 1.0  # all correct
    assert pass_at_k(4, 2, 3) == 1.0  # n - c = 2 < k = 3: every 3-subset holds a correct sample
    assert pass_at_k(1, 1, 1) == 1.0  # one sample


def test_pass_at_k_equals_the_subset_average():
    # The estimator is the exact mean over all k-subsets of the n samples of "any correct".
    flags = [1, 0, 0, 1, 0, 0]
    for k in range(1, len(flags) + 1):
        subsets = list(itertools.combinations(flags, k))
        expected = sum(any(s) for s in subsets) / len(subsets)
        assert math.isclose(pass_at_k(len(flags), sum(flags), k), expected)


def test_pass_at_k_rejects_bad_k():
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 0)


def test_pass_at_k_ladder():
    assert pass_at_k_ladder(1) == [1]
    assert pass_at_k_ladder(4) == [1, 2, 4]
    assert pass_at_k_ladder(96) == [1, 2, 4, 8, 16, 32, 64, 96]


def test_within_question_auc_counts_pairs_of_one_question_only():
    # q1: correct 0.7 vs wrong 0.9 and 0.5 -> beats 0.5 only: 1 of 2; q2: correct 0.3 vs wrong 0.3 -> a tie, 1/2.
    # q3 is all correct: no pair. (1 + 0.5) / 3 pairs = 0.5.
    groups = [([0.7, 0.9, 0.5], [True, False, False]), ([0.3, 0.3], [True, False]), ([0.1, 0.2], [True, True])]
    assert within_question_auc(groups) == (0.5, 3)
    assert within_question_auc([([0.9, 0.1], [True, False])]) == (1.0, 1)
    assert within_question_auc([([0.9, 0.1], [False, True])]) == (0.0, 1)  # inverted ranking
    auc, pairs = within_question_auc([([0.4], [True]), ([0.2, 0.3], [False, False])])  # no question has both
    assert math.isnan(auc) and pairs == 0
    with pytest.raises(ValueError):
        within_question_auc([([0.1], [True, False])])
