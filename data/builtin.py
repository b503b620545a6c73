"""The built-in, procedurally generated arithmetic task (no download, fully seeded).

Problems are ``"a+b="`` with two-digit operands; the gold answer is the sum. Every one of the
100 x 100 operand pairs is a distinct problem. A fixed, seed-independent slice of them is the
held-out set and never appears in training prompts or in the supervised warm-up, so the
held-out accuracy measures generalisation, not memorisation.
"""

from __future__ import annotations

import random

HELD_OUT_SEED = 20240205  # DeepSeekMath's arXiv date: fixed so every run scores the same set
HELD_OUT_SIZE = 500
TASK = "arithmetic"


def _all_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(10, 100) for b in range(10, 100)]


def _split() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pairs = _all_pairs()
    random.Random(HELD_OUT_SEED).shuffle(pairs)
    return pairs[HELD_OUT_SIZE:], pairs[:HELD_OUT_SIZE]


def problem(a: int, b: int) -> dict[str, str]:
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "task": TASK}


def all_train_problems() -> list[dict[str, str]]:
    """Every training problem once, in a fixed order (the built-in training dataset)."""
    pool, _ = _split()
    return [problem(a, b) for a, b in pool]


def train_problems(n: int, seed: int) -> list[dict[str, str]]:
    """`n` training problems (with repetition when `n` exceeds the pool), seeded."""
    pool, _ = _split()
    rng = random.Random(seed)
    return [problem(*rng.choice(pool)) for _ in range(n)]


def held_out_problems(n: int = HELD_OUT_SIZE) -> list[dict[str, str]]:
    """The first `n` (at most 500) held-out problems; the same for every seed."""
    _, held_out = _split()
    if n > len(held_out):
        raise ValueError(f"only {len(held_out)} held-out problems exist, asked for {n}")
    return [problem(a, b) for a, b in held_out[:n]]
