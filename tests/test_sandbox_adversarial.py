"""The adversarial suite (``tests/adversarial.py``), run as this user and as an unprivileged one.

Each class of issue 12 has several programs there. Here they are scored through the score
stage's worker pool, with user namespaces and without (Landlock and seccomp alone, what a
kernel that refuses user namespaces gets), first as the user running the tests and then,
when that is root (CI), once more as a throw-away unprivileged user in a subprocess,
together with the HumanEval canonical/broken check. Last, correct programs are scored
while CPU and PID hogs run beside them.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from rewards import make_reward
from tests import adversarial

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="switching to an unprivileged scorer needs root")


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "no-namespaces"])
def test_attacks_are_contained_as_this_user(namespaces):
    canaries = adversarial.make_canaries()
    suite = adversarial.attacks(canaries)
    adversarial.remove_canaries(canaries)
    assert {a.kind for a in suite} == set(range(1, 8))
    assert min(sum(a.kind == k for a in suite) for k in range(1, 8)) >= 3  # several per class
    failures = adversarial.run_suite(namespaces)
    assert not failures, "\n".join(failures)


@root_only
def test_attacks_are_contained_as_an_unprivileged_scorer():
    """The same suite, plus HumanEval and the dataset layouts (tests/data/code_layouts),
    with the scorer itself running as an ordinary user."""
    argv = [sys.executable, "-m", "tests.adversarial", "--namespaces", "--no-namespaces", "--humaneval", "--layouts"]
    code, out, err = adversarial.run_as(adversarial.UNPRIVILEGED_UID, argv, timeout=400)
    assert code == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["uid"] == adversarial.UNPRIVILEGED_UID
    assert not report["failures"], "\n".join(report["failures"])
    canaries = adversarial.make_canaries()
    per_suite = len(adversarial.attacks(canaries))
    adversarial.remove_canaries(canaries)
    assert len(report["scored"]) == 2 * per_suite + 2  # both suites ran every program, HumanEval and the layouts


HOGS = {
    "cpu_hog": "import os\nfor _ in range(12):\n    if os.fork() == 0:\n        break\nwhile True:\n    pass\n",
    "pid_hog": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
}
# Enough work to need some CPU (about 0.1-0.3 s here) and a wall clock far beyond it on a busy machine.
WORK = "def solve(n):\n    total = 0\n    for i in range(n):\n        total += i * i % 7\n    return total\n"
WORK_TEST = f"def check(candidate):\n    assert candidate(300_000) == {sum(i * i % 7 for i in range(300_000))}\n"


def test_correct_programs_beside_cpu_and_pid_hogs_score_correctly():
    code = make_reward("code", {"timeout_s": 3})
    rows = [
        (HOGS["cpu_hog"] + adversarial.CORRECT_ADD, adversarial.ADD_TEST),
        (HOGS["pid_hog"] + adversarial.CORRECT_ADD, adversarial.ADD_TEST),
    ] * 2
    rows += [(WORK, WORK_TEST)] * 8
    with ThreadPoolExecutor(max_workers=len(rows)) as threads:  # all at once: hogs beside the correct ones
        scores = list(threads.map(lambda row: code(row[0], {"test": row[1], "entry_point": "solve"}), rows))
    assert scores[:4] == [0.0] * 4
    assert scores[4:] == [1.0] * 8, [getattr(s, "why", s) for s in scores[4:]]
