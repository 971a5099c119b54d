"""GSM-Symbolic (Mirzadeh et al. 2024) through reasoning-gym: GSM8K templates with fresh names and numbers.

``reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=s)`` yields entries ``{"question", "answer",
"metadata"}``; ``metadata["answer_cot"]`` is a worked solution ending in ``#### <answer>`` (plain text,
no calculator annotations). We keep its non-empty lines as the steps and rewrite the answer line in canonical
form; if an entry had no worked solution, or one whose answer disagrees with ``answer``, the reference is
just ``#### <answer>``. The instruction reasoning-gym appends to every question ("Give the result as your
final answer. Do not include units.") is removed: prompts are formatted by the prompt code, as for GSM8K.

Train and test come from different seeds; a train problem whose question also appears in the test split is
dropped, so the train split can be a few problems short of ``size_train``. Generation is fast (~0.1 s for
2,000 problems) but ``import reasoning_gym`` takes a few seconds, so it is imported only when needed.
"""

from __future__ import annotations

from typing import Any

from reasoning_rl.config import GSMSymbolicTaskConfig
from reasoning_rl.tasks.answers import answers_match, canonical_answer, extract_answer, split_steps
from reasoning_rl.tasks.problem import Problem, TaskDataError, TaskSplits, problem_from_reference

DATASET = "gsm_symbolic"
INSTRUCTION = "Give the result as your final answer. Do not include units."


def symbolic_problem(entry: dict[str, Any], id: str) -> Problem:
    """One reasoning-gym gsm_symbolic entry as a Problem (see the module docstring for the reference)."""
    question = str(entry["question"]).strip().removesuffix(INSTRUCTION).strip()
    answer = canonical_answer(str(entry["answer"]))
    if not answer:
        raise TaskDataError(f"reasoning-gym {DATASET} {id}: empty answer")
    cot = entry.get("metadata", {}).get("answer_cot") or ""
    steps = split_steps(cot) if answers_match(extract_answer(cot, fallback=False), answer) else []
    reference = "\n".join([*steps, f"#### {answer}"])
    return problem_from_reference(id, question, reference, f"reasoning-gym {DATASET} {id}")


def generate_symbolic(split: str, size: int, seed: int) -> list[Problem]:
    """``size`` gsm_symbolic problems from reasoning-gym's generator seeded with ``seed``."""
    import reasoning_gym  # slow to import (seconds); only this task needs it

    dataset = reasoning_gym.create_dataset(DATASET, size=size, seed=seed)
    return [symbolic_problem(entry, f"{DATASET}/{split}/{i}") for i, entry in enumerate(dataset)]


def load_gsm_symbolic(cfg: GSMSymbolicTaskConfig) -> TaskSplits:
    """Generated train and test splits, the train split stripped of questions that are in the test split."""
    test = generate_symbolic("test", cfg.size_test, cfg.test_seed)
    test_questions = {p.question for p in test}
    train = [p for p in generate_symbolic("train", cfg.size_train, cfg.train_seed) if p.question not in test_questions]
    return TaskSplits(train=train, test=test)
