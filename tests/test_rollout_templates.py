"""Token in, token out, per chat template: the token ids the rollout loop builds turn by turn
equal ``apply_chat_template`` of the whole conversation (SmolLM2's template, a Qwen2.5-style
Hermes tool template), and where a template rewrites earlier turns (it strips their
reasoning, as Qwen3's does) the test shows exactly which tokens differ and why."""

from __future__ import annotations

import pytest

from rewards.environments.base import Environment, Episode, EpisodeLimits, Rubric, StepResult
from rewards.environments.tools import make_tool
from tasks.engines import SamplingSettings
from tasks.rollout import rollout
from tests.chat_fixtures import ScriptedEngine, bpe_chat_tokenizer

QUESTION = "What is 12*7? Then guess my number."
TURNS = [
    '<tool_call>\n{"name": "calculate", "arguments": {"expression": "12*7"}}\n</tool_call>',
    "<think>\nthe calculator says 84\n</think>\nIs it 42?",
    "41",
]
REPLIES = [
    [{"role": "tool", "name": "calculate", "content": "84"}, {"role": "tool", "name": "calculate", "content": "ok"}],
    [{"role": "user", "content": "lower"}],
]


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: digits and + - * / ( )
    """
    return expression


class _Script(Episode):
    def __init__(self):
        self.replies = [list(r) for r in REPLIES]

    def initial_messages(self):
        return [{"role": "user", "content": QUESTION}]

    def step(self, turn):
        return StepResult(self.replies.pop(0), done=False) if self.replies else StepResult((), done=True)


class _ScriptEnvironment(Environment):
    @property
    def rubric(self):
        return Rubric(())

    def start(self, row):
        return _Script()

    def tool_schemas(self):
        return [make_tool(calculate).schema]


def _play(tokenizer):
    def reply(text: str):
        return TURNS[text.count("<|im_start|>assistant") - 1], True

    engine = ScriptedEngine(tokenizer, reply)
    [record] = rollout(
        _ScriptEnvironment(),
        [{"prompt_id": "p"}],
        1,
        engine,
        tokenizer,
        SamplingSettings(max_new_tokens=200),
        EpisodeLimits(max_turns=5, max_total_tokens=4096),
    )
    assert record.end_reason == "done" and record.turns == 3 and engine.calls == [1, 1, 1]
    return record


def _whole(tokenizer, messages, tools):
    ids = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=False)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("template", ["smollm2", "hermes_qwen25_style"])
def test_incremental_ids_equal_the_whole_conversation(template, tmp_path):
    tokenizer = bpe_chat_tokenizer(template, tmp_path)
    record = _play(tokenizer)
    tools = [make_tool(calculate).schema]
    incremental = record.prompt_ids + record.completion_ids
    whole = _whole(tokenizer, record.messages, tools)
    # The conversation ends on the model's <|im_end|>; the template adds only its "\n" after it.
    assert incremental == whole[: len(incremental)]
    assert tokenizer.decode(whole[len(incremental) :]) == "\n"
    # The mask covers exactly the model's turns, each ending with its end token.
    policy = [t for t, m in zip(record.completion_ids, record.loss_mask, strict=True) if m]
    expected = [t for turn in TURNS for t in tokenizer.encode(turn, add_special_tokens=False) + [2]]
    assert policy == expected
    assert [m["role"] for m in record.messages] == [
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
        "user",
        "assistant",
    ]
    assert record.sampler_logprobs == [-0.25 if m else 0.0 for m in record.loss_mask]


def test_a_template_that_strips_earlier_reasoning_cannot_match(tmp_path):
    """Where token-in/token-out and re-rendering part: this template renders an assistant turn
    that precedes a later user turn without its <think> block, so the whole conversation
    re-rendered is not what the model saw when it wrote turn 3. The rollout keeps what the
    model saw (the policy is trained on its own context); the re-rendering differs by exactly
    turn 2's reasoning."""
    tokenizer = bpe_chat_tokenizer("strip_reasoning", tmp_path)
    record = _play(tokenizer)
    incremental = record.prompt_ids + record.completion_ids
    whole = _whole(tokenizer, record.messages, None)
    assert incremental != whole[: len(incremental)]
    reasoning = "<think>\nthe calculator says 84\n</think>\n"
    seen = tokenizer.decode(incremental, skip_special_tokens=False)
    rerendered = tokenizer.decode(whole, skip_special_tokens=False)
    assert seen.replace(reasoning, "") + "\n" == rerendered
    first_difference = next(i for i, (a, b) in enumerate(zip(incremental, whole, strict=False)) if a != b)
    assert tokenizer.decode(incremental[first_difference:]).startswith("<think>")
