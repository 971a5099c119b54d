"""Evaluation metrics (paper section 3): maj@1, maj@K, rerank@K, pass@K, the unbiased pass@k estimator, and the
ORM's held-out ROC AUC, pooled and within questions.

Pure functions of extracted answers and correctness flags, so they are tested with numbers worked by hand.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from math import comb


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent non-empty answer; ties go to the answer that appeared first. None when there is none."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def rerank_index(scores: Sequence[float]) -> int:
    """The sample rerank@K picks: the highest-scoring one; ties go to the earliest."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def rerank_pick(answers: Sequence[str | None], scores: Sequence[float]) -> str | None:
    """The answer of the sample :func:`rerank_index` picks (rerank@K)."""
    if len(answers) != len(scores):
        raise ValueError(f"{len(answers)} answers but {len(scores)} scores")
    if not answers:
        return None
    return answers[rerank_index(scores)]


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased estimator of pass@k from n samples with c correct (Chen et al. 2021, eq. 1): 1 - C(n-c, k) / C(n, k)."""
    if not 0 < k <= num_samples:
        raise ValueError(f"need 0 < k <= n, got k={k}, n={num_samples}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def pass_at_k_ladder(k_max: int) -> list[int]:
    """The k values reported for the unbiased estimator: 1, 2, 4, ... up to and including k_max."""
    ks = [1]
    while ks[-1] * 2 < k_max:
        ks.append(ks[-1] * 2)
    if ks[-1] != k_max:
        ks.append(k_max)
    return ks


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative (ties 1/2).

    The Mann-Whitney form, exact, O(n log n) via average ranks. NaN when one class is absent.
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    num_pos = sum(labels)
    num_neg = len(labels) - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):  # tied scores share the average of their 1-based ranks
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    pos_rank_sum = sum(r for r, positive in zip(ranks, labels, strict=True) if positive)
    return (pos_rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def within_question_auc(groups: Sequence[tuple[Sequence[float], Sequence[bool]]]) -> tuple[float, int]:
    """How often the ORM ranks a correct sample above a wrong sample *of the same question* (ties count 1/2), over
    every such pair of every question; and the number of pairs. NaN when no question has both kinds.

    Reranking picks among one question's samples, so this, not the pooled :func:`roc_auc`, is the ranking it
    needs: a pooled AUC also rewards knowing which questions are hard (all their samples low), which never changes
    a pick. ``groups``: per question, its samples' scores and correctness.
    """
    wins, pairs = 0.0, 0
    for scores, labels in groups:
        if len(scores) != len(labels):
            raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
        right = [s for s, ok in zip(scores, labels, strict=True) if ok]
        wrong = [s for s, ok in zip(scores, labels, strict=True) if not ok]
        wins += sum(1.0 if r > w else 0.5 if r == w else 0.0 for r in right for w in wrong)
        pairs += len(right) * len(wrong)
    return (wins / pairs if pairs else float("nan")), pairs
