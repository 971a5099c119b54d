"""Answer extraction and checking, the safe calculator, and solution structure (steps, annotations, signatures)."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reasoning_rl.tasks import (
    CalculatorError,
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
    safe_eval,
    split_steps,
    step_prefixes,
)

# (completion, reference answer, expected is_correct)
GRADING_CASES = [
    ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18", "18", True),  # plain GSM8K format
    ("#### 18", "18", True),  # answer line only
    ("#### 17", "18", False),  # plain wrong answer
    ("#### 18.00", "18", True),  # trailing zero decimals equal the integer
    ("#### 18.0", "18", True),  # trailing ".0"
    ("#### 18.", "18", True),  # trailing period is punctuation, not a decimal point
    ("#### $1,080", "1080", True),  # currency sign and thousands separator
    ("#### 1080", "1,080", True),  # the reference itself written with a separator (GSM8K does this)
    ("#### 1,080,000", "1080000", True),  # several separator groups
    ("#### 1,0800", "10800", False),  # malformed grouping: only "1" is read, not 10800
    ("#### -5", "-5", True),  # negative
    ("#### \u22125", "-5", True),  # unicode minus sign U+2212
    ("#### 5", "-5", False),  # sign matters
    ("#### +5", "5", True),  # explicit plus sign
    ("#### 5 apples", "5", True),  # trailing units
    ("#### $12.50 per hour", "12.5", True),  # currency, decimal and trailing words
    ("#### 25%", "25", True),  # percent sign stripped, not divided by 100
    ("#### 0.5", ".5", True),  # leading-dot decimal in the reference
    ("#### 3/4", "0.75", True),  # fraction equals its decimal exactly
    ("#### 1 1/2", "1.5", True),  # mixed number
    ("#### 0.33", "1/3", False),  # a rounded decimal is not the exact fraction
    ("#### 18\n#### 20", "18", True),  # several "####": the first one counts
    ("#### 20\n#### 18", "18", False),  # ... even when a later one is right
    ("#### \n18", "18", False),  # "####" with nothing on its line: no answer, no fallback
    ("####", "18", False),  # bare marker at the very end
    ("", "18", False),  # empty completion
    ("The answer is 42.", "42", True),  # no "####": fallback to the last number, trailing period
    ("5 + 3 = 8 and 8 - 2 = 6", "6", True),  # fallback takes the last number, not the first
    ("I think it is 6 or maybe 7", "6", False),  # fallback: the last number, 7
    ("no numbers here at all", "18", False),  # fallback finds nothing
    ("#### eighteen", "18", False),  # a number in words is not read
    ("####18", "18", True),  # no space after the marker
    ("#### The answer is 18", "18", True),  # words before the number on the answer line
    # > MAX_NUMBER_DIGITS digits: not read as numbers, so compared as text, and "...0" != "...0.0"
    ("#### 1" + "0" * 150, "1" + "0" * 150 + ".0", False),
    ("#### 123456789012345678901234567890", "123456789012345678901234567890", True),  # big but allowed, exact
    ("x" * 100_000 + " 42", "42", True),  # very long completion: fallback only scans the tail
    ("#### yes", "Yes.", True),  # text answer: case and trailing period ignored
    ("#### no", "yes", False),  # text answer mismatch
    ("#### mp3", "3", False),  # a digit glued to a word is not a number
    ("#### 2/0", "2", False),  # division by zero in a fraction is not a number
]


@pytest.mark.parametrize(("completion", "reference", "expected"), GRADING_CASES)
def test_is_correct(completion: str, reference: str, expected: bool) -> None:
    assert is_correct(completion, reference) is expected


def test_grading_table_is_large() -> None:
    assert len(GRADING_CASES) >= 30


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,000", Fraction(1000)),
        ("$12.50 per hour", Fraction(25, 2)),
        ("-3", Fraction(-3)),
        ("\u22123", Fraction(-3)),
        ("1 1/2", Fraction(3, 2)),  # 1 + 1/2
        ("-1 1/2", Fraction(-3, 2)),  # the sign applies to the whole mixed number
        ("x = 5", Fraction(5)),
        ("2 + 3 = 5", Fraction(2)),  # the FIRST number: an answer line holds an answer, not a calculation
        ("abc", None),
        ("", None),
        ("1" * 101, None),  # 101 digits
    ],
)
def test_parse_number(text: str, value: Fraction | None) -> None:
    assert parse_number(text) == value


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("1,000.00", "1000"),
        ("0.50", "0.5"),
        ("3/4", "0.75"),  # terminating decimal: 3/4 = 75/100
        ("2/6", "1/3"),  # 1/3 has no terminating decimal: kept as a reduced fraction
        ("-0.125", "-0.125"),
        ("$18 dollars", "18"),
        ("  The Cat  sat. ", "the cat sat"),  # text: lower-cased, whitespace collapsed, final period dropped
        (None, ""),  # nothing extracted: the empty answer, left out of majority votes
    ],
)
def test_canonical_answer(text: str | None, canonical: str) -> None:
    assert canonical_answer(text) == canonical


def test_format_number() -> None:
    assert format_number(Fraction(7)) == "7"
    assert format_number(Fraction(-1, 8)) == "-0.125"  # 1/8 = 125/1000
    assert format_number(Fraction(1, 40)) == "0.025"  # 40 = 2^3 * 5 -> three decimal places
    assert format_number(Fraction(-2, 3)) == "-2/3"


def test_extract_answer() -> None:
    assert extract_answer("steps\n#### 72\nmore") == "72"
    assert extract_answer("The answer is 42.") == "42"
    assert extract_answer("The answer is 42.", fallback=False) is None
    assert extract_answer("#### ") is None
    # 2,000 characters of "7" then " 5": the 1,000-character tail starts inside the run of 7s, and that
    # fragment is skipped rather than read as a number; the last number is 5.
    assert extract_answer("7" * 2000 + " 5") == "5"
    # "12345" then 997 spaces: the tail's first 3 characters are "345", a cut number, and nothing else is a number
    assert extract_answer("12345" + " " * 997) is None


def test_answers_match_none_and_empty() -> None:
    assert not answers_match(None, "18")
    assert not answers_match("", "")  # an empty reference never matches


# --------------------------------------------------------------------------------------------- safe_eval


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("48/2", Fraction(24)),
        ("16-3-4", Fraction(9)),  # left-associative: (16-3)-4
        ("2+3*4", Fraction(14)),  # precedence: 2 + 12
        ("(2+3)*4", Fraction(20)),
        ("-3+5", Fraction(2)),
        ("--3", Fraction(3)),
        ("1,000*3", Fraction(3000)),  # thousands separator
        ("0.1+0.2", Fraction(3, 10)),  # exact, no float error
        ("10/4", Fraction(5, 2)),
        ("2**10", Fraction(1024)),
        ("-2**2", Fraction(-4)),  # as in Python: -(2**2)
        ("2**-1", Fraction(1, 2)),
        (" 5. ", Fraction(5)),  # "5." is a number; whitespace around it is ignored
        ("1**64", Fraction(1)),  # the largest exponent allowed
    ],
)
def test_safe_eval(expr: str, value: Fraction) -> None:
    assert safe_eval(expr) == value


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('true')",  # names and calls
        "os.system",  # attribute access
        "x+1",  # variables
        "2**1000",  # exponent over MAX_EXPONENT
        "1**65",  # exponent over MAX_EXPONENT, although the value is small
        "99999**64",  # allowed exponent, but the result would exceed 10**60
        "10**30*10**30*10",  # magnitude limit on a product: 10**61
        "1/0",  # division by zero
        "0**-1",  # division by zero through a power
        "2**0.5",  # non-integer exponent
        "(" * 1000 + "1" + ")" * 1000,  # nesting far past MAX_DEPTH (and the length limit)
        "(" * 30 + "1" + ")" * 30,  # 30 levels: short enough, too deep
        "-" * 30 + "1",  # a long chain of unary minus is nesting too
        "1+" * 150 + "1",  # 301 characters: over the length limit
        "",  # empty
        "2 3",  # two numbers without an operator
        "(2+3",  # unbalanced
        "2//3",  # floor division is not supported
        "1e5",  # no scientific notation
        "1,00",  # malformed thousands separator
    ],
)
def test_safe_eval_refuses(expr: str) -> None:
    with pytest.raises(CalculatorError):
        safe_eval(expr)


def test_calculator_error_is_value_error() -> None:
    assert issubclass(CalculatorError, ValueError)


# --------------------------------------------------------------------------------------- solution structure

SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "\n"
    "  Natalia sold 48+24 = <<48+24=72>>72 clips altogether.  \n"
    "#### 72"
)


def test_parse_annotations() -> None:
    assert parse_annotations(SOLUTION) == [("48/2", "24"), ("48+24", "72")]
    assert parse_annotations("<< 3 * 4 = 12 >>") == [("3 * 4", "12")]
    assert parse_annotations("<<a=b=c>>") == [("a=b", "c")]  # the last "=" separates the result
    assert parse_annotations("no annotations <<>> << 5 >>") == []


def test_check_annotation() -> None:
    assert check_annotation("48/2", "24")
    assert not check_annotation("48/2", "25")
    assert check_annotation("10/3", "3.33")  # |10/3 - 3.33| = 1/300 <= 0.005: rounded to 2 decimals
    assert check_annotation("10/3", "3.3")  # |10/3 - 3.3| = 1/30 <= 0.05: rounded to 1 decimal
    assert not check_annotation("10/3", "3.4")  # |10/3 - 3.4| = 1/15 > 0.05: wrongly rounded
    assert not check_annotation("10/3", "3")  # integers must be exact
    assert check_annotation("1,000*2", "2,000")
    assert not check_annotation("__import__('os')", "0")
    assert not check_annotation("1+1", "two")


def test_split_steps() -> None:
    assert split_steps(SOLUTION) == [
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.",
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.",
    ]
    assert split_steps("one\ntwo #### 3\nthree") == ["one", "two"]  # text from "####" on is not a step
    assert split_steps("no marker\nat all") == ["no marker", "at all"]
    assert split_steps("") == []


def test_step_prefixes() -> None:
    # the solution cut after each non-blank line, text kept exactly; a blank line belongs to the step after it
    assert step_prefixes("a\n\nb\n#### 3") == ["a\n", "a\n\nb\n", "a\n\nb\n#### 3"]
    assert step_prefixes(SOLUTION)[-1] == SOLUTION and len(step_prefixes(SOLUTION)) == 3  # 2 steps + "####" line
    assert step_prefixes("one line") == ["one line"]
    assert step_prefixes("\n  \n") == step_prefixes("") == []


def test_intermediate_results() -> None:
    assert intermediate_results(SOLUTION) == [Fraction(24), Fraction(72)]
    assert intermediate_results("a <<1/2=0.5>>0.5 b <<x=?>> c") == [Fraction(1, 2)]  # "?" is skipped
    assert intermediate_results("#### 5 <<2+3=5>>") == []  # after "####": not part of the solution
    assert intermediate_results("no annotations") == []


def test_operation_signature_ignores_wording() -> None:
    reworded = "She sold half: 48 / 2 = <<48 / 2=24>>24.\nIn total <<48.0+24=72>>72.\n#### 72"
    assert operation_signature(SOLUTION) == ("48/2", "48+24")
    assert operation_signature(reworded) == operation_signature(SOLUTION)  # spaces and "48.0" normalised


def test_operation_signature_distinguishes_operations() -> None:
    different = "Natalia sold 48/2 = <<48/2=24>>24 clips.\nSo 24*3 = <<24*3=72>>72.\n#### 72"
    swapped = "Natalia sold 48/2 = <<48/2=24>>24 clips.\nSo 24+48 = <<24+48=72>>72.\n#### 72"
    assert operation_signature(different) != operation_signature(SOLUTION)
    assert operation_signature(swapped) != operation_signature(SOLUTION)  # no algebra: 24+48 is not 48+24


def test_operation_signature_without_annotations() -> None:
    # Fallback: written-out calculations, with words, units and currency dropped.
    text = (
        "Of the 71 graders, 37 are girls, so 71 students - 37 girls = 34 boys.\n"
        "He works 6 days/week * 5 weeks/month = 30 days.\n"
        "He pays 10 x $6.0 = $60, and 35 \u00d7 3 = 105.\n"
        "So 48=48.\n"  # no operator: not a calculation
        "-(5) = -5.\n"  # a negated number: not a calculation either
        "#### 105"
    )
    assert operation_signature(text) == ("71-37", "6*5", "10*6", "35*3")
    assert operation_signature("The answer is 7.\n#### 7") == ()  # no arithmetic found at all


# ------------------------------------------------------------------------------------------- robustness


@settings(max_examples=300, deadline=2000)  # ms per example: "completes quickly"
@given(st.text(max_size=2000))
def test_never_raises_on_arbitrary_text(text: str) -> None:
    for completion in (text, "#### " + text, text + "\n#### " + text):
        answer = extract_answer(completion)
        assert answer is None or isinstance(answer, str)
        canonical_answer(answer)
        is_correct(completion, text)
    parse_number(text)
    operation_signature(text)
    intermediate_results(text)
    for expr, result in parse_annotations(text):
        check_annotation(expr, result)
    try:
        safe_eval(text)
    except CalculatorError:
        pass


_CALC_ALPHABET = st.sampled_from(list("0123456789+-*/(). ,") + ["**"])


@settings(max_examples=500, deadline=2000)
@given(st.lists(_CALC_ALPHABET, max_size=250).map("".join))
def test_safe_eval_only_raises_calculator_error(expr: str) -> None:
    try:
        value = safe_eval(expr)
    except CalculatorError:
        return
    assert isinstance(value, Fraction)


@pytest.mark.parametrize(
    "completion",
    [
        "#### " + "1" * 1_000_000,  # one huge number on the answer line
        "1," * 500_000,  # a million characters of separators, no "####"
        "(" * 1_000_000,  # nothing but parentheses
        "<<" * 200_000 + "=" * 200_000,  # unclosed annotations
        "1 " * 500_000,  # half a million numbers: fallback scans only the tail
        ("2+2=4 " * 20_000 + "\n") * 5,  # many written-out calculations
    ],
)
def test_pathological_input_is_fast(completion: str) -> None:
    start = time.perf_counter()
    canonical_answer(extract_answer(completion))
    is_correct(completion, "4")
    intermediate_results(completion)
    operation_signature(completion)
    assert time.perf_counter() - start < 2.0
