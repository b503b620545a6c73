"""Environments: the registry, rubrics, the single-turn environment as today's rewards, and
tools (schemas from docstrings, Hermes tool-call parsing, every way a call can fail)."""

from __future__ import annotations

import math
import os
import time

import pytest

from rewards import make_reward
from rewards.environments import (
    EnvironmentOptionsError,
    Rubric,
    RubricItem,
    Trajectory,
    UnknownEnvironmentError,
    environment_options,
    known_environments,
    make_environment,
    register_environment,
)
from rewards.environments.base import EpisodeLimits
from rewards.environments.tools import MalformedCall, ToolCall, call_tool, make_tool, parse_hermes, python_tool
from tasks.engines import SamplingSettings
from tasks.rollout import rollout
from tests.chat_fixtures import ScriptedEngine, char_chat_tokenizer

# ---- registry ------------------------------------------------------------------------------


def test_builtins_are_registered_and_unknown_names_list_them():
    assert {"calculator", "guess_number", "single_turn"} <= set(known_environments())
    with pytest.raises(UnknownEnvironmentError) as err:
        make_environment("guess_numbers")
    assert f"known environments: {', '.join(known_environments())}" in str(err.value)
    with pytest.raises(UnknownEnvironmentError, match="cannot load environment 'no_such_module:make'"):
        make_environment("no_such_module:make")
    with pytest.raises(UnknownEnvironmentError, match="takes no argument"):
        make_environment("guess_number:big")


def test_duplicates_and_bad_factories_are_rejected():
    def another(*, speed_weight: float = 0.0):
        return None

    with pytest.raises(ValueError, match="already registered"):
        register_environment("guess_number")(another)
    with pytest.raises(TypeError, match="options need defaults"):
        register_environment("test_no_default")(lambda *, level: None)
    with pytest.raises(TypeError, match=r"must take \(argument, \*, options...\)"):
        register_environment("test_family", family=True)(lambda *, level=1: None)


def test_options_are_checked_by_name_and_type():
    assert environment_options("guess_number") == {"speed_weight": 0.0}
    with pytest.raises(EnvironmentOptionsError, match="has no option 'speed'; valid options: speed_weight"):
        make_environment("guess_number", {"speed": 1.0})
    with pytest.raises(EnvironmentOptionsError, match="option 'speed_weight' = 'fast'"):
        make_environment("guess_number", {"speed_weight": "fast"})
    with pytest.raises(EnvironmentOptionsError, match="needs the option 'rewards'"):
        make_environment("single_turn")


def test_an_import_path_names_an_outside_environment():
    env = make_environment("rewards.environments.guess_number:guess_number", {"speed_weight": 2.0})
    assert [(i.name, i.weight) for i in env.rubric.items] == [("solved", 1.0), ("speed", 2.0)]


# ---- rubrics and the single-turn environment ----------------------------------------------------


def _trajectory(completion: str, **fields) -> Trajectory:
    messages = ({"role": "user", "content": "2+3="}, {"role": "assistant", "content": completion})
    return Trajectory(messages=messages, prompt_messages=1, end_reason=fields.pop("end_reason", "done"), **fields)


def test_the_single_turn_environment_scores_what_the_rewards_score():
    rewards = {"exact_answer": 1.0, "overlong": 0.5}
    options = {"overlong": {"max_length": 8, "cache_length": 4}}
    env = make_environment("single_turn", {"rewards": rewards, "reward_options": options})
    row = {"prompt_id": "p", "prompt": "2+3=", "answer": "5"}
    assert env.start(row).initial_messages() == [{"role": "user", "content": "2+3="}]
    assert env.start(row).plain_prompt == "2+3="
    for completion, tokens, finish in [("5", 2, "eos"), ("6", 7, "eos"), ("5", 8, "length")]:
        score = env.rubric.score(_trajectory(completion, completion_tokens=tokens, finish_reason=finish), row)
        example = {**row, "completion_tokens": tokens, "finish_reason": finish}
        want = {name: make_reward(name, options.get(name))(completion, example) for name in rewards}
        assert score.values == want
        assert score.total == pytest.approx(want["exact_answer"] + 0.5 * want["overlong"])


def test_a_raising_reward_is_nan_with_its_error_and_a_failed_episode_is_zero():
    def broken(trajectory, row):
        raise ZeroDivisionError("no turns")

    rubric = Rubric((RubricItem("ok", lambda t, r: 1.0, 2.0), RubricItem("broken", broken, 1.0)))
    score = rubric.score(_trajectory("x"), {})
    assert math.isnan(score.total) and score.values["ok"] == 1.0
    assert score.errors == {"broken": "ZeroDivisionError: no turns"}
    failed = rubric.score(_trajectory("x", end_reason="timeout", error="step did not return"), {})
    assert failed.total == 0.0 and failed.values == {"ok": 0.0, "broken": 0.0}
    with pytest.raises(ValueError, match="duplicate reward names: ok"):
        Rubric((RubricItem("ok", broken), RubricItem("ok", broken)))


# ---- tools --------------------------------------------------------------------------------------


def add(a: int, b: int = 0) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


def divide(a: float, b: float) -> float:
    """Divide.

    Args:
        a: numerator
        b: denominator
    """
    return a / b


def nap(seconds: float) -> str:
    """Sleep, then say so.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "awake"


def shout(text: str) -> str:
    """Repeat loudly.

    Args:
        text: what to repeat
    """
    return text.upper() * 1000


def vanish() -> str:
    """Leave without a word."""
    os._exit(3)


TOOLS = {
    t.name: t
    for t in [
        make_tool(add),
        make_tool(divide),
        make_tool(nap, timeout_s=0.5),
        make_tool(shout, max_result_chars=10),
        make_tool(vanish),
    ]
}


def test_a_tool_schema_comes_from_signature_and_docstring():
    assert TOOLS["add"].schema["function"] == {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "description": "the first"},
                "b": {"type": "integer", "description": "the second"},
            },
            "required": ["a"],
        },
        "return": {"type": "integer"},
    }

    def undocumented(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="tool .*undocumented"):
        make_tool(undocumented)


def test_hermes_tool_calls_parse_and_malformed_ones_say_why():
    text = (
        'Let me add. <tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>'
        "<tool_call>{name: add}</tool_call>"
        '<tool_call>["add"]</tool_call>'
        '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>'
        '<tool_call>{"name": "add", "arguments": {"a": 1}'
    )
    calls = parse_hermes(text)
    assert calls[:2] == [ToolCall("add", {"a": 2, "b": 3}), ToolCall("add", {"a": 1})]
    assert [type(c) for c in calls[2:]] == [MalformedCall] * 4
    assert "not JSON" in calls[2].why and "JSON object" in calls[3].why
    assert '"arguments" must be a JSON object' in calls[4].why and "unclosed <tool_call>" in calls[5].why
    assert parse_hermes("The answer is 5.") == []


def test_every_tool_failure_is_a_message_never_a_crash():
    def run(name, **arguments):
        return call_tool(TOOLS, ToolCall(name, arguments), turn=2)

    good = run("add", a=2, b=3)
    assert (good.result, good.error, good.turn, good.arguments) == ("5", None, 2, '{"a": 2, "b": 3}')
    unknown = run("multiply", a=2)
    assert unknown.result.startswith("error: unknown tool 'multiply'; available: add, divide, nap, shout, vanish")
    assert "missing a required argument: 'b'" in run("divide", a=1).result
    assert "unexpected keyword argument 'c'" in run("add", a=1, c=2).result
    assert run("divide", a=1, b=0).result == "error: ZeroDivisionError: division by zero"
    slow = run("nap", seconds=30)
    assert slow.result == "error: timed out after 0.5 s"  # cut at its deadline, not after its 30 s
    assert run("nap", seconds=0).result == "awake"
    assert run("vanish").result == "error: the tool's process died (exit code 3)"
    capped = run("shout", text="ab")
    assert capped.result == "ABABABABAB\n[... 1990 more characters cut]" and capped.error is None
    assert capped.chars_cut == 1990
    malformed = call_tool(TOOLS, MalformedCall("{oops", "the tool call is not JSON"), turn=0)
    assert malformed.result == "error: the tool call is not JSON" and malformed.name == ""


def test_the_calculator_environment_runs_tools_between_turns():
    turns = iter(
        [
            '<tool_call>{"name": "calculate", "arguments": {"expression": "17*23"}}</tool_call>'
            '<tool_call>{"name": "calculate", "arguments": {"expression": "__import__(1)"}}</tool_call>',
            "It is 391.",
        ]
    )
    tokenizer = char_chat_tokenizer("smollm2")
    engine = ScriptedEngine(tokenizer, lambda text: (next(turns), True))
    env = make_environment("calculator")
    row = {"prompt_id": "p", "prompt": "What is 17*23?", "answer": "391"}
    [record] = rollout(env, [row], 1, engine, tokenizer, SamplingSettings(max_new_tokens=200), EpisodeLimits())
    assert record.end_reason == "done" and record.turns == 2
    results = [m["content"] for m in record.messages if m["role"] == "tool"]
    assert results[0] == "391" and results[1].startswith("error: ValueError: only numbers")
    assert [(c.name, c.turn, c.error is None) for c in record.tool_calls] == [
        ("calculate", 0, True),
        ("calculate", 0, False),
    ]
    assert env.rubric.score(record.trajectory(), row).total == 1.0


def test_a_code_tool_runs_the_models_program_in_the_sandbox():
    tools = {"run_python": python_tool(wall_s=1.0)}
    ran = call_tool(tools, ToolCall("run_python", {"code": "print(6 * 7)"}), turn=0)
    assert (ran.result, ran.error) == ("42\n", None)
    refused = call_tool(tools, ToolCall("run_python", {"code": "import socket\nsocket.socket()"}), turn=0)
    assert "[failed: PermissionError" in refused.result  # no network in the sandbox
    looping = call_tool(tools, ToolCall("run_python", {"code": "while True:\n    pass"}), turn=0)
    assert "[stopped:" in looping.result and looping.duration_s < 10
