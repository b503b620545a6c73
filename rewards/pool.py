"""Score rows with rewards in worker processes, killing and replacing any that overruns.

Why processes, and why this small pool of our own:

* A time limit must hold in any thread (Prefect runs tasks in worker threads, where
  ``signal.alarm`` raises) and must hold when sympy is busy inside C code, where no signal
  handler runs. Only killing the process that runs the reward is certain.
* ``multiprocessing.Pool`` and ``ProcessPoolExecutor`` cannot kill one stuck worker: the
  first loses track of the task, the second breaks the whole pool. Here each worker has
  its own pipe, reports every (row, reward) result as it goes, and the parent knows which
  call is running and since when. When that call passes its reward's ``time_limit_s``,
  the worker is SIGKILLed, the call gets NaN and the error text, a fresh worker takes over
  the rest of the task, and nothing else is lost.
* Workers are fresh interpreters (``python -m rewards.pool``) talking over their own
  pipes. Forking the caller is unsafe from a thread, and multiprocessing's spawn and
  forkserver re-run the caller's main script in every worker (for the ``grpo`` CLI: torch,
  transformers and Prefect, seconds and hundreds of MB per worker). A fresh worker imports
  only the rewards it runs, plus math-verify, in well under a second.

Results come back in input order while the input is read lazily, so memory stays bounded
by a window of rows, whatever the number of rows.

What a worker sends back travels as JSON lines, never pickle: a worker runs candidate
programs' tests, and nothing that such a process writes may be able to run code here when
read (``_read_message`` only parses numbers and strings). The tasks going out are pickled:
only this process writes them, into a pipe no candidate can reach (the sandbox hides every
trusted process, see ``rewards/sandbox``).
"""

from __future__ import annotations

import atexit
import ctypes
import importlib
import json
import math
import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from multiprocessing.connection import Connection
from typing import Any

from rewards.registry import BoundReward, Explained

PR_SET_PDEATHSIG = 1
# Imported by every worker before it reports ready, so that the first math row does not
# pay math-verify's half-second import inside its time limit.
_WARM_IMPORTS = ("math_verify",)


@dataclass(frozen=True)
class Outcome:
    """One reward on one row: the value, or NaN and the error text."""

    value: float
    error: str | None = None


# (completion, example) or (completion, example, extra): `extra` (per-row fields such as
# completion_tokens) is merged over the shared example in the worker, so an example shared
# by a group of completions crosses the pipe once per task, not once per row.
Row = tuple[str, Mapping[str, Any]] | tuple[str, Mapping[str, Any], Mapping[str, Any]]


@dataclass
class _Task:
    id: int
    first_row: int  # global index of rows[0]
    rows: list[tuple[str, int, Mapping[str, Any] | None]]  # (completion, example key, extra)
    examples: dict[int, Mapping[str, Any]]
    start: int = 0  # pairs (row, reward) already done before this task began


class _Worker:
    """One worker process and the two pipe ends we talk to it through."""

    def __init__(self, rewards: Sequence[BoundReward], memory_mb: int | None):
        # The worker finds `rewards` (and any custom reward module) where this process did.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rewards.pool"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            # Out of the terminal's Ctrl-C (sent to the caller's whole process group): a worker
            # killed by it would cost its rows a NaN reward before the caller stops. It stops
            # when the caller closes it, or dies with it (PR_SET_PDEATHSIG below).
            process_group=0,
        )
        self.send_conn = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self.fd = os.dup(self.proc.stdout.fileno())  # JSON lines from the worker (_read_message)
        self.buffer = b""
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.send_conn.send((list(rewards), memory_mb))
        self.ready = False
        self.task: _Task | None = None
        self.pair = 0  # the (row, reward) pair running now, counted within the task's rows
        self.since = 0.0  # when that pair started (as seen from here)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.send_conn.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def messages(self) -> list[Any]:
        """The complete messages that have arrived (call when the pipe is readable).

        Raises EOFError when the worker closed its end. A line that is not a well-formed
        message raises ``_BadMessage``: the worker is then treated as dead.
        """
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            raise EOFError
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        if len(self.buffer) > _MAX_MESSAGE:
            raise _BadMessage("a message from the worker exceeded the size limit")
        return [_read_message(line) for line in lines]


class RewardPool:
    """`workers` processes applying `rewards` to rows; use as a context manager.

    ``memory_mb`` caps each worker's address space (a reward that builds a huge number
    gets MemoryError, an error on its row, instead of taking the machine's RAM).
    """

    def __init__(
        self,
        rewards: Sequence[BoundReward],
        workers: int | None = None,
        *,
        memory_mb: int | None = 4096,
        task_rows: int = 8,
        window_rows: int = 1024,
    ):
        if not rewards:
            raise ValueError("RewardPool needs at least one reward")
        self.rewards = list(rewards)
        self.workers = workers or len(os.sched_getaffinity(0))
        self.memory_mb = memory_mb
        self.task_rows = task_rows
        self.window_rows = max(window_rows, task_rows * self.workers * 2)
        self.timeouts = 0  # calls killed at their time limit
        self.deaths = 0  # workers that died by themselves (crash, os._exit in a reward)
        self._pool = [_Worker(self.rewards, memory_mb) for _ in range(self.workers)]
        self._task_ids = 0

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._pool:
            try:
                worker.send_conn.send(None)  # it exits once done with what it is doing
            except OSError:
                pass  # already gone
        deadline = time.monotonic() + 2.0
        for worker in self._pool:
            if not worker.ready:
                worker.kill()  # still starting up: nothing of it to wait for
                continue
            try:
                worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            worker.kill()
        self._pool = []

    def score(self, rows: Iterable[Row]) -> list[list[Outcome]]:
        return list(self.imap(rows))

    def imap(self, rows: Iterable[Row]) -> Iterator[list[Outcome]]:
        """Yield, for each row in order, one Outcome per reward."""
        source = iter(rows)
        exhausted = False
        queue: deque[_Task] = deque()
        results: dict[int, list[Outcome | None]] = {}
        read = done = 0  # rows taken from `source`; rows yielded
        n_rewards = len(self.rewards)
        try:
            while True:
                while not exhausted and len(queue) < 2 * self.workers and read - done < self.window_rows:
                    batch = list(islice(source, self.task_rows))
                    if not batch:
                        exhausted = True
                        break
                    queue.append(self._task(read, batch))
                    for index in range(read, read + len(batch)):
                        results[index] = [None] * n_rewards
                    read += len(batch)
                for worker in self._pool:
                    if worker.ready and worker.task is None and queue:
                        self._dispatch(worker, queue.popleft())
                while done < read and None not in results[done]:
                    yield results.pop(done)  # type: ignore[misc]
                    done += 1
                if exhausted and done == read:
                    return
                if not exhausted and not queue and all(w.ready and w.task is None for w in self._pool):
                    # Nothing in flight: the window was full (a slow row held `done` back while
                    # the other workers finished the rest) and has just been yielded. Read on;
                    # waiting here would wait for results that no worker is computing.
                    continue
                self._wait(queue, results)
        finally:
            # Abandoned half-way (the caller stopped, or an error): busy workers hold stale tasks.
            for index, worker in enumerate(self._pool):
                if worker.task is not None:
                    worker.kill()
                    self._pool[index] = _Worker(self.rewards, self.memory_mb)

    def _task(self, first_row: int, batch: list[Row]) -> _Task:
        self._task_ids += 1
        examples: dict[int, Mapping[str, Any]] = {}
        rows = []
        for row in batch:
            completion, example = row[0], row[1]
            examples.setdefault(id(example), example)
            rows.append((completion, id(example), row[2] if len(row) > 2 else None))
        return _Task(self._task_ids, first_row, rows, examples)

    def _dispatch(self, worker: _Worker, task: _Task) -> None:
        worker.task, worker.pair, worker.since = task, task.start, time.monotonic()
        worker.send_conn.send((task.id, task.start, task.examples, task.rows))

    def _wait(self, queue: deque[_Task], results: dict[int, list[Outcome | None]]) -> None:
        now = time.monotonic()
        deadlines = [w.since + self._limit(w.pair) for w in self._pool if w.task is not None]
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        by_fd = {w.fd: w for w in self._pool}
        for fd in select.select(list(by_fd), [], [], timeout)[0]:
            worker = by_fd[fd]
            try:
                messages = worker.messages()
            except (EOFError, OSError, _BadMessage) as err:
                if not worker.ready:
                    # Dying before it ever worked (a reward module it cannot import): a
                    # replacement would die the same way, forever.
                    raise RuntimeError(
                        f"a scoring worker failed to start (exit status {worker.proc.wait()}); "
                        "its error output is above"
                    ) from None
                self.deaths += 1
                if isinstance(err, _BadMessage):
                    why = f"the scoring worker sent a malformed message ({err}); killed"
                else:
                    why = f"the scoring worker died (exit status {worker.proc.wait()})"
                self._replace(worker, queue, results, why)
                continue
            for message in messages:
                if message == ["ready"]:
                    worker.ready = True
                    continue
                task_id, pair, value, error = message
                task = worker.task
                if task is None or task_id != task.id or pair != worker.pair:
                    raise RuntimeError(
                        f"scoring worker out of step: sent {(task_id, pair)}, expected "
                        f"{(task and task.id, worker.pair)}"
                    )
                row, reward = divmod(pair, len(self.rewards))
                results[task.first_row + row][reward] = Outcome(value, error)
                worker.pair, worker.since = pair + 1, time.monotonic()
                if worker.pair == len(task.rows) * len(self.rewards):
                    worker.task = None
        now = time.monotonic()
        for worker in list(self._pool):
            if worker.task is not None and now - worker.since > self._limit(worker.pair):
                self.timeouts += 1
                limit = self._limit(worker.pair)
                why = f"exceeded its time limit of {limit:g}s; the scoring worker was killed"
                self._replace(worker, queue, results, why)

    def _limit(self, pair: int) -> float:
        return self.rewards[pair % len(self.rewards)].time_limit_s

    def _replace(self, worker: _Worker, queue: deque[_Task], results, why: str) -> None:
        """Record `why` for the call `worker` was running; requeue the rest of its task."""
        task = worker.task
        worker.kill()
        self._pool[self._pool.index(worker)] = _Worker(self.rewards, self.memory_mb)
        if task is None:
            return
        row, reward = divmod(worker.pair, len(self.rewards))
        results[task.first_row + row][reward] = Outcome(math.nan, f"{self.rewards[reward].name}: {why}")
        following = worker.pair + 1
        first_row = following // len(self.rewards)
        if first_row < len(task.rows):
            self._task_ids += 1
            rest = _Task(
                self._task_ids,
                task.first_row + first_row,
                task.rows[first_row:],
                task.examples,
                start=following - first_row * len(self.rewards),
            )
            queue.appendleft(rest)


_MAX_MESSAGE = 1 << 20  # one result line: two numbers and an error text of at most 4000 chars


class _BadMessage(ValueError):
    """A line from a worker that is not a message of the protocol."""


def _read_message(line: bytes) -> list[Any]:
    """``["ready"]`` or ``[task_id, pair, value, error]`` from one JSON line, checked."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as err:
        raise _BadMessage(f"not JSON: {err}") from None
    if message == ["ready"]:
        return message
    if (
        isinstance(message, list)
        and len(message) == 4
        and all(type(v) is int for v in message[:2])
        and type(message[2]) in (int, float)
        and (message[3] is None or type(message[3]) is str)
    ):
        return [message[0], message[1], float(message[2]), message[3]]
    raise _BadMessage(f"unexpected message {line[:200]!r}")


def _send_message(fd: int, message: list[Any]) -> None:
    data = json.dumps(message).encode() + b"\n"  # NaN is written as NaN, which json reads back
    while data:
        data = data[os.write(fd, data) :]


def _worker_main() -> None:
    """A worker: read the rewards, then tasks, from stdin; send one result per call."""
    inbox = Connection(0, writable=False)
    outbox = os.dup(1)
    os.dup2(2, 1)  # a reward that prints must not write into the result stream
    # Die with the scorer: a worker stuck in a reward would otherwise outlive the run.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    rewards, memory_mb = inbox.recv()
    if memory_mb:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    for module in _WARM_IMPORTS:
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # only a warm-up: a reward that needs it reports the error on its rows
    _send_message(outbox, ["ready"])
    while True:
        try:
            message = inbox.recv()
        except EOFError:
            return
        if message is None:
            return
        task_id, start, examples, rows = message
        for pair in range(start, len(rows) * len(rewards)):
            row, index = divmod(pair, len(rewards))
            completion, key, extra = rows[row]
            example = examples[key] if extra is None else {**examples[key], **extra}
            _send_message(outbox, [task_id, pair, *_apply(rewards[index], completion, example)])


def _apply(reward: BoundReward, completion: str, example: Mapping[str, Any]) -> tuple[float, str | None]:
    """(value, None); (value, why) for an ``Explained`` value; (NaN, error) when it raised."""
    try:
        result = reward(completion, example)
        value = float(result)
    except Exception as err:  # a reward bug costs its row (NaN + text), never the stage
        return math.nan, f"{reward.name}: {type(err).__name__}: {err}"[:4000]
    if not math.isfinite(value):
        return math.nan, f"{reward.name}: returned {value}"
    why = result.why if isinstance(result, Explained) else None
    return value, (f"{reward.name}: {why}"[:4000] if why else None)


if __name__ == "__main__":
    _worker_main()


# Pools kept alive across calls in one process, keyed by what their workers were started
# with. Starting a pool's workers (fresh interpreters importing the rewards and math-verify)
# cost 0.7-4 s per call on 2 busy cores: for a small model that was half of a whole GRPO
# iteration, paid again by every score stage and evaluation. `imap` leaves a pool ready for
# the next call (abandoned tasks are killed and their workers replaced), so it can be reused.
_SHARED: dict[tuple, RewardPool] = {}
_MAX_SHARED = 2  # the score stage's and the evaluation's; older ones are closed


@contextmanager
def shared_pool(
    rewards: Sequence[BoundReward], workers: int | None = None, *, memory_mb: int | None = 4096
) -> Iterator[RewardPool]:
    """A `RewardPool` for `rewards` that outlives the `with` block, for the next call with
    the same rewards, workers and memory cap. A pool whose block raised is closed, not kept."""
    key = (repr(list(rewards)), workers, memory_mb)
    pool = _SHARED.pop(key, None)
    if pool is None:
        pool = RewardPool(rewards, workers, memory_mb=memory_mb)
    try:
        yield pool
    except BaseException:
        pool.close()
        raise
    _SHARED[key] = pool  # most recently used last
    while len(_SHARED) > _MAX_SHARED:
        _SHARED.pop(next(iter(_SHARED))).close()


@atexit.register
def close_shared_pools() -> None:
    while _SHARED:
        _SHARED.popitem()[1].close()
