"""The environment protocol: what the model sees, how the world answers, what is rewarded.

An *environment* makes one *episode* per dataset row. The episode gives the initial
messages; the rollout loop (tasks/rollout.py) samples a model turn, hands its text to
``Episode.step``, which answers with the environment's turns (a tool result, a user or game
reply) and whether the episode is over; the loop appends those with the chat template and
samples again, until the episode is done or a limit (``EpisodeLimits``) ends it. The finished
conversation, a ``Trajectory``, is then scored by the environment's ``Rubric``: weighted
reward functions ``(trajectory, row) -> float``, as the reward registry's functions are
``(completion, row) -> float``.

Today's prompt + reward registry is the trivial case, ``SingleTurnEnvironment``: the row's
prompt as the only initial message, done after the first model turn, and a rubric made of
the registered rewards, each called on the one completion exactly as the score stage calls
it.

Everything a rubric may look at is in the trajectory and storable (messages, ``info``
from the steps as JSON-able values, why the episode ended), so a stored trajectory can be
re-scored without a model or the environment. A reward that needs the environment's live
state says so (``RubricItem.needs_live_state``); rescoring then refuses it in one line
instead of guessing.

Episodes of one environment are stepped concurrently, each from its own thread (the
rollout loop times every step out from outside it), so an environment's shared state
must be safe to read from several threads; an episode's own state is touched by one
thread at a time.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]  # {"role": ..., "content": ...}, plus "name" on tool results

# Why an episode ended: the environment said so, a limit was hit, or it failed.
END_DONE = "done"  # Episode.step returned done
END_MAX_TURNS = "max_turns"  # the model had its max_turns turns and the environment was not done
END_MAX_TOKENS = "max_tokens"  # prompt + turns reached max_total_tokens
END_LENGTH = "length"  # a model turn hit max_new_tokens without ending (never stepped)
END_ERROR = "error"  # Episode.step (or the environment's start) raised: reward 0, the error text kept
END_TIMEOUT = "timeout"  # Episode.step ran past step_timeout_s: reward 0
END_REASONS = (END_DONE, END_MAX_TURNS, END_MAX_TOKENS, END_LENGTH, END_ERROR, END_TIMEOUT)
FAILED_ENDS = (END_ERROR, END_TIMEOUT)


@dataclass(frozen=True)
class EpisodeLimits:
    """Limits of one episode; the rollout loop enforces them, never the environment."""

    max_turns: int = 8  # model turns
    max_total_tokens: int = 2048  # prompt + every model and environment turn, in tokens
    step_timeout_s: float = 30.0  # one Episode.step call, measured from outside it
    max_env_chars: int = 4096  # characters kept of each environment message; the cut is counted

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_total_tokens", "max_env_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"EpisodeLimits.{name} must be at least 1, got {getattr(self, name)}")
        if not self.step_timeout_s > 0:
            raise ValueError(f"EpisodeLimits.step_timeout_s must be positive, got {self.step_timeout_s}")


@dataclass(frozen=True)
class ToolCallRecord:
    """One tool call as the model made it and what came back: stored with the trajectory."""

    turn: int  # the model turn (0-based) that made the call
    name: str  # "" when the call could not be parsed
    arguments: str  # as JSON text, or the raw text of a call that did not parse
    result: str  # what the model was shown
    error: str | None = None  # why the call failed (parse error, unknown tool, exception, timeout)
    duration_s: float = 0.0
    chars_cut: int = 0  # characters of the result cut by the tool's max_result_chars


@dataclass(frozen=True)
class StepResult:
    """The environment's answer to one model turn."""

    messages: Sequence[Message]  # the environment's turns, appended after the model's
    done: bool
    info: Mapping[str, Any] = field(default_factory=dict)  # JSON-able facts for the rubric; merged over the steps
    tool_calls: Sequence[ToolCallRecord] = ()


class Episode(ABC):
    """One conversation's state, made by ``Environment.start(row)``."""

    # The row's plain-text prompt, used as the model's whole input when the chat template is
    # off or the tokenizer has none (single-turn only: further turns need a template).
    plain_prompt: str | None = None

    @abstractmethod
    def initial_messages(self) -> list[Message]:
        """The conversation before the model's first turn."""

    @abstractmethod
    def step(self, turn: str) -> StepResult:
        """Answer the model's turn `turn` (its text, special tokens removed)."""


@dataclass(frozen=True)
class Trajectory:
    """A finished episode as its rubric sees it; everything in it can be stored and re-read."""

    messages: tuple[Message, ...]  # the whole conversation, initial messages first
    prompt_messages: int  # how many of `messages` were the initial ones
    end_reason: str  # one of END_REASONS
    info: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None  # the step's error text (END_ERROR, END_TIMEOUT)
    completion_tokens: int = 0  # tokens the policy produced, over all its turns
    finish_reason: str = "eos"  # how the last model turn ended: "eos", "stop" or "length"
    tool_calls: tuple[ToolCallRecord, ...] = ()

    @property
    def model_turns(self) -> list[str]:
        return [m["content"] for m in self.messages[self.prompt_messages :] if m["role"] == "assistant"]

    @property
    def completion(self) -> str:
        """The model's last turn ("" when it had none)."""
        turns = self.model_turns
        return turns[-1] if turns else ""


def trajectory_from_row(row: Mapping[str, Any]) -> Trajectory:
    """The trajectory stored in a generations row (schema version 4's trajectory columns), for
    re-scoring without a model or an environment. A row without them (single-turn, or an older
    file) is its prompt's conversation and the completion as the one model turn."""
    if row.get("messages") is None:
        return Trajectory(
            messages=(
                {"role": "user", "content": row.get("prompt_text", "")},
                {"role": "assistant", "content": row["completion"]},
            ),
            prompt_messages=1,
            end_reason=END_LENGTH if row.get("finish_reason") == "length" else END_DONE,
            completion_tokens=len(row.get("completion_token_ids") or ()),
            finish_reason=row.get("finish_reason") or "eos",
        )
    mask = row.get("loss_mask")
    return Trajectory(
        messages=tuple({k: v for k, v in m.items() if v is not None} for m in row["messages"]),
        prompt_messages=int(row["prompt_messages"]),
        end_reason=row["end_reason"],
        info=json.loads(row.get("env_info") or "{}"),
        error=row.get("env_error"),
        completion_tokens=sum(mask) if mask is not None else len(row.get("completion_token_ids") or ()),
        finish_reason=row.get("finish_reason") or "eos",
        tool_calls=tuple(ToolCallRecord(**call) for call in row.get("tool_calls") or ()),
    )


RubricFn = Callable[[Trajectory, Mapping[str, Any]], float]


@dataclass(frozen=True)
class RubricItem:
    name: str
    fn: RubricFn
    weight: float = 1.0
    # True when the function reads state that lives only in the running environment (and so
    # cannot re-score a stored trajectory).
    needs_live_state: bool = False


@dataclass(frozen=True)
class RubricScore:
    total: float  # weighted sum; NaN when a function could not score the episode
    values: dict[str, float]  # name -> value
    errors: dict[str, str]  # name -> why it is NaN (or why the episode scored 0)


@dataclass(frozen=True)
class Rubric:
    """Weighted reward functions over a trajectory."""

    items: tuple[RubricItem, ...]

    def __post_init__(self) -> None:
        names = [item.name for item in self.items]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"rubric has duplicate reward names: {', '.join(duplicates)}")

    def score(self, trajectory: Trajectory, row: Mapping[str, Any]) -> RubricScore:
        """Every function on `trajectory`; an episode the environment failed scores 0 in each
        (its error text beside), a function that raises gives NaN and its error text, as in
        the score stage: a broken reward never becomes a silent 0."""
        if trajectory.end_reason in FAILED_ENDS:
            why = f"episode ended by {trajectory.end_reason}: {trajectory.error}"
            return RubricScore(0.0, {i.name: 0.0 for i in self.items}, {i.name: why for i in self.items})
        values, errors = {}, {}
        for item in self.items:
            try:
                values[item.name] = float(item.fn(trajectory, row))
            except Exception as err:  # any reward failure is recorded beside NaN, never raised
                values[item.name], errors[item.name] = math.nan, f"{type(err).__name__}: {err}"
        total = sum(item.weight * values[item.name] for item in self.items)
        return RubricScore(total, values, errors)


class Environment(ABC):
    """Makes episodes from dataset rows and holds the rubric that scores them."""

    name: str = ""

    @property
    @abstractmethod
    def rubric(self) -> Rubric: ...

    @abstractmethod
    def start(self, row: Mapping[str, Any]) -> Episode:
        """A new episode for dataset row `row` (a prompts.parquet row as a dict)."""

    def tool_schemas(self) -> list[dict[str, Any]]:
        """JSON schemas of the tools the model may call, for the chat template's ``tools=``."""
        return []


def cap_text(text: str, max_chars: int) -> tuple[str, int]:
    """Untrusted text (a tool result, an environment reply) cut to `max_chars`: (kept text,
    how many characters were cut). Never evaluated, only shown to the model and stored."""
    if len(text) <= max_chars:
        return text, 0
    return text[:max_chars], len(text) - max_chars


def row_messages(row: Mapping[str, Any]) -> list[Message]:
    """A prompts row's conversation: its chat messages, or its plain prompt as one user turn."""
    if row.get("messages"):
        return [dict(m) for m in row["messages"]]
    if row.get("prompt") is None:
        raise ValueError(f"prompt {row.get('prompt_id')}: row has neither 'messages' nor 'prompt'")
    return [{"role": "user", "content": row["prompt"]}]


class _SingleTurnEpisode(Episode):
    def __init__(self, row: Mapping[str, Any]):
        self.messages = row_messages(row)
        self.plain_prompt = None if row.get("messages") else row.get("prompt")

    def initial_messages(self) -> list[Message]:
        return list(self.messages)

    def step(self, turn: str) -> StepResult:
        return StepResult(messages=(), done=True)


@dataclass(frozen=True)
class CompletionReward:
    """A registry reward ``(completion, row) -> float`` as a rubric function: called on the
    model's last turn with the fields the score stage adds (``completion_tokens``,
    ``finish_reason``), so it scores exactly what it scores today."""

    reward: Callable[[str, Mapping[str, Any]], float]

    def __call__(self, trajectory: Trajectory, row: Mapping[str, Any]) -> float:
        example = {**row, "completion_tokens": trajectory.completion_tokens, "finish_reason": trajectory.finish_reason}
        return self.reward(trajectory.completion, example)


class SingleTurnEnvironment(Environment):
    """Today's task: the row's prompt, one completion, the registered rewards."""

    name = "single_turn"

    def __init__(self, rewards: Mapping[str, float], reward_options: Mapping[str, Mapping[str, Any]] | None = None):
        from rewards.registry import make_reward  # the registry loads every built-in reward module

        options = reward_options or {}
        self._rubric = Rubric(
            tuple(
                RubricItem(name, CompletionReward(make_reward(name, options.get(name))), float(weight))
                for name, weight in rewards.items()
            )
        )

    @property
    def rubric(self) -> Rubric:
        return self._rubric

    def start(self, row: Mapping[str, Any]) -> Episode:
        return _SingleTurnEpisode(row)
