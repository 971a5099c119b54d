"""``arith``: synthetic multi-step word problems in GSM8K format, small enough for a character-level model.

A problem starts from an amount and applies ``min_steps..max_steps`` operations drawn from ``operations``
with operands in ``1..max_number``; the solution has one line per operation with a calculator annotation::

    Tom has 5 apples. He gets 3 more. He gives away 2. How many apples does Tom have?

    5+3=<<5+3=8>>8
    8-2=<<8-2=6>>6
    #### 6

Results stay non-negative (a subtraction never takes more than there is). Text is plain ASCII and short: a
two-step problem and its solution fit in about 140 characters. Train and test come from two random streams
derived from ``seed``; a train problem whose question is also a test question is redrawn, so the splits are
disjoint (questions may repeat within a split when the space of problems is small).
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass

from reasoning_rl.config import ArithTaskConfig
from reasoning_rl.tasks.problem import Problem, TaskDataError, TaskSplits, problem_from_reference

NAMES = (
    ("Tom", "He"),
    ("Ann", "She"),
    ("Bob", "He"),
    ("Eva", "She"),
    ("Sam", "He"),
    ("Mia", "She"),
    ("Max", "He"),
    ("Zoe", "She"),
)
ITEMS = ("apples", "pens", "cards", "eggs", "books", "coins", "cups", "shells")
TEMPLATES = {
    "+": ("{p} gets {n} more.", "{p} finds {n} more.", "{p} buys {n} more."),
    "-": ("{p} gives away {n}.", "{p} loses {n}.", "{p} sells {n}."),
    "*": ("{p} then has {n} times as many.",),
}
MAX_ATTEMPTS = 1000  # redraws of one problem before concluding the settings allow none


@dataclass(frozen=True)
class Story:
    """One drawn problem before it is written out: who, what, the starting amount and each operation."""

    name: str
    pronoun: str
    items: str
    start: int
    steps: tuple[tuple[str, str, int, int], ...]  # (sentence, operation, operand, result after it)

    def question(self) -> str:
        sentences = [f"{self.name} has {self.start} {self.items}.", *(s[0] for s in self.steps)]
        return " ".join([*sentences, f"How many {self.items} does {self.name} have?"])

    def reference(self) -> str:
        lines, value = [], self.start
        for _, op, n, result in self.steps:
            lines.append(f"{value}{op}{n}=<<{value}{op}{n}={result}>>{result}")
            value = result
        return "\n".join([*lines, f"#### {value}"])

    def prose(self) -> str:
        """The story told with its arithmetic inline, the way text outside the task states it: no question, no
        calculator annotations, no ``####`` (the pretraining corpus)."""
        sentences, value = [f"{self.name} has {self.start} {self.items}."], self.start
        for sentence, op, n, result in self.steps:
            sentences.append(f"{sentence[:-1]}, so {self.pronoun.lower()} has {value}{op}{n}={result}.")
            value = result
        return " ".join([*sentences, f"In the end {self.name} has {value} {self.items}."])


def draw_story(rng: random.Random, min_steps: int, max_steps: int, max_number: int, operations: str) -> Story:
    """One story drawn from ``rng``; raises TaskDataError if the settings admit none (only subtraction, with more
    steps than ``max_number`` allows)."""
    for _ in range(MAX_ATTEMPTS):
        name, pronoun = rng.choice(NAMES)
        items = rng.choice(ITEMS)
        value = start = rng.randint(1, max_number)
        steps = []
        for _ in range(rng.randint(min_steps, max_steps)):
            feasible = [op for op in operations if op != "-" or value >= 1]
            if not feasible:
                break  # only "-" is allowed and nothing is left: redraw the problem
            op = rng.choice(feasible)
            n = rng.randint(1, min(value, max_number) if op == "-" else max_number)
            value = value + n if op == "+" else value - n if op == "-" else value * n
            steps.append((rng.choice(TEMPLATES[op]).format(p=pronoun, n=n), op, n, value))
        else:
            return Story(name, pronoun, items, start, tuple(steps))
    raise TaskDataError(
        f"no arith problem with {min_steps}..{max_steps} steps of {operations!r} and operands "
        f"up to {max_number}: raise task.max_number or allow '+'"
    )


def generate_arith_problem(
    rng: random.Random, min_steps: int, max_steps: int, max_number: int, operations: str
) -> tuple[str, str]:
    """One (question, reference) pair drawn from ``rng`` (see :func:`draw_story`)."""
    story = draw_story(rng, min_steps, max_steps, max_number, operations)
    return story.question(), story.reference()


def generate_arith(
    size_train: int, size_test: int, min_steps: int, max_steps: int, max_number: int, operations: str, seed: int
) -> TaskSplits:
    """Disjoint train and test splits of arith problems, a pure function of the arguments."""
    # String seeds are hashed with SHA-512 by `random`, so the streams are stable across processes and distinct.
    test_rng, train_rng = random.Random(f"arith/{seed}/test"), random.Random(f"arith/{seed}/train")
    test = [generate_arith_problem(test_rng, min_steps, max_steps, max_number, operations) for _ in range(size_test)]
    test_questions = {q for q, _ in test}
    train: list[tuple[str, str]] = []
    for _ in range(50 * size_train + MAX_ATTEMPTS):  # generous: a collision with the test split is rare
        if len(train) == size_train:
            break
        question, reference = generate_arith_problem(train_rng, min_steps, max_steps, max_number, operations)
        if question not in test_questions:
            train.append((question, reference))
    if len(train) < size_train:
        raise TaskDataError(
            f"only {len(train)} of {size_train} arith train problems avoid the test questions: "
            "raise task.max_number or lower task.size_test"
        )

    def problems(split: str, pairs: list[tuple[str, str]]) -> list[Problem]:
        return [
            problem_from_reference(f"arith/{split}/{i}", q, r, f"arith {split} problem {i}")
            for i, (q, r) in enumerate(pairs)
        ]

    return TaskSplits(train=problems("train", train), test=problems("test", test))


def load_arith(cfg: ArithTaskConfig) -> TaskSplits:
    """Generated arith splits for ``cfg`` (see :func:`generate_arith`)."""
    return generate_arith(
        cfg.size_train, cfg.size_test, cfg.min_steps, cfg.max_steps, cfg.max_number, cfg.operations, cfg.seed
    )


def generate_arith_corpus(
    n_documents: int, max_chars: int, seed: int, avoid: Collection[str] = (), max_steps: int = 3, max_number: int = 20
) -> list[str]:
    """``n_documents`` pretraining documents for the tiny model: arith stories told as prose with their arithmetic
    inline (:meth:`Story.prose`), one per line, as many as fit in ``max_chars`` characters.

    This is the tiny scale's stand-in for a language model's pretraining text: it carries the stories' words and
    the sums, never the task's format (``Question:``, calculator annotations, ``####``), which few-shot prompting
    then has to convey. Stories whose question is in ``avoid`` (pass the test questions) are redrawn, so the test
    answers are not in the corpus. A pure function of the arguments.
    """
    rng = random.Random(f"arith-corpus/{seed}")
    avoid = set(avoid)
    documents: list[str] = []
    while len(documents) < n_documents:
        lines: list[str] = []
        while True:
            story = draw_story(rng, 1, max_steps, max_number, "+-")
            if story.question() in avoid:
                continue
            if lines and len("\n".join([*lines, story.prose()])) > max_chars:
                break  # the document is full; the story that did not fit is dropped
            lines.append(story.prose())
        documents.append("\n".join(lines))
    return documents
