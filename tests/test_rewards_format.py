"""The format and overlong rewards."""

from __future__ import annotations

import pytest

from rewards import make_reward
from rewards.format_length import format_reward, overlong_reward


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>add them</think><answer>5</answer>", 1.0),
        ("  <think>\nstep 1\nstep 2\n</think>\n<answer>5</answer>\n", 1.0),
        ("<answer>5</answer>", 0.0),
        ("<think>x</think><answer>5</answer> and more", 0.0),
        ("<think>x</think><answer>5</answer><answer>6</answer>", 0.0),
        ("<think>x</think><answer>5<answer>6</answer></answer>", 0.0),
        ("<think>a<think>b</think></think><answer>5</answer>", 0.0),
        ("<think>x</think>", 0.0),
    ],
)
def test_default_format_is_think_then_answer(completion, expected):
    assert format_reward(completion, {}) == expected


def test_custom_pattern_and_search_mode():
    boxed = make_reward("format", {"pattern": r"\\boxed\{[^}]+\}", "match": "search"})
    assert boxed(r"so \boxed{4}.", {}) == 1.0
    assert boxed("so 4.", {}) == 0.0
    assert make_reward("format", {"pattern": "a.b", "dotall": False})("a\nb", {}) == 0.0


def test_overlong_is_dapos_soft_punishment():
    options = {"max_length": 100, "cache_length": 20}
    reward = make_reward("overlong", options)
    scores = [reward("", {"completion_tokens": n}) for n in (0, 80, 90, 100, 101, 500)]
    assert scores == [0.0, 0.0, -0.5, -1.0, -1.0, -1.0]
    assert overlong_reward("x" * 90, {}, unit="chars", **options) == -0.5
    with pytest.raises(ValueError, match="completion_tokens"):
        overlong_reward("x", {})
