"""Reward worker pools are reused across score calls in one process (starting workers cost
more than scoring a small model's batch), and a pool whose block raised is not reused."""

from __future__ import annotations

import pytest

from rewards import make_reward
from rewards.pool import _SHARED, close_shared_pools, shared_pool


def _pids(pool) -> list[int]:
    return [w.proc.pid for w in pool._pool]


@pytest.fixture(autouse=True)
def _no_pools_left():
    close_shared_pools()
    yield
    close_shared_pools()


def test_the_same_rewards_get_the_same_live_workers_back():
    bound = [make_reward("exact_answer")]
    rows = [("3", {"answer": "3"}), ("4", {"answer": "5"})]
    with shared_pool(bound, 1) as pool:
        first = [o[0].value for o in pool.imap(rows)]
        pids = _pids(pool)
    with shared_pool(bound, 1) as again:
        assert again is pool and _pids(again) == pids
        assert [o[0].value for o in again.imap(rows)] == first == [1.0, 0.0]


def test_a_pool_whose_block_raised_is_closed_not_kept():
    bound = [make_reward("exact_answer")]
    with pytest.raises(RuntimeError):
        with shared_pool(bound, 1):
            raise RuntimeError("scoring failed")
    assert not _SHARED


def test_at_most_two_pools_stay():
    for name in ("exact_answer", "countdown", "format"):
        with shared_pool([make_reward(name)], 1):
            pass
    assert len(_SHARED) == 2
