"""Final-answer extraction and checking, and the parts of a GSM8K-format solution the algorithms need.

A GSM8K solution is newline-separated steps, each may carry a calculator annotation ``<<48/2=24>>``, and the
last line is ``#### <answer>`` (Cobbe et al. 2021; Havrilla et al. 2024 grade samples the same way). Every
function here is pure and safe on arbitrary model output: no ``eval``, no regex that can backtrack
catastrophically, and answer extraction looks only at a fixed window (``MAX_ANSWER_CHARS`` after ``####``, the
last ``FALLBACK_TAIL_CHARS`` for the fallback), so grading a 1 MB completion costs no more than a short one.

Canonical answers (used for ``Problem.answer`` and to group samples for majority voting) are exact numbers
printed plainly: integers without separators or ".0" ("1,000.00" -> "1000"), terminating decimals without
trailing zeros ("0.50" -> "0.5", "3/4" -> "0.75"), other fractions as "p/q" ("2/6" -> "1/3"). Text answers
are lower-cased with whitespace collapsed and a trailing period dropped.
"""

from __future__ import annotations

import itertools
import re
from fractions import Fraction

from reasoning_rl.tasks.calculator import (
    MAX_EXPR_CHARS,
    BinOp,
    CalculatorError,
    number_value,
    parse_tokens,
    safe_eval,
    tokenize,
    tokenize_tail,
)

__all__ = [
    "CalculatorError",
    "answers_match",
    "canonical_answer",
    "check_annotation",
    "extract_answer",
    "format_number",
    "intermediate_results",
    "is_correct",
    "operation_signature",
    "parse_annotations",
    "parse_number",
    "safe_eval",
    "split_steps",
]

ANSWER_MARKER = "####"
MAX_ANSWER_CHARS = 300  # characters after "####" (and of any answer text) that are looked at
FALLBACK_TAIL_CHARS = 1000  # the no-"####" fallback searches only the end of the completion
MAX_NUMBER_DIGITS = 100  # longer numbers are not answers but noise; refuse them cheaply
MAX_INLINE_EQUALS = 256  # written-out calculations looked at per solution; more is degenerate output

_INT = r"[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+"  # "1,000,000" (well-formed groups only) or plain digits
# A number not glued to a preceding word ("mp3", "v1.5"): optional sign (incl. U+2212 minus), optional "$",
# then a mixed number "1 1/2", a fraction "3/4", a decimal "12.50" / ".5", or an integer "1,080".
_NUMBER = re.compile(
    rf"(?<![\w.])(?P<sign>[-+\u2212]?)\$?"
    rf"(?:(?P<whole>{_INT}) (?P<mnum>[0-9]+)/(?P<mden>[0-9]+)"
    rf"|(?P<num>{_INT})/(?P<den>[0-9]+)"
    rf"|(?P<int>{_INT})(?:\.(?P<frac>[0-9]+))?"
    rf"|\.(?P<frac2>[0-9]+))"
)
_ANNOTATION = re.compile(r"<<([^<>]*)=([^<>=]*)>>")  # the last "=" splits expression from result
_UNIT_RATE = re.compile(r"/[^\W\d_]+")  # the "/week" of "6 days/week" is a unit, not a division
_TIMES_X = re.compile(r"(?<=[0-9) ])x(?=[ 0-9(])")  # "10 x 6": a written multiplication sign
_NOT_CALC = re.compile(r"[^0-9.,+\-*/() ]")  # words, units, currency and percent signs around the numbers


# ------------------------------------------------------------------------------------------- numbers


def _number_value(m: re.Match[str]) -> Fraction | None:
    if sum(ch.isdigit() for ch in m.group(0)) > MAX_NUMBER_DIGITS:
        return None
    g = m.groupdict()
    if g["mden"] is not None:
        if int(g["mden"]) == 0:
            return None
        value = number_value(g["whole"]) + Fraction(int(g["mnum"]), int(g["mden"]))
    elif g["den"] is not None:
        if int(g["den"]) == 0:
            return None
        value = number_value(g["num"]) / int(g["den"])
    elif g["int"] is not None:
        value = number_value(g["int"] + ("." + g["frac"] if g["frac"] else ""))
    else:
        value = number_value("." + g["frac2"])
    return -value if g["sign"] in ("-", "\u2212") else value


def parse_number(text: str) -> Fraction | None:
    """The exact value of the first number in ``text`` (within its first ``MAX_ANSWER_CHARS`` characters).

    Tolerates what models write around an answer: "$1,080" -> 1080, "12.50 per hour" -> 25/2, "18." -> 18,
    "25%" -> 25 (the "%" is ignored: GSM8K writes percentages as plain numbers), "-3" / "\u22123" -> -3, "+5" -> 5,
    "3/4" -> 3/4, "1 1/2" -> 3/2. Returns None when there is no number, a number has more than
    ``MAX_NUMBER_DIGITS`` digits, or a fraction divides by zero. Words before the number are skipped
    ("x = 5" -> 5), so "2 + 3 = 5" reads as 2: an answer line holds the answer, not a calculation.
    """
    m = _NUMBER.search(text[:MAX_ANSWER_CHARS])
    return None if m is None else _number_value(m)


def format_number(x: Fraction) -> str:
    """Canonical text of a number: "1000", "-3", "0.75", "2.5"; "p/q" when the decimal would not terminate."""
    if x.denominator == 1:
        return str(x.numerator)
    den, twos, fives = x.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return f"{x.numerator}/{x.denominator}"
    places = max(twos, fives)  # 10**places is the smallest power of ten the denominator divides
    digits = str(abs(x.numerator) * 10**places // x.denominator).rjust(places + 1, "0")
    return ("-" if x < 0 else "") + digits[:-places] + "." + digits[-places:]


def _normalise_text(text: str) -> str:
    return " ".join(text[:MAX_ANSWER_CHARS].lower().split()).rstrip(".").strip()


def canonical_answer(text: str | None) -> str:
    """The normalised answer used for ``Problem.answer`` and majority voting (see the module docstring).

    None (no answer extracted) maps to "" so that a vote can leave such samples out.
    """
    if text is None:
        return ""
    value = parse_number(text)
    return format_number(value) if value is not None else _normalise_text(text)


# ------------------------------------------------------------------------------------------- answers


def extract_answer(completion: str, fallback: bool = True) -> str | None:
    """The final-answer text of a completion, or None.

    With a "####": the rest of the line after the FIRST "####", stripped (None if that is empty). Taking the
    first one means a model that carries on after answering (a second "####", another question) is graded on
    the answer it gave. Without a "####" and ``fallback=True``: the last number in the completion, the
    convention of lm-evaluation-harness's "flexible-extract" for GSM8K, so an un-tuned model that ends with
    "The answer is 42." is still graded; pass ``fallback=False`` for GSM8K's strict format.
    """
    idx = completion.find(ANSWER_MARKER)
    if idx >= 0:
        start = idx + len(ANSWER_MARKER)
        line = completion[start : start + MAX_ANSWER_CHARS].split("\n", 1)[0].strip()
        return line or None
    if not fallback:
        return None
    tail = completion[-FALLBACK_TAIL_CHARS:]
    if len(completion) > FALLBACK_TAIL_CHARS:
        # The window may start inside a number; skip that fragment rather than misread "12345" as "345".
        tail = tail.lstrip("0123456789.,")
    matches = list(_NUMBER.finditer(tail))
    return matches[-1].group(0) if matches else None


def answers_match(predicted: str | None, reference: str) -> bool:
    """Whether a predicted answer equals the reference: exactly as numbers when the reference is a number
    ("18.00" == "$18"), else as normalised text ("Yes." == "yes"). None never matches."""
    if predicted is None:
        return False
    ref_value = parse_number(reference)
    if ref_value is not None:
        return parse_number(predicted) == ref_value
    ref_text = _normalise_text(reference)
    return ref_text != "" and _normalise_text(predicted) == ref_text


def is_correct(completion: str, reference_answer: str) -> bool:
    """Whether a completion's final answer (see :func:`extract_answer`) equals the reference answer."""
    return answers_match(extract_answer(completion), reference_answer)


# ----------------------------------------------------------------------------------------- solutions


def _body(solution: str) -> str:
    """The part of a solution before its first "####": the steps."""
    return solution.split(ANSWER_MARKER, 1)[0]


def split_steps(solution: str) -> list[str]:
    """The non-empty lines before the first "####", whitespace-stripped: the solution's reasoning steps."""
    return [line.strip() for line in _body(solution).splitlines() if line.strip()]


def step_prefixes(solution: str) -> list[str]:
    """The solution cut after each of its steps (non-blank lines, the "####" line included), text kept exactly.

    "a\n\nb\n#### 3" -> ["a\n", "a\n\nb\n", "a\n\nb\n#### 3"]: the last prefix is the whole solution, and
    blank lines belong to the step that follows them. Used to score (ORM) and label (RCRL) partial solutions.
    """
    prefixes, end = [], 0
    for line in solution.splitlines(keepends=True):
        end += len(line)
        if line.strip():
            prefixes.append(solution[:end])
    return prefixes


def parse_annotations(text: str) -> list[tuple[str, str]]:
    """Every calculator annotation ``<<expr=result>>`` in ``text`` as ``(expr, result)``, in order, stripped."""
    return [(m.group(1).strip(), m.group(2).strip()) for m in _ANNOTATION.finditer(text)]


def check_annotation(expr: str, result: str) -> bool:
    """Whether an annotation's result is its expression's value.

    Exact, except that a result written with d decimals may be the value rounded to d decimals
    ("10/3=3.33" passes, "10/3=3" does not): GSM8K's annotators round money and averages that way.
    """
    try:
        value = safe_eval(expr)
    except CalculatorError:
        return False
    m = _NUMBER.search(result[:MAX_ANSWER_CHARS])
    claimed = None if m is None else _number_value(m)
    if m is None or claimed is None:
        return False
    if claimed == value:
        return True
    decimals = len(m.group("frac") or m.group("frac2") or "")
    return decimals > 0 and abs(value - claimed) <= Fraction(1, 2 * 10**decimals)


def intermediate_results(solution: str) -> list[Fraction]:
    """The values of the calculator results before "####", in order (unparseable results are skipped).

    These are the intermediate results the dense reward looks for (Havrilla et al. 2024, section 3).
    """
    values = (parse_number(result) for _, result in parse_annotations(_body(solution)))
    return [v for v in values if v is not None]


def _canonical_tokens(tokens: list[str]) -> str:
    return "".join(format_number(number_value(t)) if t[0].isdigit() or t[0] == "." else t for t in tokens)


def _canonical_expression(expr: str) -> str:
    """An annotation's expression without whitespace and with numbers in canonical form ("3.0 * 1,000" ->
    "3*1000"); an expression the calculator cannot read is kept verbatim, whitespace removed."""
    try:
        return _canonical_tokens(tokenize(expr))
    except CalculatorError:
        return "".join(expr.split())


def _inline_expressions(body: str) -> list[str]:
    """Left-hand sides of written-out calculations, canonical: "so 71 students - 37 girls = 34 boys" -> "71-37",
    "6 days/week * 5 weeks/month = 30" -> "6*5", "35 × 3 = 105" -> "35*3".

    For each "=", take the text since the previous "=" on its line, drop units ("/week"), words and currency
    signs (an "x" between numbers is a multiplication), and keep the longest run of tokens at its end that
    parses as a calculation with at least one operator.
    """
    found: list[str] = []
    lefts = (left for line in body.splitlines() for left in line.split("=")[:-1])
    for left in itertools.islice(lefts, MAX_INLINE_EQUALS):  # bounds the work on degenerate output
        text = left[-2 * MAX_EXPR_CHARS :].replace("\u00d7", "*").replace("\u00f7", "/").replace("\u2212", "-")
        text = _NOT_CALC.sub(" ", _TIMES_X.sub("*", _UNIT_RATE.sub(" ", text)))
        tokens = tokenize_tail(text)
        for i in range(len(tokens) - 2):  # a calculation has at least three tokens, "a op b"
            try:
                node = parse_tokens(tokens[i:])
            except CalculatorError:
                continue
            if isinstance(node, BinOp):
                found.append(_canonical_tokens(tokens[i:]))
                break
    return found


def operation_signature(solution: str) -> tuple[str, ...]:
    """The sequence of arithmetic operations a solution performs, to drop duplicate Expert Iteration samples.

    Havrilla et al. (2024, section 3) treat two solutions as the same when their sequences of arithmetic
    operations are the same. We take the calculator annotations' expressions before "####", canonicalised
    (:func:`_canonical_expression`), so wording does not matter but "3+5" and "5+3" differ (no algebra).
    The results and the final answer are left out: they follow from the operations. A solution without
    annotations falls back to its written-out calculations ("16 - 3 - 4 = 9" -> "16-3-4").
    """
    body = _body(solution)
    annotations = parse_annotations(body)
    if annotations:
        return tuple(_canonical_expression(expr) for expr, _ in annotations)
    return tuple(_inline_expressions(body))
