"""A custom reward for tests/test_score.py, loaded by import path in the scoring workers.

It lives apart from the tests so that a worker importing it does not import pytest and
Prefect too (seconds per worker start, and the hang test starts a replacement worker).
"""

from __future__ import annotations

import time


def hang_on_request(completion: str, example, *, seconds: float = 60.0) -> float:
    """1.0, except that it busy-loops (nothing a signal could cut short) on "hang"."""
    if completion == "hang":
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
    return 1.0
