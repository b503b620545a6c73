"""The math reward: a table of (completion, gold, expected) run in killable scoring workers.

The table covers every answer form the reward promises (thousands separators, decimals,
fractions, percentages, negatives, roots, pi, symbolic expressions, intervals, sets, units),
the extraction order, gaming attempts, and inputs built to make sympy hang. It runs
through ``RewardPool`` exactly as the score stage does: an input that is refused by the
guards must come back 0 well within the limit; one that really hangs sympy must come back
NaN with a time-limit error, after which the pool still scores the rest.
"""

from __future__ import annotations

import math
import threading

import pytest

from rewards import make_reward
from rewards.math_answers import extract_answer, find_boxed, math_reward
from rewards.pool import RewardPool

TIMEOUT = "timeout"  # expected: NaN, error text naming the time limit
LIMIT_S = 3.0

CASES = [
    # integers, thousands separators
    (r"So the total is \boxed{1,000}.", "1000", 1.0),
    ("Adding up: #### 1,234,567", "1234567", 1.0),
    (r"\boxed{1\,000}", "1000", 1.0),
    ("We get 12,345 in the end", "12345", 1.0),
    (r"\boxed{42}", "42", 1.0),
    (r"\boxed{43}", "42", 0.0),
    # decimals
    (r"\boxed{3.50}", "3.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{2.0}", "2", 1.0),
    (r"\boxed{0.333}", "1/3", 0.0),
    # fractions
    (r"\boxed{\frac{3}{4}}", "0.75", 1.0),
    (r"\boxed{\dfrac{3}{4}}", "3/4", 1.0),
    (r"\boxed{3/4}", r"\frac{3}{4}", 1.0),
    (r"\boxed{\frac12}", "1/2", 1.0),
    (r"\boxed{\frac{6}{8}}", r"\frac{3}{4}", 1.0),
    (r"\boxed{\frac{3}{5}}", r"\frac{3}{4}", 0.0),
    # percentages
    (r"\boxed{50\%}", "50", 1.0),
    ("The answer is 50%.", "50", 1.0),
    (r"\boxed{25\%}", "50", 0.0),
    # negative numbers
    (r"\boxed{-3}", "-3", 1.0),
    (r"\boxed{-3}", "3", 0.0),
    (r"\boxed{-\frac{1}{2}}", "-0.5", 1.0),
    ("The temperature fell to -7 degrees", "-7", 1.0),
    # roots and pi
    (r"\boxed{3\sqrt{2}}", r"\sqrt{18}", 1.0),
    (r"\boxed{\sqrt{2}}", "2^{1/2}", 1.0),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}", 1.0),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{18}", 0.0),
    (r"\boxed{2\pi}", r"2 \pi", 1.0),
    (r"\boxed{\frac{\pi}{2}}", r"\pi/2", 1.0),
    (r"\boxed{3.14}", r"\pi", 0.0),
    # symbolic expressions
    (r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    (r"\boxed{\frac{x+1}{x-1}}", "(x+1)/(x-1)", 1.0),
    (r"\boxed{1+2x}", "2x+1", 1.0),
    (r"\boxed{y = 2x + 3}", "2x+3", 1.0),
    (r"\boxed{x^3}", "x^2", 0.0),
    # intervals and sets
    (r"\boxed{[1, 2)}", "[1,2)", 1.0),
    (r"\boxed{(1, 2]}", "[1,2)", 0.0),
    (r"\boxed{(-\infty, 3]}", r"x \le 3", 1.0),
    (r"\boxed{\{1, 2\}}", r"\{2, 1\}", 1.0),
    (r"\boxed{\{1, 2, 3\}}", r"\{1, 2\}", 0.0),
    # text units
    (r"\boxed{5\text{ cm}}", "5", 1.0),
    ("The answer is 12 apples.", "12", 1.0),
    (r"\boxed{\$5}", "5", 1.0),
    (r"\boxed{90^\circ}", "90", 1.0),
    (r"\boxed{5\,\mathrm{m/s}}", "5", 1.0),
    # extraction order: boxed, then ####, then "the answer is", then the last number
    (r"The answer is 7. Check: \boxed{8}", "8", 1.0),
    ("The answer is 7\n#### 9", "9", 1.0),
    ("the final answer is 7, which is more than 3", "7", 1.0),
    ("First 3 then 4 and finally 10", "10", 1.0),
    ("I cannot say.", "10", 0.0),
    (r"\boxed{\frac{1}{\sqrt{3}}} after the nested braces", r"\frac{\sqrt{3}}{3}", 1.0),
    (r"\fbox{7}", "7", 1.0),
    # gaming attempts
    (r"\boxed{1} or maybe \boxed{2}", "1", 0.0),
    (r"\boxed{2} and so \boxed{2}", "2", 1.0),
    (r"\boxed{\frac12}, that is \boxed{0.5}", "0.5", 1.0),
    (r"\boxed{1}\boxed{2}\boxed{3}\boxed{4}\boxed{5}\boxed{6}", "6", 0.0),
    (r"\boxed{1, 2, 3}", "2", 0.0),
    (r"\boxed{2 \text{ or } 3}", "2", 0.0),
    (r"\boxed{\pm 2}", "2", 0.0),
    (r"\boxed{\text{A, B, C, D}}", "B", 0.0),
    (r"\boxed{x}", "2", 0.0),
    (r"\boxed{}", "2", 0.0),
    (r"\boxed{" + "+".join(["1"] * 200) + "}", "200", 0.0),
    ("The answer is " + ", ".join(str(i) for i in range(200)) + ".", "199", 0.0),
    # built to make sympy hang: refused by the size guard, quickly
    (r"\boxed{9^{9^{9}}}", "1", 0.0),
    (r"\boxed{10^{10^{10}}}", "10", 0.0),
    (r"\boxed{(10^{100})!}", "1", 0.0),
    (r"\boxed{\binom{10^{9}}{10^{8}}}", "1", 0.0),
    (r"\boxed{2^{2^{2^{2^{2^{2}}}}}}", "4", 0.0),
    (r"\boxed{e^{e^{e^{100}}}}", "1", 0.0),
    # ... and one that gets past the guard and hangs in sympy's simplify: the worker is killed
    (r"\boxed{2^{10^{4}}}", "2^{10000}", TIMEOUT),
]


def test_table_is_big_enough():
    assert len(CASES) >= 60


def test_math_table_in_killable_workers():
    reward = make_reward("math", {"time_limit_s": LIMIT_S})
    rows = [(completion, {"answer": gold}) for completion, gold, _ in CASES]
    with RewardPool([reward], workers=2) as pool:
        outcomes = [o[0] for o in pool.score(rows)]
        # Only the cases meant to overrun were killed: every other one ran below its limit. (Counted,
        # not timed: a wall-clock bound fails on a loaded machine without anything being wrong.)
        assert pool.timeouts == sum(expected == TIMEOUT for *_, expected in CASES)
    wrong = []
    for (completion, gold, expected), outcome in zip(CASES, outcomes, strict=True):
        if expected == TIMEOUT:
            ok = math.isnan(outcome.value) and "time limit" in (outcome.error or "")
        else:
            ok = outcome.value == expected and outcome.error is None
        if not ok:
            wrong.append(f"{completion[:60]!r} vs {gold!r}: expected {expected}, got {outcome}")
    assert not wrong, "\n".join(wrong)


def test_boxed_contents_with_nested_braces():
    text = r"first \boxed{\frac{1}{2}} then \boxed{\sqrt{\frac{a}{b}}} and \boxed{unclosed"
    assert find_boxed(text) == [r"\frac{1}{2}", r"\sqrt{\frac{a}{b}}"]


def test_each_extraction_step_can_be_switched_off():
    text = "The answer is 7.\n#### 8\nso \\boxed{9} and 10 later"
    assert extract_answer(text) == "9"
    assert extract_answer(text, boxed=False) == "8"
    assert extract_answer(text, boxed=False, gsm8k=False) == "7"
    assert extract_answer(text, boxed=False, gsm8k=False, answer_is=False) == "10"
    assert extract_answer(text, boxed=False, gsm8k=False, answer_is=False, last_number=False) is None
    assert math_reward("the sum is 10", {"answer": "10"}, last_number=False) == 0.0
    assert math_reward("the sum is 10", {"answer": "10"}) == 1.0


def test_answer_length_limit_is_an_option():
    long_answer = r"\boxed{" + "+".join(["1"] * 20) + "}"
    assert math_reward(long_answer, {"answer": "20"}) == 1.0
    assert make_reward("math", {"max_answer_chars": 10})(long_answer, {"answer": "20"}) == 0.0


def test_bad_rows_raise_instead_of_scoring_zero():
    with pytest.raises(ValueError, match="'answer'"):
        math_reward(r"\boxed{1}", {"answer": None})
    with pytest.raises(ValueError, match="cannot parse the gold answer"):
        math_reward(r"\boxed{1}", {"answer": "$ $"})


def test_works_outside_the_main_thread():
    """math-verify's own alarm-based timeout raises off the main thread; ours is not used."""
    results = []
    thread = threading.Thread(target=lambda: results.append(math_reward(r"\boxed{\frac{1}{2}}", {"answer": "0.5"})))
    thread.start()
    thread.join()
    assert results == [1.0]


_STEPS = ("boxed", "gsm8k", "answer_is", "last_number")
HEDGES = {
    "boxed": [r"\boxed{69 \text{ or } 70}", r"So $\boxed{69\text{ or }70}$", r"\boxed{69, 70}"],
    "gsm8k": ["#### 69 or 70", "#### 69, or maybe 70", "#### 69 and 70"],
    "answer_is": ["The answer is 69 or 70.", "The final answer is 69, possibly 70.", "The answer is 69 to 70."],
    "last_number": ["I think 69 or 70", "It is 69. Or maybe 70", "either 69 apples or 70", "69, 70"],
}


@pytest.mark.parametrize("step", _STEPS)
def test_hedged_and_multi_answer_statements_score_zero_in_every_extraction_mode(step):
    for text in HEDGES[step]:
        assert math_reward(text, {"answer": "70"}) == 0.0, text  # every step on (the default)
        only = {s: s == step for s in _STEPS}
        assert math_reward(text, {"answer": "70"}, **only) == 0.0, (text, step)
        if " or " in text:  # the same number twice is no hedge
            assert math_reward(text.replace("69", "70"), {"answer": "70"}, **only) == 1.0, (text, step)


def test_numbers_that_are_not_alternatives_still_count():
    for text in [
        "So 3 + 4 = 70",
        "Adding 30 and 40 gives 70.",
        "Pages 10-15, then 70",
        r"\boxed{1\,000}",
        "5 apples or more, so 70",
    ]:
        gold = "1000" if "000" in text else "70"
        assert math_reward(text, {"answer": gold}) == 1.0, text
    assert math_reward(r"\boxed{1, 2}", {"answer": r"\{1, 2\}"}) == 1.0  # a list gold takes a list
