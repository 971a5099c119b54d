"""Structured fuzzing of answer parsing and the calculator (hypothesis), beside tests/test_answers.py's text fuzzing.

Expressions are generated as trees with huge numbers, deep nesting and long chains, so most of them are well formed
and reach the evaluator (random text rarely does). Properties: the calculator either returns exactly the value a
plain Fraction evaluation of the same tree gives, or raises CalculatorError for one of its documented limits;
answer extraction and matching never raise, and a number written by ``format_number`` reads back as itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from reasoning_rl.tasks import is_correct, operation_signature
from reasoning_rl.tasks.answers import (
    MAX_ANSWER_CHARS,
    MAX_NUMBER_DIGITS,
    answers_match,
    canonical_answer,
    extract_answer,
    format_number,
    intermediate_results,
    parse_number,
)
from reasoning_rl.tasks.calculator import MAX_DEPTH, MAX_DIGITS, MAX_EXPR_CHARS, CalculatorError, safe_eval

LIMIT = 10**MAX_DIGITS
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Expr:
    text: str
    value: Fraction | None  # None: the plain evaluation divides by zero
    depth: int  # parentheses and unary signs, nested
    biggest: int  # largest numerator or denominator met on the way (the calculator's magnitude limit)


def number() -> st.SearchStrategy[Expr]:
    integers = st.integers(0, 10**80).map(str)  # up to 81 digits: past the calculator's 60-digit limit
    decimals = st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)).map(lambda p: f"{p[0]}.{p[1]}")
    return st.one_of(integers, decimals).map(lambda t: Expr(t, Fraction(t), 0, _size(Fraction(t))))


def _size(x: Fraction) -> int:
    return max(abs(x.numerator), x.denominator)


def combine(children: st.SearchStrategy[Expr]) -> st.SearchStrategy[Expr]:
    def binary(op: str, a: Expr, b: Expr) -> Expr:
        value = None
        if a.value is not None and b.value is not None and not (op == "/" and b.value == 0):
            value = {"+": a.value + b.value, "-": a.value - b.value, "*": a.value * b.value}.get(op)
            value = a.value / b.value if op == "/" else value
        biggest = max(a.biggest, b.biggest, _size(value) if value is not None else 0)
        return Expr(f"{a.text}{op}{b.text}", value, max(a.depth, b.depth), biggest)

    def wrap(kind: str, a: Expr) -> Expr:
        if kind == "()":
            return Expr(f"({a.text})", a.value, a.depth + 1, a.biggest)
        return Expr(f"-{a.text}", None if a.value is None else -a.value, a.depth + 1, a.biggest)

    binaries = st.builds(
        lambda op, a, b: binary(op, a, b if op == "*" or not b.text.startswith("-") else wrap("()", b)),
        st.sampled_from("+-*/"),
        children,
        children,
    )
    # A binary node's operands are parenthesised so the text's precedence is the tree's.
    parenthesised = binaries.map(lambda e: wrap("()", e))
    return st.one_of(parenthesised, st.builds(wrap, st.sampled_from(["()", "-"]), children))


expressions = st.recursive(number(), combine, max_leaves=40)


@FUZZ
@given(expressions)
def test_calculator_is_exact_or_refuses_for_a_documented_reason(expr: Expr) -> None:
    try:
        value = safe_eval(expr.text)
    except CalculatorError as error:
        reasons = {
            "length": len(expr.text) > MAX_EXPR_CHARS,
            "depth": expr.depth > MAX_DEPTH - 1,  # the parser counts its own entry level too
            "zero": expr.value is None,
            "magnitude": expr.biggest >= LIMIT,
        }
        assert any(reasons.values()), (str(error), expr)
        return
    assert expr.value is not None and value == expr.value, expr


@FUZZ
@given(expressions, st.text(st.characters(blacklist_characters="<>=#"), max_size=50))  # words: no markup of their own
def test_solutions_built_from_expressions_parse_without_raising(expr: Expr, words: str) -> None:
    result = format_number(expr.value) if expr.value is not None else "0"
    assume(len(result) < MAX_ANSWER_CHARS)  # extract_answer reads that much of the answer line, by design
    solution = f"{words} {expr.text} = <<{expr.text}={result}>>{result}\n#### {result}"
    assert extract_answer(solution) == result
    # the same answer text always matches: as a number, or (past MAX_NUMBER_DIGITS digits) as text
    assert is_correct(solution, result)
    canonical_answer(extract_answer(solution))
    intermediate_results(solution)
    signature = operation_signature(solution)
    assert len(signature) == 1  # the one annotation, whatever its content


@FUZZ
@given(st.fractions(max_denominator=10**6).filter(lambda x: len(str(abs(x.numerator))) < MAX_NUMBER_DIGITS // 2))
def test_a_formatted_number_reads_back_as_itself(x: Fraction) -> None:
    text = format_number(x)
    assert parse_number(text) == x
    assert answers_match(text, text) and answers_match(f"$ {text} dollars", text)
    assert is_correct(f"so the answer\n#### {text}", text)


@FUZZ
@given(st.integers(1, 5000), st.sampled_from(["(", "-", "1+", "9" * 7, "<<", "####", "\n"]))
def test_long_repetitions_never_raise(n: int, piece: str) -> None:
    text = piece * n
    for completion in (text, f"#### {text}", f"{text}\n#### 3"):
        answers_match(extract_answer(completion), "3")
        intermediate_results(completion)
        operation_signature(completion)
    try:
        safe_eval(text)
    except CalculatorError:
        pass
