"""Re-scoring a large file must not hang: the reward pool, once a slow row has let the
other workers fill the whole read-ahead window, reads on instead of waiting for results
that no worker is computing (a deadlock seen at ~300k rows of the re-scoring benchmark)."""

from __future__ import annotations

import threading
import time

from rewards import make_reward
from rewards.pool import RewardPool


def slow_first_row(completion: str, example) -> float:
    if completion == "0":
        time.sleep(1.0)  # the straggler: the other worker finishes the window meanwhile
    return float(completion)


def test_a_straggler_that_fills_the_window_does_not_stall_the_pool():
    rows = [(str(i), {}) for i in range(40)]
    outcomes: list = []

    def score() -> None:
        with RewardPool(
            [make_reward("tests.test_rescore_pool:slow_first_row")],
            workers=2,
            task_rows=1,
            window_rows=4,
            memory_mb=None,
        ) as pool:
            outcomes.extend(o[0].value for o in pool.imap(rows))

    worker = threading.Thread(target=score, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), f"the pool stalled after {len(outcomes)} of {len(rows)} rows"
    assert outcomes == [float(i) for i in range(40)]
