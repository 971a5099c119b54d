"""The problem record every task produces, and the error raised for bad task data."""

from __future__ import annotations

from dataclasses import dataclass

from reasoning_rl.tasks.answers import ANSWER_MARKER, canonical_answer, extract_answer, split_steps


class TaskDataError(ValueError):
    """Task data that is missing or malformed; the message names the file (and line) and how to fix it."""


@dataclass(frozen=True)
class Problem:
    id: str  # stable id, "<task>/<split>/<index or source id>", e.g. "gsm8k/test/17"
    question: str  # the problem text, without any prompt formatting
    reference: str  # reference solution in GSM8K format: steps, optional <<a*b=c>> annotations, "#### <answer>"
    answer: str  # canonical final answer (see answers.canonical_answer), e.g. "72", "-3", "2.5"
    steps: tuple[str, ...]  # the reference's step lines, without the "####" line


@dataclass(frozen=True)
class TaskSplits:
    train: list[Problem]
    test: list[Problem]


def problem_from_reference(id: str, question: str, reference: str, where: str) -> Problem:
    """Build a Problem from a GSM8K-format reference, taking the answer from its "####" line.

    ``where`` (e.g. "train.jsonl line 17") prefixes the TaskDataError raised when the reference has no
    "####" line or an empty one.
    """
    if ANSWER_MARKER not in reference:
        raise TaskDataError(f"{where}: the reference solution has no '{ANSWER_MARKER} <answer>' line")
    answer = canonical_answer(extract_answer(reference, fallback=False))
    if not answer:
        raise TaskDataError(f"{where}: the reference solution's '{ANSWER_MARKER}' line is empty")
    if not question.strip():
        raise TaskDataError(f"{where}: the question is empty")
    return Problem(
        id=id,
        question=question.strip(),
        reference=reference.strip(),
        answer=answer,
        steps=tuple(split_steps(reference)),
    )
