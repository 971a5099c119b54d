"""What the learning tests share: a pinned thread count, a stated band for their starting checkpoint, and gains
judged against their own standard errors.

Why: a tiny model's training is chaotic. The same 300 SFT steps gave maj@1 0.64 at one thread and 0.365 at two on an
Intel Xeon, and 0.785 at one thread on an AMD EPYC: the order of a float reduction differs between thread counts and
between CPUs' kernels, and a few hundred steps amplify it. So a learning test
  - runs its processes with ``REASONING_RL_THREADS=1`` (the same numbers on one machine, whatever the machine's
    core count or the suite's own setting),
  - checks its starting checkpoint lies in the band its margins were calibrated for (``assert_in_band``), so a
    different start fails with a message that says so, not as a mysterious missing gain,
  - and asserts a gain only when it is at least ``MIN_Z`` standard errors of itself (``assert_gain``): the paired
    per-problem difference on the same test problems, or the difference of two independent binomial fractions.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

THREADS = "1"
MIN_Z = 3.0  # a gain must be at least this many standard errors of itself


def pinned_env(**extra: str) -> dict[str, str]:
    """The environment of a learning test's ``main.py``: one torch thread, no hub."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "REASONING_RL_THREADS": THREADS, **extra}


def read_records(path: Path) -> dict[str, dict]:
    """An evaluation's samples file (``eval/samples*.jsonl``) keyed by problem id."""
    return {r["id"]: r for r in map(json.loads, Path(path).read_text().splitlines())}


def per_problem(records: Mapping[str, dict], metric: str) -> dict[str, float]:
    """Per problem: ``maj_at_1`` (the greedy sample correct) or ``sample_accuracy`` (fraction of the K correct)."""
    if metric == "maj_at_1":
        return {pid: float(r["greedy"]["correct"]) for pid, r in records.items()}
    if metric == "sample_accuracy":
        return {pid: sum(s["correct"] for s in r["samples"]) / len(r["samples"]) for pid, r in records.items()}
    raise ValueError(f"unknown per-problem metric {metric!r}")


def paired_gain(before: Mapping[str, float], after: Mapping[str, float]) -> tuple[float, float]:
    """Mean of after - before over the same problems, and its standard error sd(d) / sqrt(n) (sd with n - 1)."""
    if set(before) != set(after) or len(before) < 2:
        raise ValueError("a paired comparison needs the same problems (at least 2) on both sides")
    diffs = [after[pid] - before[pid] for pid in before]
    gain = sum(diffs) / len(diffs)
    var = sum((d - gain) ** 2 for d in diffs) / (len(diffs) - 1)
    return gain, math.sqrt(var / len(diffs))


def binomial_gain(p1: float, n1: int, p2: float, n2: int) -> tuple[float, float]:
    """Difference p2 - p1 of two fractions of independent 0/1 outcomes (e.g. training samples early and late, n1
    and n2 of them), and its standard error sqrt(p1 (1 - p1) / n1 + p2 (1 - p2) / n2)."""
    return p2 - p1, math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)


def auc_standard_error(auc: float, num_pos: int, num_neg: int) -> float:
    """Hanley and McNeil's (1982) standard error of a ROC AUC from num_pos positives and num_neg negatives."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (num_pos - 1) * (q1 - auc**2) + (num_neg - 1) * (q2 - auc**2)) / (num_pos * num_neg)
    return math.sqrt(var)


def assert_gain(gain: float, se: float, what: str, min_z: float = MIN_Z) -> None:
    assert gain > 0 and gain >= min_z * se, (
        f"{what}: gain {gain:+.4f} is not {min_z} standard errors ({se:.4f}) above zero (z = "
        f"{gain / se if se else float('inf'):.2f})"
    )


def assert_in_band(value: float, low: float, high: float, what: str) -> None:
    assert low <= value <= high, (
        f"{what} = {value:.3f} lies outside [{low}, {high}], the band this test's margins were calibrated for: "
        "the starting checkpoint itself changed (a training or data change, or a machine whose numbers differ)"
    )
