"""The killable worker pool on its own: order, crashes, start-up failures."""

from __future__ import annotations

import math
import sys
import types

import pytest

from rewards import make_reward
from rewards.pool import RewardPool
from rewards.registry import BoundReward


def test_results_come_back_in_input_order_with_one_outcome_per_reward():
    rows = [(str(i), {"answer": str(i if i % 2 else i + 1)}) for i in range(60)]
    with RewardPool([make_reward("exact_answer"), make_reward("math")], workers=2, task_rows=3) as pool:
        outcomes = list(pool.imap(iter(rows)))
    assert [[o.value for o in row] for row in outcomes] == [[float(i % 2)] * 2 for i in range(60)]


def test_a_worker_that_dies_in_a_reward_costs_that_row_only():
    crash = BoundReward("crash", exit_on_request)
    with RewardPool([crash], workers=1) as pool:
        outcomes = [o[0] for o in pool.score([("ok", {}), ("exit", {}), ("ok", {})])]
        assert pool.deaths == 1
    assert [o.value for o in outcomes][::2] == [1.0, 1.0]
    assert math.isnan(outcomes[1].value) and "died (exit status 7)" in outcomes[1].error


def test_a_worker_that_cannot_start_fails_the_pool_loudly():
    ghost = types.ModuleType("grpoflow_ghost_module")  # exists here, not in the worker
    exec("def reward(completion, example):\n    return 1.0\n", ghost.__dict__)
    sys.modules["grpoflow_ghost_module"] = ghost
    try:
        with pytest.raises(RuntimeError, match="failed to start"):
            with RewardPool([BoundReward("ghost", ghost.reward)], workers=1) as pool:
                pool.score([("x", {})])
    finally:
        del sys.modules["grpoflow_ghost_module"]


def exit_on_request(completion: str, example) -> float:
    if completion == "exit":
        import os

        os._exit(7)
    return 1.0


class _RunsCode:
    """Unpickling this runs a shell command: what a forged result would carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def write_into_the_result_pipe(completion: str, example: dict) -> float:
    """Writes a pickle into every pipe this worker may write: its result stream among them."""
    import fcntl
    import os
    import pickle
    import stat

    payload = pickle.dumps(_RunsCode(example["marker"]))
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode) and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_WRONLY:
                os.write(fd, len(payload).to_bytes(4, "big") + payload + b"\n")
        except OSError:
            pass
    return 1.0


def test_nothing_a_worker_writes_is_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    forge = BoundReward("forge", write_into_the_result_pipe)
    with RewardPool([forge], workers=1) as pool:
        outcomes = [o[0] for o in pool.score([("x", {"marker": str(marker)})])]
    assert not marker.exists()
    assert math.isnan(outcomes[0].value) and "malformed message" in outcomes[0].error
