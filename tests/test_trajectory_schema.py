"""The proposed generations schema (version 4): episodes stored as rows, re-read, and
re-scored from the file alone; files of version 3 still read, as single-turn trajectories."""

from __future__ import annotations

import pyarrow as pa
import pytest

from data.schemas import GENERATIONS, GENERATIONS_V4, SchemaError
from data.store import read_table, write_table
from rewards.environments import make_environment
from rewards.environments.base import EpisodeLimits, trajectory_from_row
from tasks.engines import SamplingSettings
from tasks.rollout import rollout
from tests.chat_fixtures import ScriptedEngine, char_chat_tokenizer

CALL = '<tool_call>{"name": "calculate", "arguments": {"expression": "6*7"}}</tool_call>'


def _episodes(env_name, rows, reply, limits=None):
    tokenizer = char_chat_tokenizer("smollm2")
    env = make_environment(env_name)
    engine = ScriptedEngine(tokenizer, reply)
    settings = SamplingSettings(max_new_tokens=100)
    records = rollout(env, rows, 2, engine, tokenizer, settings, limits or EpisodeLimits())
    return env, records, tokenizer


def test_episodes_round_trip_and_rescore_from_the_file(tmp_path):
    rows = [{"prompt_id": "c0", "prompt": "What is 6*7?", "answer": "42"}]
    turns = {}

    def reply(text):  # a tool call, then the answer; the second sample answers wrong at once
        key = text.count("<|im_start|>assistant")
        turns[key] = turns.get(key, 0) + 1
        if key == 1 and turns[key] == 1:
            return CALL, True
        return ("It is 42." if key == 2 else "It is 41."), True

    env, records, tokenizer = _episodes("calculator", rows, reply)
    games = [{"prompt_id": "g0", "prompt": "Guess 1 to 9.", "answer": "7"}]
    game, game_records, _ = _episodes("guess_number", games, lambda text: ("3", True), EpisodeLimits(max_turns=2))
    table = pa.Table.from_pylist(
        [r.generation_row("c0", "What is 6*7?") for r in records]
        + [r.generation_row("g0", "Guess 1 to 9.") for r in game_records],
        schema=GENERATIONS_V4.schema,
    )
    path = write_table(table, tmp_path / "generations.parquet", GENERATIONS_V4)
    stored = read_table(path, GENERATIONS_V4).to_pylist()
    assert [r["turns"] for r in stored] == [2, 1, 2, 2] and stored[0]["end_reason"] == "done"
    assert stored[0]["loss_mask"] == records[0].loss_mask and 0 in stored[0]["loss_mask"]
    assert stored[0]["completion_token_ids"] == records[0].completion_ids
    assert stored[0]["tool_calls"][0]["result"] == "42" and stored[0]["tool_calls"][0]["error"] is None
    assert (
        stored[2]["end_reason"] == "max_turns"
        and stored[2]["env_info"] == '{"solved": false, "guesses": 2, "secret": 7}'
    )
    # Re-scoring needs the file alone: the same rubric on the stored trajectory gives the same score.
    for row, record, environment, source in zip(
        stored, records + game_records, [env, env, game, game], rows * 2 + games * 2, strict=True
    ):
        again = environment.rubric.score(trajectory_from_row(row), source)
        assert again == environment.rubric.score(record.trajectory(), source)
    assert [env.rubric.score(trajectory_from_row(r), rows[0]).total for r in stored[:2]] == [1.0, 0.0]


def test_version_3_files_read_as_single_turn_trajectories(tmp_path):
    old = {
        "prompt_id": "p",
        "sample_index": 0,
        "prompt_text": "2+3=",
        "completion": "5",
        "prompt_token_ids": [1, 2],
        "completion_token_ids": [3, 4],
        "old_logprobs": None,
        "ref_logprobs": None,
        "finish_reason": "eos",
        "sampler_logprobs": [-0.1, -0.2],
    }
    path = tmp_path / "generations.parquet"
    write_table(pa.Table.from_pylist([old], schema=GENERATIONS.schema), path, GENERATIONS)
    [row] = read_table(path, GENERATIONS_V4).to_pylist()
    assert row["loss_mask"] is None and row["messages"] is None and row["end_reason"] is None
    trajectory = trajectory_from_row(row)
    assert trajectory.completion == "5" and trajectory.completion_tokens == 2 and trajectory.end_reason == "done"
    env = make_environment("single_turn", {"rewards": {"exact_answer": 1.0}})
    assert env.rubric.score(trajectory, {"prompt_id": "p", "answer": "5"}).total == 1.0
    # This grpoflow's stages (version 3) refuse a version 4 file in one line, never misread it.
    write_table(pa.Table.from_pylist([old], schema=GENERATIONS_V4.schema), path, GENERATIONS_V4)
    with pytest.raises(SchemaError, match="generations artifact: unexpected column 'loss_mask'"):
        read_table(path, GENERATIONS)
