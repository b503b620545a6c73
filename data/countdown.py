"""Built-in task with many right answers and no reference solution: countdown.

Given a few small numbers and a target, write an arithmetic expression with + - * / and
parentheses that uses each given number at most once and equals the target. "3 5 7:22="
accepts "3*5+7", "7*3+5-..."; the data holds only the numbers and the target (`answer` is the
target, not a solution), and the verifier (`rewards/countdown.py`) evaluates what the model
wrote. Every problem is solvable: targets are drawn from the values the numbers can reach.

Problems are procedurally generated and seeded; a fixed, seed-independent share of all
(numbers, target) pairs is held out and never generated for training.

    python -m data.countdown train.jsonl --size 20000          # TRL-layout JSONL rows
    python -m data.countdown heldout.jsonl --held-out --size 500
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

TASK = "countdown"
COUNT = 3  # numbers per problem
LOW, HIGH = 1, 9  # each number's range: single characters for the char-level tiny model
TARGET_LOW, TARGET_HIGH = 10, 60  # targets: never one of the numbers themselves
HELD_OUT_PERCENT = 10  # share of all (numbers, target) pairs reserved for evaluation


@cache
def reachable(numbers: tuple[int, ...]) -> frozenset[Fraction]:
    """Every value an expression can take using each of `numbers` at most once (+ - * /,
    any parenthesisation); brute force over subsets, fine for three or four numbers."""
    values: set[Fraction] = set()
    for size in range(1, len(numbers) + 1):
        for subset in itertools.combinations(numbers, size):
            values |= _all_values(tuple(sorted(subset)))
    return frozenset(values)


@cache
def _all_values(numbers: tuple[int, ...]) -> frozenset[Fraction]:
    """Values of expressions using every one of `numbers` exactly once."""
    if len(numbers) == 1:
        return frozenset({Fraction(numbers[0])})
    out: set[Fraction] = set()
    indices = range(len(numbers))
    for size in range(1, len(numbers)):
        for left_idx in itertools.combinations(indices, size):
            left = tuple(sorted(numbers[i] for i in left_idx))
            right = tuple(sorted(numbers[i] for i in indices if i not in left_idx))
            for a in _all_values(left):
                for b in _all_values(right):
                    out.update((a + b, a - b, a * b))
                    if b != 0:
                        out.add(a / b)
    return frozenset(out)


def is_held_out(numbers: tuple[int, ...], target: int) -> bool:
    """Fixed for every seed: a hash of the sorted numbers and the target."""
    key = f"{','.join(map(str, sorted(numbers)))}:{target}".encode()
    return int(hashlib.sha256(key).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def problem(numbers: tuple[int, ...], target: int) -> dict[str, Any]:
    """One row in TRL's layout; `numbers` and `target` travel to the reward in extra_info."""
    return {
        "prompt": f"{' '.join(map(str, numbers))}:{target}=",
        "answer": str(target),
        "task": TASK,
        "numbers": list(numbers),
        "target": target,
    }


def problems(n: int, seed: int, held_out: bool = False) -> list[dict[str, Any]]:
    """`n` solvable problems from the training (or held-out) share, seeded; no duplicates
    when that many distinct problems exist."""
    rng = random.Random(f"countdown:{seed}:{held_out}")
    seen: set[tuple[tuple[int, ...], int]] = set()
    out: list[dict[str, Any]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise ValueError(f"could not draw {n} distinct countdown problems (got {len(out)})")
        numbers = tuple(rng.randint(LOW, HIGH) for _ in range(COUNT))
        targets = sorted(
            int(v)
            for v in reachable(tuple(sorted(numbers)))
            if v.denominator == 1 and TARGET_LOW <= v <= TARGET_HIGH and int(v) not in numbers
        )
        targets = [t for t in targets if is_held_out(numbers, t) == held_out]
        if not targets:
            continue
        target = rng.choice(targets)
        if (numbers, target) in seen:
            continue
        seen.add((numbers, target))
        out.append(problem(numbers, target))
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description="Write countdown problems as JSONL (prompt, answer = target, numbers, target)."
    )
    p.add_argument("out", type=Path)
    p.add_argument("--size", type=int, default=5_000, help="at most ~6,500 distinct training problems exist")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out", action="store_true", help="draw from the held-out share instead of the training share")
    args = p.parse_args()
    rows = problems(args.size, args.seed, args.held_out)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{args.out}: {len(rows)} countdown problems ({'held-out' if args.held_out else 'training'} share)")


if __name__ == "__main__":
    main()
