"""The built-in guessing game's problems (rewards/environments/guess_number.py): a secret
number in [low, high], nothing else. Seeded, no download. A fixed, seed-independent fifth of
the secrets is held out: the held-out success rate measures a search strategy, not secrets
remembered.
"""

from __future__ import annotations

import random

TASK = "guess_number"
HELD_OUT_SEED = 20260101


def prompt_text(low: int, high: int) -> str:
    return f"Guess my number between {low} and {high}. Reply with one number; I say higher or lower."


def problem(secret: int, low: int, high: int) -> dict[str, str]:
    return {"prompt": prompt_text(low, high), "answer": str(secret), "task": TASK}


def _split(low: int, high: int) -> tuple[list[int], list[int]]:
    if high - low < 4:
        raise ValueError(f"the guessing game needs at least 5 numbers, got [{low}, {high}]")
    secrets = list(range(low, high + 1))
    random.Random(HELD_OUT_SEED).shuffle(secrets)
    cut = len(secrets) // 5
    return secrets[cut:], secrets[:cut]


def train_problems(n: int, seed: int, low: int = 1, high: int = 100) -> list[dict[str, str]]:
    pool, _ = _split(low, high)
    rng = random.Random(seed)
    return [problem(rng.choice(pool), low, high) for _ in range(n)]


def held_out_problems(low: int = 1, high: int = 100) -> list[dict[str, str]]:
    _, held_out = _split(low, high)
    return [problem(secret, low, high) for secret in held_out]
