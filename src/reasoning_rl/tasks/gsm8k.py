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
        problem = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise TaskDataError(
            f"GSM8K file {path.resolve()} {problem}. Put the original {path.name} there (from "
            "openai/grade-school-math), set task.data_dir to a directory that has it, or set task.data_dir=null "
            "to load openai/gsm8k from the hub."
        )
    problems: list[Problem] = []
    with path.open("rb") as f:  # bytes, decoded line by line, so a bad byte is reported with its line
        for lineno, raw in enumerate(f, start=1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TaskDataError(
                    f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at byte {e.start + 1} of the line); "
                    "save the file as UTF-8"
                ) from None
            if not line.strip():
                continue  # a trailing blank line is not an error
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(
                    f"{where}: invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
                ) from None
            problems.append(gsm8k_problem(row, f"gsm8k/{split}/{len(problems)}", where))
    if not problems:
        raise TaskDataError(
            f"GSM8K file {path} holds no problems (it is empty or blank): put the original {path.name} there (from "
            "openai/grade-school-math), one JSON object per line."
        )
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
        problem = "is a file, not a directory" if data_dir.exists() else "does not exist"
        raise TaskDataError(
            f"GSM8K data directory {data_dir.resolve()} {problem}. Set task.data_dir to a directory with "
            f"train.jsonl and test.jsonl, or task.data_dir=null to load {cfg.hub_id} from the hub."
        )
    return TaskSplits(
        train=read_gsm8k_jsonl(data_dir / "train.jsonl", "train"),
        test=read_gsm8k_jsonl(data_dir / "test.jsonl", "test"),
    )
