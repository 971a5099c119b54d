"""SVAMP (Patel et al. 2021): 1,000 one- or two-operation word problems, the paper's second benchmark.

Each entry has ``Body``, ``Question``, ``Equation`` (e.g. ``"( ( 692.0 + 692.0 ) - 458.0 )"``) and ``Answer``.
SVAMP has no worked solutions, so we write one in GSM8K format from the equation: one line per operation,
innermost first, each with a calculator annotation, then the answer line::

    692 + 692 = <<692+692=1384>>1384
    1384 - 458 = <<1384-458=926>>926
    #### 926

One entry of the original file (chal-680: "( ( 4.0 - 2.0 ) + 3.0 )", Answer 1.0) contradicts its own equation;
entries like that are skipped with a logged warning, after the split is cut, so the splits keep their positions.

SVAMP has no official split either: the last ``n_test_split`` entries are the test split (the hub copy
``ChilleD/SVAMP`` is the same 1,000 entries split 700 / 300 in this order, so the default reproduces it).
"""

from __future__ import annotations

import json
import logging
from fractions import Fraction
from pathlib import Path
from typing import Any

from reasoning_rl.config import SVAMPTaskConfig
from reasoning_rl.tasks.answers import format_number
from reasoning_rl.tasks.calculator import BinOp, CalculatorError, Node, Num, Unary, evaluate, parse_expression
from reasoning_rl.tasks.problem import Problem, TaskDataError, TaskSplits, problem_from_reference

KEYS = ("Body", "Question", "Equation", "Answer")
log = logging.getLogger(__name__)


class InconsistentEntry(TaskDataError):
    """An entry whose Equation does not give its Answer: skipped by load_svamp."""


def _operand(x: Fraction) -> str:
    # Parenthesise what would otherwise re-associate inside the next annotation: "6/(1/3)", "5-(-2)".
    text = format_number(x)
    return f"({text})" if "/" in text or x < 0 else text


def equation_steps(equation: str) -> tuple[list[str], Fraction]:
    """GSM8K-style step lines for a SVAMP equation (one per operation, innermost first) and its value.

    Raises CalculatorError when the equation is not plain arithmetic.
    """
    lines: list[str] = []

    def visit(node: Node) -> Fraction:
        if isinstance(node, Num):
            return node.value
        if isinstance(node, Unary):
            value = visit(node.operand)
            return -value if node.op == "-" else value
        left, right = visit(node.left), visit(node.right)
        value = evaluate(BinOp(node.op, Num(left), Num(right)))
        a, b, r = _operand(left), _operand(right), format_number(value)
        lines.append(f"{a} {node.op} {b} = <<{a}{node.op}{b}={r}>>{r}")
        return value

    return lines, visit(parse_expression(equation))


def svamp_question(body: str, question: str) -> str:
    """Body and question as one text. A third of the bodies end mid-sentence ("If there are 692 girls"), so
    those are joined with a comma ("..., how many boys are there?"); the others with a space."""
    body, question = body.strip(), question.strip()
    if body.endswith((".", "?", "!")):
        return f"{body} {question}"
    return f"{body}, {question[:1].lower()}{question[1:]}"


def svamp_problem(row: Any, split: str, index: int, where: str) -> Problem:
    """One SVAMP entry as a Problem with a reference written from its equation; ``where`` prefixes errors."""
    if not isinstance(row, dict) or any(key not in row for key in KEYS):
        raise TaskDataError(f"{where}: expected an object with keys {', '.join(KEYS)}")
    try:
        lines, value = equation_steps(str(row["Equation"]))
    except CalculatorError as e:
        raise TaskDataError(f"{where}: cannot evaluate Equation {row['Equation']!r}: {e}") from None
    try:
        answer = float(row["Answer"])
    except (TypeError, ValueError):
        raise TaskDataError(f"{where}: Answer {row['Answer']!r} is not a number") from None
    if abs(float(value) - answer) > 1e-6 * max(1.0, abs(answer)):
        raise InconsistentEntry(
            f"{where}: Equation {row['Equation']!r} gives {format_number(value)}, but Answer is {answer}"
        )
    reference = "\n".join([*lines, f"#### {format_number(value)}"])
    id = f"svamp/{split}/{row.get('ID', index)}"
    return problem_from_reference(id, svamp_question(str(row["Body"]), str(row["Question"])), reference, where)


def _read_rows(path: Path) -> list[Any]:
    if not path.is_file():
        problem = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise TaskDataError(
            f"SVAMP file {path.resolve()} {problem}. Set task.data_path to the SVAMP.json file "
            "(from arkilpatel/SVAMP), or task.data_path=null to load it from the hub."
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise TaskDataError(
            f"{path} line {line}: not UTF-8 text (byte {data[e.start]:#04x}); save it as UTF-8"
        ) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(rows, list) or not rows:
        got = "an empty list" if isinstance(rows, list) else type(rows).__name__
        raise TaskDataError(f"{path}: expected a JSON list of SVAMP entries, got {got}")
    return rows


def _read_hub(hub_id: str) -> list[Any]:
    import datasets  # imported here: it is slow to import and only this path needs it

    ds = datasets.load_dataset(hub_id)
    return [dict(row) for split in ("train", "test") for row in ds[split]]


def load_svamp(cfg: SVAMPTaskConfig) -> TaskSplits:
    """SVAMP's entries in file order; the last ``cfg.n_test_split`` are the test split."""
    source = f"hub dataset {cfg.hub_id}" if cfg.data_path is None else str(cfg.data_path)
    rows = _read_hub(cfg.hub_id) if cfg.data_path is None else _read_rows(Path(cfg.data_path))
    if not 1 <= cfg.n_test_split < len(rows):  # both splits non-empty
        raise TaskDataError(f"task.n_test_split={cfg.n_test_split} must be in [1, {len(rows)}) for {source}")
    cut = len(rows) - cfg.n_test_split
    splits: dict[str, list[Problem]] = {"train": [], "test": []}
    for i, row in enumerate(rows):
        split = "train" if i < cut else "test"
        try:
            splits[split].append(svamp_problem(row, split, i, f"{source} entry {i}"))
        except InconsistentEntry as e:
            log.warning("skipping SVAMP entry: %s", e)
    return TaskSplits(train=splits["train"], test=splits["test"])
