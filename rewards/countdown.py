"""Countdown's verifier: 1.0 when the completion is an arithmetic expression over the
problem's numbers (each used at most once; + - * / and parentheses) whose exact value is the
target; 0.0 for any other text. Many different expressions score 1: nothing is compared
with a reference solution, only evaluated.

Arithmetic is exact (fractions), so "7/2*4" is 14 and "1/3*3" is 1. The expression is
parsed with Python's `ast` and only numbers, the four operators and parentheses are
accepted: nothing is ever executed.
"""

from __future__ import annotations

import ast
import json
from collections import Counter
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from rewards.registry import register

_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}
_MAX_CHARS = 64  # longer text is not a countdown answer (and keeps parsing cheap)


class NotAnExpression(ValueError):
    pass


def evaluate(text: str) -> tuple[Fraction, list[int]]:
    """The exact value of `text` and the numbers it uses, or NotAnExpression."""
    if len(text) > _MAX_CHARS or not text.strip():
        raise NotAnExpression("empty or too long")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise NotAnExpression(f"not an expression: {err.msg}") from None
    used: list[int] = []

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise NotAnExpression("division by zero")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        raise NotAnExpression(f"{type(node).__name__} is not allowed")

    return value(tree.body), used


def _problem(example: Mapping[str, Any]) -> tuple[list[int], int]:
    # Rows from our PROMPTS artifact carry numbers/target in extra_info (JSON); rows handed
    # over directly (TRL style) carry them as columns.
    extra = example.get("extra_info")
    fields = dict(json.loads(extra)) if isinstance(extra, str) and extra else dict(extra or {})
    fields.update({k: example[k] for k in ("numbers", "target") if example.get(k) is not None})
    if "numbers" not in fields:
        raise ValueError("countdown needs the row's 'numbers' (a column or in extra_info)")
    target = fields.get("target", example.get("answer"))
    if target is None:
        raise ValueError("countdown needs the row's 'target' (or 'answer')")
    return [int(n) for n in fields["numbers"]], int(target)


@register("countdown")
def countdown(completion: str, example: Mapping[str, Any]) -> float:
    numbers, target = _problem(example)
    try:
        result, used = evaluate(completion)
    except NotAnExpression:
        return 0.0
    if Counter(used) - Counter(numbers):  # a number not given, or used more often than given
        return 0.0
    return float(result == target)
