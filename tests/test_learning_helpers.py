"""The statistics the learning tests judge gains with, worked by hand."""

from __future__ import annotations

import math

import pytest
from learning import assert_gain, assert_in_band, auc_standard_error, binomial_gain, paired_gain, per_problem


def test_paired_gain_by_hand():
    # d = after - before = 1, 1, 0, 0 -> mean 0.5; deviations +-0.5, squares sum 1, sample variance 1/3,
    # SE = sqrt(1/3 / 4) = 0.2887
    before = {"a": 0.0, "b": 0.0, "c": 1.0, "d": 1.0}
    after = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}
    gain, se = paired_gain(before, after)
    assert gain == 0.5 and se == pytest.approx(math.sqrt(1 / 12))
    assert paired_gain(before, before) == (0.0, 0.0)  # no change: no gain, no error
    with pytest.raises(ValueError, match="same problems"):
        paired_gain(before, {"a": 1.0})


def test_binomial_gain_by_hand():
    # 0.25 of 4 -> 0.75 of 4: gain 0.5; SE = sqrt(0.25 * 0.75 / 4 * 2) = sqrt(0.09375) = 0.3062
    gain, se = binomial_gain(0.25, 4, 0.75, 4)
    assert gain == 0.5 and se == pytest.approx(math.sqrt(0.09375))


def test_auc_standard_error_by_hand():
    # AUC 0.5, 10 positives, 10 negatives: Q1 = 0.5 / 1.5 = 1/3, Q2 = 2 * 0.25 / 1.5 = 1/3;
    # var = (0.25 + 9 (1/3 - 1/4) + 9 (1/3 - 1/4)) / 100 = (0.25 + 1.5) / 100 = 0.0175; SE = 0.1323
    assert auc_standard_error(0.5, 10, 10) == pytest.approx(math.sqrt(0.0175))
    assert auc_standard_error(0.5, 1000, 1000) < auc_standard_error(0.5, 10, 10)  # more samples, less error


def test_assert_gain_needs_three_standard_errors():
    assert_gain(0.31, 0.1, "x")  # z = 3.1
    with pytest.raises(AssertionError, match="z = 2.90"):
        assert_gain(0.29, 0.1, "x")
    with pytest.raises(AssertionError):
        assert_gain(0.0, 0.0, "x")  # nothing moved
    with pytest.raises(AssertionError):
        assert_gain(-0.5, 0.01, "x")  # a clear loss is not a gain


def test_band_and_per_problem_metrics():
    assert_in_band(0.5, 0.4, 0.6, "x")
    with pytest.raises(AssertionError, match="outside"):
        assert_in_band(0.7, 0.4, 0.6, "x")
    records = {"p": {"greedy": {"correct": True}, "samples": [{"correct": True}, {"correct": False}]}}
    assert per_problem(records, "maj_at_1") == {"p": 1.0} and per_problem(records, "sample_accuracy") == {"p": 0.5}
