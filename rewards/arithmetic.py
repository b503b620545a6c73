"""The built-in task's reward: the completion must be exactly the gold integer.

Strict on purpose: "85" scores, "85 85" or "the answer is 85" do not, so the policy is
also rewarded for stopping (emitting EOS) right after the answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rewards.registry import register

_INTEGER = re.compile(r"\s*([-+]?\d+)\s*")


@register("exact_answer")
def exact_answer(completion: str, example: Mapping[str, Any]) -> float:
    gold = example.get("answer")
    if gold is None:
        raise ValueError("exact_answer needs the row's 'answer' field")
    match = _INTEGER.fullmatch(completion)
    return float(match is not None and int(match.group(1)) == int(str(gold).strip()))
