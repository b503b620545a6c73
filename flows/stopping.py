"""How `grpo run`, `grpo rescore` and `grpo serve` stop on SIGINT (Ctrl-C) and SIGTERM
(`timeout`, systemd, Kubernetes, Prefect workers).

The first signal prints one line (where the command stopped, and the command that resumes
it) and raises `Stopped` in the main thread, where the flow runs (Prefect runs a
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

    At the first signal it prints the one line `describe(signum, during)` at once (where the
    command stopped, and the command that resumes it), then raises `Stopped`; the process
    exits when the clean-up is done. The line comes first because the clean-up takes a few
    seconds, and a Ctrl-C that seems ignored gets pressed again, which stops at once.
    `during()` names the running stage; `on_exit_now()` ends, on an exit without clean-up,
    the children that no parent-death signal reaches in time (the Prefect API, in a process
    group of its own).
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
        self.first: Stopped | None = None

    def __enter__(self) -> StopOnSignals:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self.on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def on_signal(self, signum: int, frame) -> None:
        """The handler of SIGINT and SIGTERM (it runs in the main thread, between two bytecodes
        of whatever that thread was doing)."""
        if self.first is not None:
            self.fail_now(f"grpo: stopped at once by a second {signal.Signals(signum).name}", exit_status(signum))
        self.first = Stopped(signum, self._during())
        again = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        _say(f"{self._describe(signum, self.first.during)} ({again} again stops at once)")
        timer = threading.Timer(
            self._grace_s,
            self.fail_now,
            (
                f"grpo: clean-up still running {self._grace_s:.0f} s after the signal: stopped at once",
                exit_status(signum),
            ),
        )
        timer.daemon = True
        timer.start()
        raise self.first

    def fail_now(self, line: str, status: int) -> None:
        """Print `line`, end the processes that need it, and leave with `status` without
        clean-up (from any thread: also for a failure that no clean-up can help)."""
        try:
            _say(line)
            self._on_exit_now()
        finally:
            os._exit(status)


def take_over_sigterm() -> None:
    """Inside a flow run: make SIGTERM stop the command the way SIGINT does.

    Prefect swaps in its own SIGTERM handler for the length of each flow run (it raises
    TerminationSignal, reports the run as crashed, then sends SIGTERM again to the
    process). Under the command line's `StopOnSignals` that handler is given back to it,
    so the stop line names the stage that was running and comes at once. Outside the
    command line (a flow run started by a Prefect worker or `grpo serve`'s runner, which
    cancels runs with SIGTERM) Prefect's handler stays: there the runner decides."""
    ours = signal.getsignal(signal.SIGINT)
    if isinstance(getattr(ours, "__self__", None), StopOnSignals):
        signal.signal(signal.SIGTERM, ours)


def _say(line: str) -> None:
    """One line on stderr, written with os.write: a signal handler may run while the main
    thread is inside a write to sys.stderr, and a buffered stream is not reentrant."""
    data = (line + "\n").encode(errors="replace")
    while data:
        data = data[os.write(2, data) :]


def resume_command(argv: Sequence[str], needed: dict[str, str]) -> str:
    """`grpo ARGS`, with each option in `needed` (e.g. {"--run-dir": "runs/x"}) added when
    `argv` lacks it: a default that would differ next time (a time-stamped run folder, a
    time-stamped tag) is written out."""
    args = list(argv)
    for flag, value in needed.items():
        if not any(a == flag or a.startswith(flag + "=") for a in args):
            args += [flag, value]
    return shlex.join(["grpo", *args])
