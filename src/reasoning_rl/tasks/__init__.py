"""Tasks: problems in GSM8K format (question, reference solution, answer, steps), their loaders, and answer
extraction and checking."""

from reasoning_rl.tasks.answers import (
    answers_match,
    canonical_answer,
    check_annotation,
    extract_answer,
    format_number,
    intermediate_results,
    is_correct,
    operation_signature,
    parse_annotations,
    parse_number,
    split_steps,
    step_prefixes,
)
from reasoning_rl.tasks.arith import generate_arith
from reasoning_rl.tasks.calculator import CalculatorError, safe_eval
from reasoning_rl.tasks.loaders import LOADERS, load_task, subset_splits
from reasoning_rl.tasks.problem import Problem, TaskDataError, TaskSplits, problem_from_reference

__all__ = [
    "LOADERS",
    "CalculatorError",
    "Problem",
    "TaskDataError",
    "TaskSplits",
    "answers_match",
    "canonical_answer",
    "check_annotation",
    "extract_answer",
    "format_number",
    "generate_arith",
    "intermediate_results",
    "is_correct",
    "load_task",
    "operation_signature",
    "parse_annotations",
    "parse_number",
    "problem_from_reference",
    "safe_eval",
    "split_steps",
    "step_prefixes",
    "subset_splits",
]
