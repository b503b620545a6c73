"""The built-in task and the embedded default model."""

from __future__ import annotations

import pytest

from data import builtin
from rewards import get_reward
from tasks.tiny_model import ensure_tiny_model


def test_held_out_problems_never_appear_in_training():
    held = {p["prompt"] for p in builtin.held_out_problems()}
    assert len(held) == builtin.HELD_OUT_SIZE == 500
    assert not held & {p["prompt"] for p in builtin.all_train_problems()}
    assert not held & {p["prompt"] for p in builtin.train_problems(5000, seed=3)}
    assert (
        builtin.train_problems(10, seed=1) == builtin.train_problems(10, seed=1) != builtin.train_problems(10, seed=2)
    )
    assert all(int(p["answer"]) == eval(p["prompt"][:-1]) for p in builtin.held_out_problems(50))


def test_exact_answer_reward_is_strict():
    reward = get_reward("exact_answer")
    row = {"answer": "85"}
    assert reward("85", row) == 1.0 and reward(" 85 ", row) == 1.0
    assert (
        reward("58", row) == 0.0
        and reward("85 85", row) == 0.0
        and reward("the answer is 85", row) == 0.0
        and reward("", row) == 0.0
    )


@pytest.mark.slow  # three supervised warm-ups of the built-in tiny model
def test_tiny_model_is_built_once_and_cached(tmp_path):
    folder = ensure_tiny_model(steps=3, cache_dir=tmp_path)
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(steps=3, cache_dir=tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert ensure_tiny_model(steps=4, cache_dir=tmp_path) != folder  # other settings, other model
