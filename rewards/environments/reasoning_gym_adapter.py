"""reasoning-gym tasks as environments: ``reasoning_gym:<task>`` (``reasoning_gym:gcd``).

reasoning-gym (PyPI ``reasoning-gym``, an optional extra: ``make install-reasoning-gym``)
generates problems procedurally from a task name, a size and a seed, and scores an answer
with the task's own ``score_answer(answer, entry)``. The environment's ``dataset_rows()``
are prompts rows (question, gold answer, and in ``extra_info`` the task, size, seed, config
and index that regenerate the entry); scoring regenerates the entry from those, checks
that its question is the row's (another reasoning-gym version could generate another
problem: that is an error, not a silent mis-score), extracts the answer from the model's
turn and calls ``score_answer``. Nothing live is needed, so stored episodes re-score.

Answer extraction (``answer``): ``answer_tag`` (the default, reasoning-gym's own convention:
the last ``<answer>...</answer>``, with its default system prompt that asks for it; no tag
scores as no answer), ``last_number`` (the last number in the turn: what small models manage,
ENVIRONMENT.md), or ``raw`` (the whole turn, stripped).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Literal

from data.errors import UserError
from rewards.environments.base import (
    Environment,
    Episode,
    Message,
    Rubric,
    RubricItem,
    StepResult,
    Trajectory,
)
from rewards.environments.registry import EnvironmentOptionsError, register_environment

INSTALL_HINT = "make install-reasoning-gym (pip install 'grpoflow[reasoning-gym]')"
EXTRA_INFO_KEY = "reasoning_gym"
AnswerFormat = Literal["answer_tag", "last_number", "raw"]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class MissingPackageError(UserError, ImportError):
    """An optional package an environment needs is not installed (one line: how to install it)."""


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError:
        raise MissingPackageError(
            f"environment 'reasoning_gym' needs the 'reasoning-gym' package: {INSTALL_HINT}"
        ) from None
    return reasoning_gym


def extract_answer(text: str, answer: AnswerFormat) -> str | None:
    if answer == "answer_tag":
        found = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
        return found[-1].strip() if found else None
    if answer == "last_number":
        found = _NUMBER.findall(text)
        return found[-1] if found else None
    return text.strip()


class ScoreAnswer:
    """The rubric function: the task's own ``score_answer`` on the regenerated entry. Picklable
    (scoring workers get a copy); each copy keeps the datasets it regenerated."""

    def __init__(self, task: str, config: Mapping[str, Any], answer: AnswerFormat):
        self.task, self.config, self.answer = task, dict(config), answer
        self._datasets: dict[tuple[int, int], Any] = {}

    def __getstate__(self) -> dict:
        return {"task": self.task, "config": self.config, "answer": self.answer, "_datasets": {}}

    def dataset(self, size: int, seed: int):
        key = (size, seed)
        if key not in self._datasets:
            self._datasets[key] = _create(self.task, size, seed, self.config)
        return self._datasets[key]

    def entry(self, row: Mapping[str, Any]) -> tuple[Any, Mapping[str, Any]]:
        """(the dataset, the entry) that `row` was made from."""
        where = f"prompt {row.get('prompt_id')}"
        try:
            source = json.loads(row.get("extra_info") or "{}")[EXTRA_INFO_KEY]
            size, seed, index = int(source["size"]), int(source["seed"]), int(source["index"])
        except (KeyError, TypeError, ValueError, json.JSONDecodeError):
            raise ValueError(
                f"{where}: extra_info has no '{EXTRA_INFO_KEY}' source (task, size, seed, index); "
                "rows must come from this environment's dataset_rows()"
            ) from None
        if source.get("task") != self.task:
            raise ValueError(f"{where}: a row of reasoning-gym task '{source.get('task')}', scored as '{self.task}'")
        dataset = self.dataset(size, seed)
        entry = dataset[index]
        if row.get("prompt") is not None and entry["question"] != row["prompt"]:
            raise ValueError(
                f"{where}: reasoning-gym regenerated another question for index {index} (another version?)"
            )
        return entry

    def __call__(self, trajectory: Trajectory, row: Mapping[str, Any]) -> float:
        entry = self.entry(row)
        return float(self.dataset(1, 0).score_answer(extract_answer(trajectory.completion, self.answer), entry))


def _create(task: str, size: int, seed: int, config: Mapping[str, Any]):
    reasoning_gym = _reasoning_gym()
    try:
        return reasoning_gym.create_dataset(task, size=size, seed=seed, **config)
    except ValueError as err:
        if "not registered" in str(err):
            from reasoning_gym.factory import DATASETS

            raise EnvironmentOptionsError(
                f"unknown reasoning-gym task '{task}'; known: {', '.join(sorted(DATASETS))}"
            ) from None
        raise EnvironmentOptionsError(f"reasoning-gym task '{task}': {err}") from None
    except TypeError as err:  # a config key the task's config class does not have
        raise EnvironmentOptionsError(f"reasoning-gym task '{task}' config: {err}") from None


class _QuestionEpisode(Episode):
    def __init__(self, messages: list[Message], plain_prompt: str | None):
        self.messages, self.plain_prompt = messages, plain_prompt

    def initial_messages(self) -> list[Message]:
        return list(self.messages)

    def step(self, turn: str) -> StepResult:
        return StepResult((), done=True)


class ReasoningGymEnvironment(Environment):
    """One reasoning-gym task: the question, one answer, the task's score."""

    def __init__(
        self, task: str, size: int, seed: int, answer: AnswerFormat, system_prompt: bool, config: Mapping[str, Any]
    ):
        self.name = f"reasoning_gym:{task}"
        self.task, self.size, self.seed, self.config = task, size, seed, dict(config)
        self.score = ScoreAnswer(task, config, answer)
        self.score.dataset(size, seed)  # an unknown task or config fails now, in one line
        self.system_prompt = None
        if system_prompt and answer == "answer_tag":
            from reasoning_gym.utils import SYSTEM_PROMPTS

            self.system_prompt = SYSTEM_PROMPTS["default"]
        self._rubric = Rubric((RubricItem("score_answer", self.score, 1.0),))

    @property
    def rubric(self) -> Rubric:
        return self._rubric

    def dataset_rows(self, size: int | None = None, seed: int | None = None) -> list[dict[str, Any]]:
        """The task's problems as prompts rows (no prompt_id: ingest assigns it). Another `seed`
        gives another set of problems of the same task (a held-out set)."""
        size, seed = size or self.size, self.seed if seed is None else seed
        dataset = self.score.dataset(size, seed)
        rows = []
        for index in range(size):
            entry = dataset[index]
            source = {"task": self.task, "size": size, "seed": seed, "index": index, "config": self.config}
            rows.append(
                {
                    "prompt": entry["question"],
                    "answer": str(entry["answer"]),
                    "task": self.name,
                    "extra_info": json.dumps({EXTRA_INFO_KEY: source}, default=str),
                }
            )
        return rows

    def start(self, row: Mapping[str, Any]) -> Episode:
        if row.get("prompt") is None:
            raise ValueError(f"prompt {row.get('prompt_id')}: a reasoning-gym row needs its question in 'prompt'")
        messages = [{"role": "user", "content": row["prompt"]}]
        if self.system_prompt is not None:
            return _QuestionEpisode([{"role": "system", "content": self.system_prompt}, *messages], None)
        return _QuestionEpisode(messages, row["prompt"])


@register_environment("reasoning_gym", family=True)
def reasoning_gym_environment(
    task: str,
    *,
    size: int = 1000,
    seed: int = 0,
    answer: AnswerFormat = "answer_tag",
    system_prompt: bool = True,
    config: dict[str, Any] | None = None,
) -> Environment:
    """reasoning-gym task `task`: `size` problems from `seed`, extra task settings in `config`,
    the answer read as `answer` says, scored by the task's own score_answer."""
    if size < 1:
        raise EnvironmentOptionsError(f"reasoning_gym:{task}: size must be at least 1, got {size}")
    return ReasoningGymEnvironment(task, size, seed, answer, system_prompt, config or {})
