"""The reward registry: names, import paths, bound options, time limits."""

from __future__ import annotations

import pickle

import pytest

from rewards import (
    RewardOptionsError,
    UnknownRewardError,
    get_reward,
    known_rewards,
    make_reward,
    register,
    reward_options,
)
from rewards.registry import DEFAULT_TIME_LIMIT_S


def test_builtins_are_registered():
    assert {"exact_answer", "math", "code", "format", "overlong"} <= set(known_rewards())


def test_exact_answer_still_works():
    fn = get_reward("exact_answer")
    assert fn("85", {"answer": "85"}) == 1.0
    assert fn("85 85", {"answer": "85"}) == 0.0
    with pytest.raises(ValueError):
        fn("85", {})


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownRewardError) as err:
        get_reward("maths")
    assert f"known rewards: {', '.join(known_rewards())}" in str(err.value)
    assert {"code", "exact_answer", "format", "math", "overlong"} <= set(known_rewards())
    with pytest.raises(UnknownRewardError, match="cannot load reward 'no_such_module:fn'"):
        get_reward("no_such_module:fn")
    with pytest.raises(UnknownRewardError, match="is not callable"):
        get_reward("rewards.math_answers:MAX_DIGITS")


def test_duplicate_names_are_rejected():
    def another(completion, example):
        return 0.0

    with pytest.raises(ValueError, match="already registered"):
        register("math")(another)


def test_signature_is_checked_at_registration():
    def no_default(completion, example, *, level):
        return 0.0

    def three_positional(completion, example, extra):
        return 0.0

    with pytest.raises(TypeError, match="options need defaults"):
        register("test_no_default")(no_default)
    with pytest.raises(TypeError, match="must take"):
        register("test_three")(three_positional)
    assert "test_no_default" not in known_rewards()


def test_custom_reward_by_import_path():
    bound = make_reward("rewards.math_answers:math_reward", {"last_number": False})
    assert bound("about 7", {"answer": "7"}) == 0.0
    assert bound.time_limit_s == DEFAULT_TIME_LIMIT_S


def test_options_are_validated_by_name_and_type():
    with pytest.raises(RewardOptionsError) as err:
        make_reward("math", {"boxd": False})
    assert "valid options: boxed, gsm8k, answer_is, last_number, max_answer_chars, time_limit_s" in str(err.value)
    with pytest.raises(RewardOptionsError, match="'mode'"):
        make_reward("code", {"mode": "most"})
    with pytest.raises(RewardOptionsError, match="max_answer_chars"):
        make_reward("math", {"max_answer_chars": 0})
    with pytest.raises(RewardOptionsError, match="regular expression"):
        make_reward("format", {"pattern": "(unclosed"})
    with pytest.raises(RewardOptionsError, match="cache_length"):
        make_reward("overlong", {"max_length": 100, "cache_length": 200})
    with pytest.raises(RewardOptionsError, match="time_limit_s"):
        make_reward("math", {"time_limit_s": -1})


def test_bound_reward_is_callable_and_picklable():
    bound = make_reward("math", {"boxed": False, "time_limit_s": 2})
    assert bound.options == {"boxed": False} and bound.time_limit_s == 2.0
    assert bound(r"\boxed{3} so the answer is 4", {"answer": "4"}) == 1.0
    again = pickle.loads(pickle.dumps(bound))
    assert again == bound and again(r"\boxed{3} so the answer is 4", {"answer": "4"}) == 1.0


def test_time_limits_follow_the_options():
    assert make_reward("code").time_limit_s == 40.0  # the wall-clock backstop 2 * 10 + 5, plus 15
    assert make_reward("code", {"timeout_s": 60}).time_limit_s == 140.0
    assert make_reward("code", {"timeout_s": 60, "wall_s": 70}).time_limit_s == 85.0
    assert make_reward("code", {"timeout_s": 60, "time_limit_s": 100}).time_limit_s == 100.0
    assert reward_options("math") == {
        "boxed": True,
        "gsm8k": True,
        "answer_is": True,
        "last_number": True,
        "max_answer_chars": 300,
        "time_limit_s": 5.0,
    }
