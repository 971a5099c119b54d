"""A small, safe calculator for GSM8K calculator annotations (``<<48/2=24>>``) and SVAMP equations.

Model completions are untrusted text, so this never calls ``eval``: a tokenizer and a recursive-descent parser
accept only numbers, ``+ - * /``, ``**``, unary signs and parentheses, and every resource is bounded (expression
length, nesting depth, exponent size, magnitude of intermediate values). Anything else raises
:class:`CalculatorError`. Arithmetic is exact (:class:`fractions.Fraction`), so ``0.1+0.2`` equals ``0.3``.

Grammar (usual precedence; ``**`` binds tighter than unary minus and is right-associative, as in Python)::

    expr  := term (("+" | "-") term)*
    term  := unary (("*" | "/") unary)*
    unary := ("+" | "-") unary | power
    power := atom ("**" unary)?
    atom  := NUMBER | "(" expr ")"
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

MAX_EXPR_CHARS = 200  # GSM8K's longest annotation is well under 100 characters
MAX_DEPTH = 24  # nested parentheses / unary signs; keeps the recursion far from Python's limit
MAX_EXPONENT = 64  # |b| in a**b
MAX_DIGITS = 60  # numerator and denominator of every intermediate value stay below 10**MAX_DIGITS

_LIMIT = 10**MAX_DIGITS
# Numbers: integers with optional thousands separators ("1,000"), decimals ("2.5", "5.", ".5").
_TOKEN = re.compile(
    r"\s*(?:(?P<num>[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])(?:\.[0-9]*)?|[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"|(?P<op>\*\*|[-+*/()]))"
)


class CalculatorError(ValueError):
    """An expression the calculator refuses: bad syntax, a forbidden token, a resource limit, division by zero."""


@dataclass(frozen=True)
class Num:
    value: Fraction


@dataclass(frozen=True)
class Unary:
    op: str  # "+" or "-"
    operand: Node


@dataclass(frozen=True)
class BinOp:
    op: str  # "+", "-", "*", "/" or "**"
    left: Node
    right: Node


Node = Num | Unary | BinOp


def number_value(token: str) -> Fraction:
    """Exact value of a number token: "1,000" -> 1000, "2.50" -> 5/2, "5." -> 5."""
    return Fraction(token.replace(",", "").rstrip(".") or "0")


def tokenize(expr: str) -> list[str]:
    """Split an expression into number and operator tokens; raises CalculatorError on anything else."""
    if len(expr) > MAX_EXPR_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPR_CHARS} characters")
    tokens: list[str] = []
    pos, end = 0, len(expr.rstrip())
    while pos < end:
        m = _TOKEN.match(expr, pos)
        if m is None:
            bad = expr[pos:].lstrip()[:1]
            raise CalculatorError(f"unexpected character {bad!r} in {expr!r}")
        tokens.append(m.group("num") or m.group("op"))
        pos = m.end()
    return tokens


def tokenize_tail(text: str) -> list[str]:
    """The tokens after the last character the calculator cannot read: "so, 3 + 4 " -> ["3", "+", "4"].

    Used to find a calculation at the end of free text; like :func:`tokenize`, bounded by ``MAX_EXPR_CHARS``.
    """
    text = text[-MAX_EXPR_CHARS:]
    tokens: list[str] = []
    pos, end = 0, len(text.rstrip())
    while pos < end:
        m = _TOKEN.match(text, pos)
        if m is None:
            tokens, pos = [], pos + 1
            while pos < end and text[pos].isspace():
                pos += 1
            continue
        tokens.append(m.group("num") or m.group("op"))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise CalculatorError("unexpected end of expression")
        self.pos += 1
        return tok

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CalculatorError(f"expression nested deeper than {MAX_DEPTH} levels")

    def expr(self) -> Node:
        node = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            node = BinOp(op, node, self.term())
        return node

    def term(self) -> Node:
        node = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take()
            node = BinOp(op, node, self.unary())
        return node

    def unary(self) -> Node:
        if self.peek() in ("+", "-"):
            op = self.take()
            self.nest()
            node: Node = Unary(op, self.unary())
            self.depth -= 1
            return node
        return self.power()

    def power(self) -> Node:
        base = self.atom()
        if self.peek() == "**":
            self.take()
            self.nest()
            node: Node = BinOp("**", base, self.unary())
            self.depth -= 1
            return node
        return base

    def atom(self) -> Node:
        tok = self.take()
        if tok == "(":
            self.nest()
            node = self.expr()
            if self.take() != ")":
                raise CalculatorError("expected ')'")
            self.depth -= 1
            return node
        if tok[0].isdigit() or tok[0] == ".":
            return Num(number_value(tok))
        raise CalculatorError(f"unexpected {tok!r}")


def parse_tokens(tokens: list[str]) -> Node:
    """Parse a token list (from :func:`tokenize`) into a tree; raises CalculatorError unless it is one expression."""
    parser = _Parser(tokens)
    if not tokens:
        raise CalculatorError("empty expression")
    node = parser.expr()
    if parser.peek() is not None:
        raise CalculatorError(f"unexpected {parser.peek()!r} after a complete expression")
    return node


def parse_expression(expr: str) -> Node:
    """Parse an arithmetic expression into a tree (used to split SVAMP equations into steps)."""
    return parse_tokens(tokenize(expr))


def _bounded(x: Fraction) -> Fraction:
    if abs(x.numerator) >= _LIMIT or x.denominator >= _LIMIT:
        raise CalculatorError(f"intermediate value exceeds 10**{MAX_DIGITS}")
    return x


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise CalculatorError("only integer exponents are supported")
    e = int(exponent)
    if abs(e) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {e} exceeds {MAX_EXPONENT}")
    if base == 0 and e < 0:
        raise CalculatorError("division by zero")
    # Estimate the size before computing, so 99999**64 is refused without building a huge integer.
    bits = max(abs(base.numerator).bit_length(), base.denominator.bit_length()) * abs(e)
    if bits > 4 * MAX_DIGITS:  # log2(10) < 4
        raise CalculatorError(f"intermediate value exceeds 10**{MAX_DIGITS}")
    return base**e


def evaluate(node: Node) -> Fraction:
    """Exact value of a parsed expression; raises CalculatorError on division by zero or overflow."""
    if isinstance(node, Num):
        return _bounded(node.value)
    if isinstance(node, Unary):
        value = evaluate(node.operand)
        return -value if node.op == "-" else value
    left, right = evaluate(node.left), evaluate(node.right)
    if node.op == "+":
        return _bounded(left + right)
    if node.op == "-":
        return _bounded(left - right)
    if node.op == "*":
        return _bounded(left * right)
    if node.op == "/":
        if right == 0:
            raise CalculatorError("division by zero")
        return _bounded(left / right)
    return _bounded(_power(left, right))


def safe_eval(expr: str) -> Fraction:
    """Evaluate an arithmetic expression exactly, e.g. ``safe_eval("1,000 * (3 - 0.5)") == 2500``.

    Accepts numbers, ``+ - * / **``, unary signs and parentheses only; raises :class:`CalculatorError` for
    anything else (names, calls, attributes), for expressions over ``MAX_EXPR_CHARS`` characters or nested over
    ``MAX_DEPTH`` levels, exponents over ``MAX_EXPONENT``, values over ``10**MAX_DIGITS``, and division by zero.
    """
    return evaluate(parse_expression(expr))
