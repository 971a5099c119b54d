"""GSM8K (Cobbe et al. 2021): 7,473 train / 1,319 test grade-school maths problems, the paper's main task.

Read from a local directory holding the original ``train.jsonl`` and ``test.jsonl`` (one JSON object per line,
``{"question": ..., "answer": "<steps>\\n#### 72"}``) or, when ``data_dir`` is None, from the hub
(``openai/gsm8k``, config ``main``), which holds the same rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reasoning_rl.config import GSM8KTaskConfig
from reasoning_rl.tasks.problem import Problem, TaskDataError, TaskSplits, problem_from_reference

SPLITS = ("train", "test")


def gsm8k_problem(row: Any, id: str, where: str) -> Problem:
    """One GSM8K row ``{"question": str, "answer": str}`` as a Problem; ``where`` prefixes errors."""
    if not isinstance(row, dict):
        raise TaskDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("question", "answer"):
        if not isinstance(row.get(key), str):
            raise TaskDataError(f"{where}: missing or non-string key {key!r} (a GSM8K row has 'question' and 'answer')")
    return problem_from_reference(id, row["question"], row["answer"], where)


def read_gsm8k_jsonl(path: Path, split: str) -> list[Problem]:
    """Every problem of one GSM8K jsonl file, in file order, with ids "gsm8k/<split>/<index>"."""
    if not path.is_file():
        raise TaskDataError(
            f"GSM8K file {path.resolve()} does not exist. Put the original {path.name} there (from "
            "openai/grade-school-math), set task.data_dir to a directory that has it, or set task.data_dir=null "
            "to load openai/gsm8k from the hub."
        )
    problems: list[Problem] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # a trailing blank line is not an error
            where = f"{path} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            problems.append(gsm8k_problem(row, f"gsm8k/{split}/{len(problems)}", where))
    return problems


def _load_from_hub(hub_id: str) -> TaskSplits:
    import datasets  # imported here: it is slow to import and only this path needs it

    ds = datasets.load_dataset(hub_id, "main")
    splits = {
        split: [
            gsm8k_problem(row, f"gsm8k/{split}/{i}", f"{hub_id} {split} row {i}") for i, row in enumerate(ds[split])
        ]
        for split in SPLITS
    }
    return TaskSplits(train=splits["train"], test=splits["test"])


def load_gsm8k(cfg: GSM8KTaskConfig) -> TaskSplits:
    """GSM8K's full train and test splits in file order (``load_task`` applies n_train / n_test)."""
    if cfg.data_dir is None:
        return _load_from_hub(cfg.hub_id)
    data_dir = Path(cfg.data_dir)  # a relative path is relative to the working directory
    if not data_dir.is_dir():
        raise TaskDataError(
            f"GSM8K data directory {data_dir.resolve()} does not exist. Set task.data_dir to a directory with "
            f"train.jsonl and test.jsonl, or task.data_dir=null to load {cfg.hub_id} from the hub."
        )
    return TaskSplits(
        train=read_gsm8k_jsonl(data_dir / "train.jsonl", "train"),
        test=read_gsm8k_jsonl(data_dir / "test.jsonl", "test"),
    )
