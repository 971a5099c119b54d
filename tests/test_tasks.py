"""Task loaders: the real GSM8K and SVAMP files, subsetting, clear data errors, and the generated tasks."""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import skip_or_fail

from reasoning_rl.config import ArithTaskConfig, GSM8KTaskConfig, GSMSymbolicTaskConfig, SVAMPTaskConfig, TaskConfig
from reasoning_rl.tasks import (
    LOADERS,
    Problem,
    TaskDataError,
    TaskSplits,
    check_annotation,
    extract_answer,
    generate_arith,
    intermediate_results,
    load_task,
    parse_annotations,
    parse_number,
    subset_splits,
)
from reasoning_rl.tasks.arith import generate_arith_problem
from reasoning_rl.tasks.svamp import equation_steps, svamp_question

DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
GSM8K_DIR = DATA / "gsm8k"
SVAMP_FILE = DATA / "svamp" / "SVAMP.json"


@pytest.fixture(scope="module")
def gsm8k_data() -> None:
    """The original GSM8K files, in ../shared/data beside the project: without them a test skips, under CI it fails."""
    if not (GSM8K_DIR / "train.jsonl").is_file() or not (GSM8K_DIR / "test.jsonl").is_file():
        skip_or_fail(f"the GSM8K files are not in {GSM8K_DIR} (train.jsonl and test.jsonl of openai/grade-school-math)")


@pytest.fixture(scope="module")
def svamp_data() -> None:
    """The original SVAMP.json, in ../shared/data beside the project: without it a test skips, under CI it fails."""
    if not SVAMP_FILE.is_file():
        skip_or_fail(f"the SVAMP file is not at {SVAMP_FILE} (SVAMP.json of arkilpatel/SVAMP)")


needs_gsm8k = pytest.mark.usefixtures("gsm8k_data")
needs_svamp = pytest.mark.usefixtures("svamp_data")


def ids(problems: list[Problem]) -> list[str]:
    return [p.id for p in problems]


def test_unknown_task_lists_valid_names() -> None:
    # dispatch is by the config's schema: the base TaskConfig has no loader, whatever its name
    with pytest.raises(ValueError, match="unknown task 'nope'.*GSM8KTaskConfig.*SVAMPTaskConfig.*ArithTaskConfig"):
        load_task(TaskConfig(name="nope"))
    assert set(LOADERS) == {GSM8KTaskConfig, SVAMPTaskConfig, GSMSymbolicTaskConfig, ArithTaskConfig}


def test_a_task_of_ones_own_loads_through_its_schemas_loader() -> None:
    # a file naming ArithTaskConfig with a name of its own: the arith loader builds it
    splits = load_task(ArithTaskConfig(name="arith_hard", size_train=5, size_test=3, min_steps=3, max_steps=3))
    assert (len(splits.train), len(splits.test)) == (5, 3)


# ------------------------------------------------------------------------------------------------ subsets


def _toy_splits() -> TaskSplits:
    def make(split: str, i: int) -> Problem:
        return Problem(id=f"toy/{split}/{i}", question=f"q{i}", reference=f"#### {i}", answer=str(i), steps=())

    return TaskSplits(train=[make("train", i) for i in range(10)], test=[make("test", i) for i in range(10)])


def test_subset_splits() -> None:
    splits = _toy_splits()
    sub = subset_splits(splits, n_train=3, n_test=4, subset_seed=0)
    assert ids(sub.test) == ["toy/test/0", "toy/test/1", "toy/test/2", "toy/test/3"]  # file order
    expected = list(range(10))
    random.Random(0).shuffle(expected)  # the train subset is the head of a seed-0 shuffle
    assert ids(sub.train) == [f"toy/train/{i}" for i in expected[:3]]
    assert sub == subset_splits(splits, n_train=3, n_test=4, subset_seed=0)  # deterministic
    assert ids(subset_splits(splits, 3, 4, subset_seed=1).train) != ids(sub.train)
    whole = subset_splits(splits, None, None, subset_seed=0)
    assert whole == splits  # None keeps everything, in order
    assert len(subset_splits(splits, 100, 100, 0).train) == 10  # more than there are: all
    assert subset_splits(splits, 0, 0, 0) == TaskSplits(train=[], test=[])
    with pytest.raises(ValueError, match="n_train=-1"):
        subset_splits(splits, -1, None, 0)


# -------------------------------------------------------------------------------------------------- gsm8k


@pytest.fixture(scope="module")
def gsm8k(gsm8k_data: None) -> TaskSplits:
    return load_task(GSM8KTaskConfig(data_dir=str(GSM8K_DIR)))


@needs_gsm8k
def test_gsm8k_loads_real_files(gsm8k: TaskSplits) -> None:
    assert (len(gsm8k.train), len(gsm8k.test)) == (7473, 1319)
    first = gsm8k.test[0]
    assert first.id == "gsm8k/test/0"
    assert first.question.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert first.answer == "18"  # 16 - 3 - 4 = 9 eggs sold, 9 * $2 = $18
    assert first.steps == (
        "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.",
        "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer\u2019s market.",
    )
    assert first.reference.endswith("#### 18")
    assert gsm8k.train[0].answer == "72"  # Natalia: 48 + 48/2
    assert all(p.answer and p.reference.splitlines()[-1].startswith("####") for p in gsm8k.train + gsm8k.test)
    # GSM8K writes a few answers with separators ("#### 1,080"); the canonical answer drops them.
    assert all("," not in p.answer for p in gsm8k.train + gsm8k.test)


@needs_gsm8k
def test_gsm8k_annotations_check_out(gsm8k: TaskSplits) -> None:
    # A sanity check of the calculator on real data: all but two of GSM8K's 27,998 annotations evaluate
    # to their result; those two use floor division ("560//10=56"), which the calculator refuses.
    annotations = [a for p in gsm8k.train + gsm8k.test for a in parse_annotations(p.reference)]
    failures = [a for a in annotations if not check_annotation(*a)]
    assert len(annotations) == 27998
    assert failures == [("560//10", "56"), ("180//3", "60")]


@needs_gsm8k
def test_gsm8k_subsets() -> None:
    cfg = GSM8KTaskConfig(data_dir=str(GSM8K_DIR), n_train=50, n_test=20, subset_seed=3)
    a, b = load_task(cfg), load_task(cfg)
    assert ids(a.test) == [f"gsm8k/test/{i}" for i in range(20)]
    assert len(a.train) == 50 and len(set(ids(a.train))) == 50
    assert a == b  # same config, same problems
    other = load_task(replace(cfg, subset_seed=4))
    assert ids(other.test) == ids(a.test)  # the test subset never depends on the seed
    assert ids(other.train) != ids(a.train)


@needs_gsm8k
def test_gsm8k_relative_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(DATA)  # a relative data_dir is relative to the working directory
    assert len(load_task(GSM8KTaskConfig(data_dir="gsm8k", n_train=1, n_test=1)).test) == 1


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("this is not json", "invalid JSON"),
        (json.dumps({"question": "q?"}), "missing or non-string key 'answer'"),
        (json.dumps({"question": "q?", "answer": "no answer line"}), "no '#### <answer>' line"),
        (json.dumps({"question": "q?", "answer": "step\n#### "}), "'####' line is empty"),
        (json.dumps(["a list"]), "expected a JSON object"),
    ],
)
@needs_gsm8k
def test_gsm8k_broken_line_names_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    shutil.copy(GSM8K_DIR / "train.jsonl", tmp_path / "train.jsonl")
    lines = (GSM8K_DIR / "test.jsonl").read_text(encoding="utf-8").splitlines()
    lines[2] = bad_line  # the third line of the file
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(TaskDataError) as err:
        load_task(GSM8KTaskConfig(data_dir=str(tmp_path)))
    assert f"{tmp_path / 'test.jsonl'} line 3:" in str(err.value)
    assert message in str(err.value)


def test_gsm8k_missing_dir_and_file(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match=r"does not exist.*task\.data_dir=null") as err:
        load_task(GSM8KTaskConfig(data_dir=str(tmp_path / "nowhere")))
    assert str(tmp_path / "nowhere") in str(err.value)
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n', encoding="utf-8")
    with pytest.raises(TaskDataError, match="train.jsonl does not exist"):
        load_task(GSM8KTaskConfig(data_dir=str(tmp_path)))


# -------------------------------------------------------------------------------------------------- svamp


@needs_svamp
def test_svamp_loads_real_file() -> None:
    splits = load_task(SVAMPTaskConfig(data_path=str(SVAMP_FILE)))
    # 1,000 entries, the last 300 are test; chal-680 contradicts its own equation and is skipped.
    assert (len(splits.train), len(splits.test)) == (699, 300)
    assert "svamp/train/chal-680" not in ids(splits.train)
    first = splits.test[0]
    assert first.id == "svamp/test/chal-701"
    assert first.reference == "6 - 2 = <<6-2=4>>4\n#### 4" and first.answer == "4"
    for p in splits.train + splits.test:
        assert all(check_annotation(*a) for a in parse_annotations(p.reference))
        if p.steps:
            assert intermediate_results(p.reference)[-1] == parse_number(p.answer)  # the last step is the answer
    # One equation is a bare number ("8.0"): nothing to compute, so the reference is only "#### 8".
    assert [(p.id, p.reference) for p in splits.train + splits.test if not p.steps] == [
        ("svamp/train/chal-555", "#### 8")
    ]
    # Body "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack" has no
    # final period, so the question is joined with a comma.
    assert splits.train[0].question == (
        "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack, "
        "how much do you have to pay to buy each pack?"
    )


def test_svamp_equation_steps() -> None:
    lines, value = equation_steps("( ( 692.0 + 692.0 ) - 458.0 )")  # innermost first: 1384, then 1384 - 458
    assert lines == ["692 + 692 = <<692+692=1384>>1384", "1384 - 458 = <<1384-458=926>>926"]
    assert value == 926
    # 55/15 = 11/3 is not a terminating decimal: kept as a fraction, parenthesised in the next step,
    # where 60 * 11/3 = 220.
    lines, value = equation_steps("( 60.0 * ( 55.0 / 15.0 ) )")
    assert lines == ["55 / 15 = <<55/15=11/3>>11/3", "60 * (11/3) = <<60*(11/3)=220>>220"]
    assert all(check_annotation(*parse_annotations(line)[0]) for line in lines)


def test_svamp_question_join() -> None:
    assert svamp_question("Tom has 3 pens.", "How many?") == "Tom has 3 pens. How many?"
    assert svamp_question("If Tom has 3 pens", "How many?") == "If Tom has 3 pens, how many?"


def test_svamp_errors(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match=r"SVAMP\.json does not exist.*task\.data_path=null"):
        load_task(SVAMPTaskConfig(data_path=str(tmp_path / "SVAMP.json")))
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"Body": "x",\n  oops\n]', encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"bad\.json line 3: invalid JSON"):
        load_task(SVAMPTaskConfig(data_path=str(bad)))
    entry = {"ID": "e1", "Body": "Tom has 3 pens.", "Question": "How many?", "Equation": "( 3.0 )", "Answer": 3.0}
    small = tmp_path / "small.json"
    small.write_text(json.dumps([entry, {**entry, "Equation": "import os"}]), encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"small\.json entry 1: cannot evaluate Equation 'import os'"):
        load_task(SVAMPTaskConfig(data_path=str(small), n_test_split=1))
    small.write_text(json.dumps([entry, entry]), encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"n_test_split=2 must be in \[1, 2\)"):
        load_task(SVAMPTaskConfig(data_path=str(small), n_test_split=2))


# -------------------------------------------------------------------------------------------------- arith


def _arith(**overrides: object) -> TaskSplits:
    cfg = replace(ArithTaskConfig(size_train=300, size_test=100), **overrides)  # type: ignore[arg-type]
    return load_task(cfg)


def test_arith_is_deterministic_and_seeded() -> None:
    assert _arith() == _arith()
    assert _arith(seed=7) != _arith()


def test_arith_example() -> None:
    # One problem drawn by hand-checkable rules: each line "a op b=<<a op b=r>>r" and the answer is the last r.
    question, reference = generate_arith_problem(random.Random(0), 2, 2, 20, "+-")
    *lines, answer_line = reference.splitlines()
    assert question.endswith("?") and len(lines) == 2
    assert answer_line == f"#### {lines[-1].split('>>')[-1]}"


@pytest.mark.parametrize(
    ("min_steps", "max_steps", "operations"), [(2, 2, "+-"), (1, 4, "+-*"), (3, 3, "-"), (1, 2, "*")]
)
def test_arith_problems_are_well_formed(min_steps: int, max_steps: int, operations: str) -> None:
    splits = _arith(min_steps=min_steps, max_steps=max_steps, operations=operations)
    assert (len(splits.train), len(splits.test)) == (300, 100)
    assert not {p.question for p in splits.train} & {p.question for p in splits.test}  # disjoint
    for p in splits.train + splits.test:
        annotations = parse_annotations(p.reference)
        assert min_steps <= len(annotations) == len(p.steps) <= max_steps
        assert all(check_annotation(expr, result) for expr, result in annotations)
        assert all(op in operations for expr, _ in annotations for op in "+-*" if op in expr)
        results = intermediate_results(p.reference)
        assert all(r >= 0 for r in results)  # never negative
        assert extract_answer(p.reference, fallback=False) == p.answer == str(results[-1])
        assert p.question.isascii() and p.reference.isascii()
        if max_steps == 2 and "*" not in operations:
            assert len(p.question) + len(p.reference) < 200  # fits a char-level model's 256 positions


# What each operation's sentence says (arith.TEMPLATES, written out here): "gets / finds / buys n more", "gives away /
# loses / sells n", "then has n times as many".
SAYS = {"+": ("gets", "finds", "buys"), "-": ("gives away", "loses", "sells"), "*": ("then has",)}


def test_arith_question_states_the_steps_its_solution_computes() -> None:
    # "Tom has 5 apples. He gets 3 more. He gives away 2. How many apples does Tom have?" and "5+3=<<5+3=8>>8",
    # "8-2=<<8-2=6>>6": the start amount opens the first line, and sentence i names line i's operation and operand.
    splits = _arith(min_steps=1, max_steps=4, operations="+-*")
    counts = set()
    for p in splits.train + splits.test:
        first, *middle, last = p.question.split(". ")
        lines = [expr for expr, _ in parse_annotations(p.reference)]
        assert len(middle) == len(lines) and last.startswith("How many")
        counts.add(len(lines))
        assert first.split()[2] == re.match(r"[0-9]+", lines[0]).group()  # "Tom has 5 apples", "5+3": 5
        for sentence, expr in zip(middle, lines, strict=True):
            _, op, operand = re.fullmatch(r"([0-9]+)([-+*])([0-9]+)", expr).groups()  # "5+3": "+", "3"
            assert sentence.split(" ", 1)[1].startswith(SAYS[op]) and f" {operand} " in f"{sentence} ", (sentence, expr)
    assert counts == {1, 2, 3, 4}  # every step count from min_steps to max_steps is drawn


def test_arith_impossible_settings() -> None:
    # Only subtraction, operands up to 1 and 2 steps: the start amount is 1, so the first "-1" leaves 0
    # and no second step is possible.
    with pytest.raises(ValueError, match="no arith problem"):
        generate_arith(1, 1, min_steps=2, max_steps=2, max_number=1, operations="-", seed=0)


# ------------------------------------------------------------------------------------------- gsm_symbolic


def test_gsm_symbolic_small() -> None:
    start = time.perf_counter()
    cfg = GSMSymbolicTaskConfig(size_train=60, size_test=30)
    splits = load_task(cfg)
    assert len(splits.test) == 30 and 0 < len(splits.train) <= 60
    assert not {p.question for p in splits.train} & {p.question for p in splits.test}
    for p in splits.train + splits.test:
        assert p.id.startswith(("gsm_symbolic/train/", "gsm_symbolic/test/"))
        assert not p.question.endswith("Do not include units.")  # reasoning-gym's instruction is removed
        assert p.reference.endswith(f"#### {p.answer}") and parse_number(p.answer) is not None
    assert load_task(cfg) == splits  # seeded: the same problems again
    assert time.perf_counter() - start < 20  # mostly `import reasoning_gym` (a few seconds)
