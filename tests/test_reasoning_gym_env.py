"""The reasoning-gym adapter: ``reasoning_gym:<task>`` rows, scored by the task's own
score_answer, end to end on a tiny model; a missing package or an unknown task in one line."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from data.errors import UserError
from rewards.environments import EnvironmentOptionsError, make_environment
from rewards.environments.base import EpisodeLimits, Trajectory
from tasks.engines import SamplingSettings
from tasks.engines.hf import HFEngine
from tasks.rollout import rollout
from tests.chat_fixtures import char_chat_tokenizer, tiny_chat_model
from tests.conftest import require


def _answered(row, text):
    messages = ({"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": text})
    return Trajectory(messages=messages, prompt_messages=1, end_reason="done")


@pytest.mark.optional  # the reasoning-gym extra
def test_rows_are_scored_by_the_tasks_own_score_answer():
    reasoning_gym = require("reasoning_gym", "reasoning-gym")
    env = make_environment("reasoning_gym:gcd", {"size": 6, "seed": 3})
    rows = env.dataset_rows()
    truth = reasoning_gym.create_dataset("gcd", size=6, seed=3)
    assert [r["prompt"] for r in rows] == [truth[i]["question"] for i in range(6)]
    assert all(r["task"] == "reasoning_gym:gcd" for r in rows)
    row = dict(rows[2], prompt_id="p2")
    gold = row["answer"]
    assert env.rubric.score(_answered(row, f"so <answer>{gold}</answer>"), row).total == 1.0
    assert env.rubric.score(_answered(row, f"<answer>{int(gold) + 1}</answer>"), row).total == 0.0
    assert env.rubric.score(_answered(row, f"it is {gold}"), row).total == 0.0  # no tag, no answer
    by_number = make_environment("reasoning_gym:gcd", {"size": 6, "seed": 3, "answer": "last_number"})
    assert by_number.rubric.score(_answered(row, f"it is {gold}"), row).total == 1.0
    # Another seed is another problem set (a held-out one), scored all the same.
    held_out = dict(env.dataset_rows(size=3, seed=99)[0], prompt_id="h0")
    assert held_out["prompt"] == reasoning_gym.create_dataset("gcd", size=3, seed=99)[0]["question"]
    assert env.rubric.score(_answered(held_out, f"<answer>{held_out['answer']}</answer>"), held_out).total == 1.0


@pytest.mark.optional  # the reasoning-gym extra
def test_a_row_that_does_not_regenerate_is_an_error_not_a_score():
    require("reasoning_gym", "reasoning-gym")
    env = make_environment("reasoning_gym:gcd", {"size": 4})
    row = dict(env.dataset_rows()[0], prompt_id="p0", prompt="What is the GCD of 4 and 6?")
    score = env.rubric.score(_answered(row, "<answer>2</answer>"), row)
    assert score.total != score.total and "regenerated another question" in score.errors["score_answer"]
    foreign = dict(row, extra_info=json.dumps({"reasoning_gym": {"task": "lcm", "size": 4, "seed": 0, "index": 0}}))
    assert "scored as 'gcd'" in env.rubric.score(_answered(foreign, "1"), foreign).errors["score_answer"]


@pytest.mark.optional  # the reasoning-gym extra
def test_unknown_tasks_and_config_fail_in_one_line():
    require("reasoning_gym", "reasoning-gym")
    with pytest.raises(EnvironmentOptionsError, match=r"unknown reasoning-gym task 'gdc'; known: .*\bgcd\b"):
        make_environment("reasoning_gym:gdc")
    with pytest.raises(EnvironmentOptionsError, match="reasoning-gym task 'gcd' config: .*'bogus'"):
        make_environment("reasoning_gym:gcd", {"config": {"bogus": 1}})


def test_a_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # what an environment without it sees
    with pytest.raises(UserError) as err:  # the CLI prints it in one line
        make_environment("reasoning_gym:gcd")
    assert isinstance(err.value, ImportError)
    assert str(err.value) == (
        "environment 'reasoning_gym' needs the 'reasoning-gym' package: "
        "make install-reasoning-gym (pip install 'grpoflow[reasoning-gym]')"
    )


@pytest.mark.optional  # the reasoning-gym extra
def test_end_to_end_on_a_tiny_model():
    require("reasoning_gym", "reasoning-gym")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only synchronises (test_rollout.py)
    try:
        _end_to_end()
    finally:
        torch.set_num_threads(threads)


def _end_to_end():
    tokenizer = char_chat_tokenizer("smollm2")
    model = tiny_chat_model(tokenizer)  # the engine holds it weakly
    engine = HFEngine()
    engine.load(model, tokenizer)
    env = make_environment("reasoning_gym:gcd", {"size": 3, "seed": 1})
    rows = [dict(r, prompt_id=f"p{k}") for k, r in enumerate(env.dataset_rows())]
    records = rollout(
        env, rows, 2, engine, tokenizer, SamplingSettings(max_new_tokens=8), EpisodeLimits(max_total_tokens=1024)
    )
    assert len(records) == 6 and all(r.turns == 1 and r.end_reason in ("done", "length") for r in records)
    assert records[0].messages[0]["role"] == "system"  # reasoning-gym's own prompt asks for <answer> tags
    for record in records:
        score = env.rubric.score(record.trajectory(), rows[record.row_index])
        assert score.total in (0.0, 1.0) and not score.errors
