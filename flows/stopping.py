"""How `grpo run`, `grpo rescore` and `grpo serve` stop on SIGINT (Ctrl-C) and SIGTERM
(`timeout`, systemd, Kubernetes, Prefect workers).

The first signal raises `Stopped` in the main thread, where the flow runs (Prefect runs a
synchronous flow and its tasks there). `Stopped` is a BaseException, as KeyboardInterrupt
is, so no `except Exception` on its way mistakes it for a stage's error: Prefect records
the flow run as crashed (its API is still up, see flows/prefect_server.py), every
`finally` runs (the background checkpoint writer is waited for, the scoring workers are
closed, the run folder's lock is released) and an atomic write that was under way removes
its temporary file (data.store.atomic_path), so nothing half-written is left and the next
run resumes from the manifests as after any interruption (flows/resume.py).

A second signal, or a clean-up still going on STOP_GRACE_S after the first, ends the
process at once (`os._exit`): the children die with it (their parent-death signal), and
a write cut short leaves only a temporary file that the next run removes.

The exit status is the shell's for a death by that signal: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Sequence

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Long enough for the clean-up of a stop (Prefect's crash report, the last checkpoint write
# of a small model, the workers' exit); short enough that a clean-up that hangs does not
# keep a stopped run alive.
STOP_GRACE_S = 30.0


def exit_status(signum: int) -> int:
    """What a shell reports for a process killed by `signum` (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signum


class Stopped(BaseException):
    """The command was asked to stop by `signum`; `during` names the stage that was running
    (empty between stages). Derived from BaseException for the reason KeyboardInterrupt is."""

    def __init__(self, signum: int, during: str = ""):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.during = during

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class StopOnSignals:
    """Installed by the command line around one command (`with StopOnSignals(...) as stop:`).

    `describe(signum, during)` returns the one line printed when the process has to end at
    once (second signal, or a clean-up past STOP_GRACE_S); `on_exit_now()` kills what must
    not wait for its parent-death signal (the Prefect API, which is in a process group of
    its own). `during()` names the running stage at the moment of the first signal.
    """

    def __init__(
        self,
        describe: Callable[[int, str], str],
        on_exit_now: Callable[[], None] = lambda: None,
        during: Callable[[], str] = lambda: "",
        grace_s: float = STOP_GRACE_S,
    ):
        self._describe = describe
        self._on_exit_now = on_exit_now
        self._during = during
        self._grace_s = grace_s
        self._previous: dict[int, object] = {}
        self._lock = threading.Lock()
        self.first: Stopped | None = None

    def __enter__(self) -> StopOnSignals:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame) -> None:
        with self._lock:
            repeated = self.first is not None
            if not repeated:
                self.first = Stopped(signum, self._during())
        if repeated:
            self.exit_now(signum, "at once (second signal)")
        # The clean-up runs on this thread; a timer ends the process if it hangs.
        timer = threading.Timer(self._grace_s, self.exit_now, (signum, f"at once ({self._grace_s:.0f} s after it)"))
        timer.daemon = True
        timer.start()
        raise self.first

    def exit_now(self, signum: int, how: str) -> None:
        """Print the stop line, end the processes that need it, and leave without clean-up."""
        during = self.first.during if self.first is not None else ""
        self.fail_now(self._describe(signum, during) + f" [{how}]", exit_status(signum))

    def fail_now(self, line: str, status: int) -> None:
        """Print `line`, end the processes that need it, and leave with `status` without
        clean-up (from any thread: also for a failure that no clean-up can help)."""
        try:
            print(line, file=sys.stderr, flush=True)
            sys.stdout.flush()
            self._on_exit_now()
        finally:
            os._exit(status)


def resume_command(argv: Sequence[str], needed: dict[str, str]) -> str:
    """`grpo ARGS`, with each option in `needed` (e.g. {"--run-dir": "runs/x"}) added when
    `argv` lacks it: a default that would differ next time (a time-stamped run folder, a
    time-stamped tag) is written out."""
    args = list(argv)
    for flag, value in needed.items():
        if not any(a == flag or a.startswith(flag + "=") for a in args):
            args += [flag, value]
    return shlex.join(["grpo", *args])
