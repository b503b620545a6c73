"""A built-in multi-turn task: guess a secret number, told "higher" or "lower" after each guess.

The row's ``answer`` is the secret (data/guess_number.py makes such rows); the row's prompt
is the first message. Each model turn is read for its last integer; a turn without one is
answered with a reminder and still costs a turn. The episode is done when the guess is
right. With ``max_turns`` at least log2(high - low + 1) + 1 a binary search always wins, so
the task rewards a strategy, learnable from the reward alone: ``solved`` (1 when found) plus,
weighted by ``speed_weight``, ``speed`` (1 / guesses when found). Everything the rubric reads
is in the trajectory's ``info``, so stored episodes re-score without the environment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rewards.environments.base import (
    Environment,
    Episode,
    Message,
    Rubric,
    RubricItem,
    StepResult,
    Trajectory,
    row_messages,
)
from rewards.environments.registry import register_environment

_INTEGER = re.compile(r"-?\d+")
HIGHER, LOWER, NO_NUMBER = "higher", "lower", "Reply with one number."


def last_integer(text: str) -> int | None:
    found = _INTEGER.findall(text)
    return int(found[-1]) if found else None


class GuessEpisode(Episode):
    def __init__(self, row: Mapping[str, Any]):
        try:
            self.secret = int(str(row["answer"]).strip())
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"prompt {row.get('prompt_id')}: 'answer' must be the secret integer") from None
        self.messages = row_messages(row)
        self.plain_prompt = row.get("prompt") if not row.get("messages") else None
        self.guesses = 0

    def initial_messages(self) -> list[Message]:
        return list(self.messages)

    def step(self, turn: str) -> StepResult:
        guess = last_integer(turn)
        self.guesses += 1
        solved = guess == self.secret
        info = {"solved": solved, "guesses": self.guesses, "secret": self.secret}
        if solved:
            return StepResult((), done=True, info=info)
        reply = NO_NUMBER if guess is None else HIGHER if guess < self.secret else LOWER
        return StepResult([{"role": "user", "content": reply}], done=False, info=info)


def solved(trajectory: Trajectory, row: Mapping[str, Any]) -> float:
    return 1.0 if trajectory.info.get("solved") else 0.0


def speed(trajectory: Trajectory, row: Mapping[str, Any]) -> float:
    return 1.0 / trajectory.info["guesses"] if trajectory.info.get("solved") else 0.0


class GuessNumberEnvironment(Environment):
    name = "guess_number"

    def __init__(self, speed_weight: float = 0.0):
        items = [RubricItem("solved", solved, 1.0)]
        if speed_weight:
            items.append(RubricItem("speed", speed, speed_weight))
        self._rubric = Rubric(tuple(items))

    @property
    def rubric(self) -> Rubric:
        return self._rubric

    def start(self, row: Mapping[str, Any]) -> Episode:
        return GuessEpisode(row)


@register_environment("guess_number")
def guess_number(*, speed_weight: float = 0.0) -> Environment:
    """Guess the row's secret number with higher/lower feedback; `speed_weight` adds 1/guesses."""
    return GuessNumberEnvironment(speed_weight)
