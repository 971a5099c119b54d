"""Prompt format shared by every init, algorithm and evaluation.

A problem is shown as ``Question: <q>\\nAnswer:\\n`` and the model writes the GSM8K-format solution (steps with
calculator annotations, then ``#### <answer>``). ``init=pretrained`` prepends ``n_shots`` worked train exemplars
separated by blank lines (the paper's few-shot prompting, section 3); a solution never contains a blank line, so
``"\\n\\n"`` marks the end of an answer for a model that was only prompted. ``init=sft`` trains the model to end
its solution with EOS.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from reasoning_rl.config import ConfigError
from reasoning_rl.tasks import Problem

STOP_STRINGS: tuple[str, ...] = ("\n\n", "Question:")  # end of a few-shot answer; EOS ends an SFT answer


def format_question(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:\n"


def format_exemplar(problem: Problem) -> str:
    return format_question(problem.question) + problem.reference.strip()


def pick_exemplars(train: Sequence[Problem], n_shots: int, seed: int) -> list[Problem]:
    """The few-shot exemplars: ``n_shots`` train problems drawn with ``seed`` (never test problems)."""
    if n_shots > len(train):
        raise ConfigError(
            f"init.n_shots={n_shots} exemplars are drawn from the training split, which has only {len(train)} "
            "problems: lower init.n_shots or raise task.n_train."
        )
    return random.Random(seed).sample(list(train), n_shots)


def build_prompt(question: str, exemplars: Sequence[Problem] = ()) -> str:
    """Few-shot prefix (possibly empty) followed by the question."""
    shots = "".join(format_exemplar(p) + "\n\n" for p in exemplars)
    return shots + format_question(question)
