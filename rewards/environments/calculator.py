"""A built-in tool task: arithmetic problems with a ``calculate`` tool.

The row is any prompt with a numeric ``answer`` (the built-in ``a+b=`` problems, GSM8K-style
rows); the model may call ``calculate`` in the Hermes format any number of turns, and its
last turn without a tool call is its answer, scored 1 when its last number equals the
answer. The tool evaluates arithmetic only, from the expression's syntax tree (never
``eval``), with bounded powers; like every tool it runs in a child process killed at its
deadline (rewards/environments/tools.py).
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from typing import Any

from rewards.environments.base import Rubric, RubricItem, Trajectory
from rewards.environments.guess_number import last_integer
from rewards.environments.registry import register_environment
from rewards.environments.tools import ToolEnvironment, make_tool

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_EXPONENT = 64
MAX_EXPRESSION_CHARS = 200


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponents above {MAX_EXPONENT} are not allowed")
        return _BINARY[type(node.op)](left, right)
    raise ValueError(f"only numbers, + - * / // % ** and parentheses are allowed, not {type(node).__name__}")


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. (12+3)*4
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    value = _evaluate(ast.parse(expression.strip(), mode="eval").body)
    return str(int(value)) if float(value).is_integer() else repr(value)


def correct(trajectory: Trajectory, row: Mapping[str, Any]) -> float:
    """1 when the model's last turn ends with the answer's number."""
    try:
        gold = int(str(row["answer"]).strip())
    except (KeyError, ValueError):
        raise ValueError(f"prompt {row.get('prompt_id')}: 'answer' must be an integer") from None
    return 1.0 if last_integer(trajectory.completion) == gold else 0.0


@register_environment("calculator")
def calculator(*, tool_timeout_s: float = 2.0, max_calls_per_turn: int = 4) -> ToolEnvironment:
    """Arithmetic with a `calculate` tool; 1 for a final answer equal to the row's."""
    return ToolEnvironment(
        [make_tool(calculate, timeout_s=tool_timeout_s)],
        Rubric((RubricItem("correct", correct, 1.0),)),
        max_calls_per_turn=max_calls_per_turn,
    )
