"""The countdown task: every generated problem is solvable, the held-out share never appears
in training, and the verifier accepts any correct expression and nothing else."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from data import countdown
from data.sources import normalise_row, prompts_table
from rewards import get_reward
from rewards.countdown import NotAnExpression, evaluate

PROBLEM = {"numbers": [3, 5, 7], "target": 22}


@pytest.mark.parametrize("expression", ["3*5+7", "7+5*3", "(5*3)+7", " 7 + 3 * 5 ", "5*3+7"])
def test_many_different_expressions_reach_the_target(expression):
    assert get_reward("countdown")(expression, PROBLEM) == 1.0


def test_a_second_solution_family_counts_too():
    assert get_reward("countdown")("3*7+1", {"numbers": [1, 3, 7], "target": 22}) == 1.0
    assert get_reward("countdown")("(1+3)*7-7", {"numbers": [1, 3, 7, 7], "target": 21}) == 1.0


@pytest.mark.parametrize(
    "text, why",
    [
        ("3*5+7+7", "7 used twice but given once"),
        ("2*11", "numbers not given"),
        ("3*5+5", "5 reused"),
        ("3+5+7", "wrong value"),
        ("22", "the target itself is not one of the numbers"),
        ("", "empty"),
        ("3*5+7 and more", "trailing text"),
        ("__import__('os')", "not arithmetic"),
        ("7/(5-5)+3", "division by zero"),
        ("3**5", "power is not allowed"),
        ("-3+5*7", "unary minus is not allowed"),
    ],
)
def test_wrong_or_malformed_answers_score_zero(text, why):
    assert get_reward("countdown")(text, PROBLEM) == 0.0, why


def test_arithmetic_is_exact():
    assert evaluate("7/2*4") == (Fraction(14), [7, 2, 4])
    with pytest.raises(NotAnExpression):
        evaluate("x+1")


def test_generated_problems_are_solvable_distinct_and_seeded():
    rows = countdown.problems(300, seed=3)
    assert rows == countdown.problems(300, seed=3)
    assert len({(tuple(r["numbers"]), r["target"]) for r in rows}) == 300
    for r in rows:
        assert Fraction(r["target"]) in countdown.reachable(tuple(sorted(r["numbers"])))
        assert r["target"] not in r["numbers"] and r["answer"] == str(r["target"])


def test_held_out_share_never_appears_in_training():
    held = {(tuple(r["numbers"]), r["target"]) for r in countdown.problems(200, seed=0, held_out=True)}
    for seed in (0, 1):
        train = {(tuple(r["numbers"]), r["target"]) for r in countdown.problems(2000, seed=seed)}
        assert not held & train


def test_the_reward_reads_numbers_from_an_ingested_prompts_row():
    """Through normalise_row the numbers land in extra_info (JSON); the verifier finds them."""
    raw = countdown.problem((3, 5, 7), 22)
    row = prompts_table([normalise_row(raw, data_source="test", row=0)]).to_pylist()[0]
    assert json.loads(row["extra_info"])["numbers"] == [3, 5, 7]
    assert row["prompt"] == "3 5 7:22=" and row["task"] == "countdown"
    assert get_reward("countdown")("7+3*5", row) == 1.0
    assert get_reward("countdown")("7+3+5", row) == 0.0


def test_a_row_without_numbers_is_an_error_not_a_zero():
    with pytest.raises(ValueError, match="numbers"):
        get_reward("countdown")("1+2", {"answer": "3"})


def test_the_jsonl_writer(tmp_path):
    out = tmp_path / "c.jsonl"
    import sys

    argv, sys.argv = sys.argv, ["countdown", str(out), "--size", "20", "--held-out"]
    try:
        countdown.main()
    finally:
        sys.argv = argv
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 20 and all(countdown.is_held_out(tuple(r["numbers"]), r["target"]) for r in rows)
