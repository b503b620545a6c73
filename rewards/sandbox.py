"""Run untrusted programs in a supervised child process and decide the verdict outside it.

Code written by the policy is hostile by assumption: GRPO rewards whatever makes the number
go up, and the usual in-process harnesses (``exec`` the program and the asserts together)
can be beaten from inside: an ``atexit`` hook that calls ``os._exit(0)``, a frame walk that
rewrites the harness's result, an object whose ``__eq__`` is always True. So here:

* every program runs in its own child process, forked by a per-program *supervisor*,
  which is itself forked from a clean *zygote* (``rewards/sandbox_child.py``: standard
  library only, its own session, an environment of just PATH and LANG) that each scoring
  process starts once; forking it costs a millisecond where starting Python costs 30;
* the trusted side (this module, in the scoring worker) runs the *test* code itself and
  calls the candidate's functions over a pipe: arguments go out and results come back as
  plain literals (``repr`` / ``ast.literal_eval``, never pickle), so no object made by the
  candidate reaches a comparison. A program that exits before answering (``sys.exit(0)``,
  ``os._exit(0)``, ``raise SystemExit``) simply never answers: a fail;
* stdin/stdout programs are judged from their captured output and exit status.

What the candidate process gets (each item as far as the kernel here permits; the
supervisor reports which were in force in ``RunResult.isolation``):

* rlimits: CPU seconds, address space, processes, file size, open files, no core dumps;
* a wall-clock limit, after which the whole process group is SIGKILLed, and a cap on the
  bytes it may write to stdout/stderr (exceeding it kills it at once);
* when the scorer runs as root: new mount, PID, network and IPC namespaces; a private
  ``/proc``; the root filesystem read-only; fresh size-capped tmpfs over ``/tmp``,
  ``/var/tmp``, ``/dev/shm`` and ``/run/lock``; a working directory in that tmpfs, gone with
  the namespace; and it runs as ``nobody`` (65534) with no supplementary groups and
  ``no_new_privs``, because root ignores ``RLIMIT_NPROC`` and may write anywhere;
* the supervisor is a child subreaper and sweeps every descendant after the run, and PID 1
  of the PID namespace takes the namespace down with it, so a detached grandchild cannot
  outlive the verdict.

What it does NOT protect against (read before trusting it with more than RL rewards):

* **Not a security boundary against kernel exploits.** No seccomp filter, no cgroup:
  the candidate can make any system call the kernel lets ``nobody`` make.
* **Memory is limited per process, not in total**: up to ``processes`` children of
  ``memory_mb`` each; a determined fork-plus-allocate program could pressure the host's RAM
  before the wall clock ends it. Lower ``processes`` or add a cgroup for hard limits.
* **Reading is not restricted**: any world-readable file (system files, the project's
  source, a dataset or run folder with world-readable permissions) can be read. Keep run
  folders private (``chmod 700``) so gold answers and test code cannot be looked up.
* **World-writable Unix sockets** (``/dev/log``) remain connectable, and ``/dev`` devices
  writable by everyone (``/dev/null``, ``/dev/tty``) remain writable.
* **Without root** (or when the kernel refuses namespaces) the fallback is weaker: no
  network isolation, writes to world-writable folders such as ``/tmp`` are possible, the
  candidate runs as the scorer's own user and could signal the scorer's processes, and
  detached processes are swept only if the supervisor itself survives. The working folder
  is then a host temp folder deleted after the run.
* **Timing side channels and CPU contention** between concurrent sandboxes.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewards.sandbox_child import encode_literal

SUPERVISOR = Path(__file__).with_name("sandbox_child.py")
SANDBOX_USER = 65534  # nobody / nogroup on Debian-style systems
SANDBOX_GROUP = 65534
# The only environment the supervisor (and so the candidate) starts with: nothing inherited.
_CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
# Start-up, clean-up and the result hand-over, on top of the candidate's own wall clock.
_SUPERVISOR_GRACE_S = 10.0
MAX_REPLY_BYTES = 8 << 20  # one function result from the candidate
# The supervisor starts with -S (site processing costs more than the rest of its start-up);
# it gets the site-packages folders as plain paths instead, without running .pth hooks.
_SITE_PACKAGES = [p for p in sys.path if p.endswith("-packages") and os.path.isdir(p)]


class SandboxError(RuntimeError):
    """The sandbox itself failed: an infrastructure problem, never the candidate's verdict."""


class SessionBroken(BaseException):
    """The candidate process stopped answering (exited, timed out, sent garbage).

    A ``BaseException`` so that test code's ``except Exception`` cannot swallow it and go on
    to pass without the candidate.
    """


class CandidateError(Exception):
    """The candidate raised an exception that is not a built-in type (named in the message)."""


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: float | None = None  # default: the wall-clock limit
    memory_mb: int = 1024  # address space per process
    processes: int = 32  # for the sandbox user, counted system-wide by the kernel
    file_mb: int = 16  # largest file it may write
    open_files: int = 64
    output_bytes: int = 1 << 20  # per stream (stdout, stderr)
    tmpfs_mb: int = 64  # each private tmpfs (the working folder lives in /tmp)


@dataclass(frozen=True)
class RunResult:
    exit_code: int | None
    signal: int | None
    timed_out: bool
    output_limited: bool
    stdout: bytes
    stderr: bytes
    duration_s: float
    isolation: tuple[str, ...]  # namespaces in force, e.g. ("mount", "pid", "net", "ipc")
    user: int
    leftover_processes: int  # descendants still alive after the program ended, then killed

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.output_limited


@dataclass(frozen=True)
class Isolation:
    """How to isolate: namespaces when permitted, and the user to run as when root."""

    namespaces: bool = True
    user: int = SANDBOX_USER
    group: int = SANDBOX_GROUP
    # Interpreter for the supervisor and the candidate; default: the scorer's own. Without a
    # mount namespace it must be readable by `user` (a pyenv under /root is not).
    python: str | None = None


def run_script(source: str, stdin: bytes = b"", limits: Limits = Limits(), isolation: Isolation = Isolation()) -> RunResult:
    """Run `source` as a program with `stdin`; return its exit status and captured output."""
    return _collect(_launch("script", source, limits, isolation, stdin=stdin))


class Session:
    """One candidate process that has run the program and answers calls to its functions.

    ``ready`` is False when the program never got to answering (syntax error, exception
    or exit at import time, timeout); ``failure`` then says why. Use as a context manager.
    """

    def __init__(self, source: str, limits: Limits = Limits(), isolation: Isolation = Isolation()):
        req_r, self._req_w = os.pipe()
        self._resp_r, resp_w = os.pipe()
        try:
            self._run = _launch("serve", source, limits, isolation, call_fds=(req_r, resp_w))
        except BaseException:
            os.close(self._req_w)
            os.close(self._resp_r)
            raise
        finally:
            os.close(req_r)
            os.close(resp_w)
        self.deadline = self._run.deadline
        self._buffer = b""
        self.failure: str | None = None
        self.names: list[str] = []
        self.calls = 0
        self.result: RunResult | None = None
        reply = self._receive()
        if reply is not None:
            if isinstance(reply, tuple) and len(reply) == 2 and reply[0] == "ready" and isinstance(reply[1], list):
                self.names = [n for n in reply[1] if isinstance(n, str)]
            else:
                self._fail(f"expected the ready message, got {reply!r:.200}")

    @property
    def ready(self) -> bool:
        return self.failure is None

    def function(self, name: str) -> Callable[..., Any]:
        """A stand-in for the candidate's function `name` that trusted code may call."""

        def call(*args: Any, **kwargs: Any) -> Any:
            return self.call(name, args, kwargs)

        call.__name__ = call.__qualname__ = name
        return call

    def call(self, name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None) -> Any:
        if self.failure is not None:
            raise SessionBroken(self.failure)
        try:
            request = encode_literal((name, tuple(args), dict(kwargs or {})))
        except (TypeError, ValueError) as err:
            # The test passes something that is not plain data: a limit of this harness.
            raise ValueError(f"cannot send the arguments of {name}() to the sandbox: {err}") from None
        self.calls += 1
        try:
            _write_all(self._req_w, request.encode() + b"\n")
        except BrokenPipeError:
            self._fail("the program exited before answering")
        reply = self._receive()
        if reply is None:
            raise SessionBroken(self.failure)
        if isinstance(reply, tuple) and len(reply) == 2 and reply[0] == "ok":
            return reply[1]
        if isinstance(reply, tuple) and len(reply) == 3 and reply[0] == "raise":
            _, kind, message = reply
            builtin = getattr(builtins, str(kind), None)
            if isinstance(builtin, type) and issubclass(builtin, Exception):
                raise builtin(message)
            raise CandidateError(f"{kind}: {message}")
        if isinstance(reply, tuple) and len(reply) == 2 and reply[0] == "unsendable":
            raise CandidateError(f"{name}() returned a value that is not plain data: {reply[1]}")
        self._fail(f"malformed reply {reply!r:.200}")
        raise SessionBroken(self.failure)

    def close(self) -> RunResult:
        """End the session (the program sees EOF and exits); return the run's outcome."""
        if self.result is None:
            os.close(self._req_w)
            try:
                self.result = _collect(self._run)
            finally:
                os.close(self._resp_r)
        return self.result

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why

    def _receive(self) -> Any:
        """The next reply as a literal, or None (and ``failure`` set) if none came in time."""
        while b"\n" not in self._buffer:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self._fail("the program ran past its wall-clock limit")
                return None
            if not select.select([self._resp_r], [], [], remaining)[0]:
                continue
            chunk = os.read(self._resp_r, 1 << 16)
            if not chunk:
                self._fail("the program exited before answering")
                return None
            self._buffer += chunk
            if len(self._buffer) > MAX_REPLY_BYTES:
                self._fail(f"a reply exceeded {MAX_REPLY_BYTES} bytes")
                return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            return ast.literal_eval(line.decode())
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError, UnicodeDecodeError):
            self._fail(f"a reply was not a plain literal: {line[:200]!r}")
            return None


@dataclass
class _Run:
    """A supervisor at work: its pid (= its process group) and the pipes it reports on."""

    pid: int
    result_r: int
    diag_r: int
    deadline: float


def _launch(
    mode: str,
    source: str,
    limits: Limits,
    isolation: Isolation,
    *,
    stdin: bytes = b"",
    call_fds: tuple[int, int] | None = None,
) -> _Run:
    config = {
        "mode": mode,
        "source": source,
        "wall_s": limits.wall_s,
        "cpu_s": limits.cpu_s if limits.cpu_s is not None else limits.wall_s,
        "memory_bytes": limits.memory_mb << 20,
        "processes": limits.processes,
        "file_bytes": limits.file_mb << 20,
        "open_files": limits.open_files,
        "output_bytes": limits.output_bytes,
        "tmpfs_bytes": limits.tmpfs_mb << 20,
        "namespaces": isolation.namespaces,
        "site_packages": _SITE_PACKAGES if isolation.python in (None, sys.executable) else [],
        "uid": isolation.user,
        "gid": isolation.group,
    }
    # Config and stdin travel in memory files: no size limit as with a message, no disk,
    # and writing them cannot block on a program that never reads its input.
    config_fd = _memory_file("grpoflow-sandbox-config", json.dumps(config).encode())
    stdin_fd = _memory_file("grpoflow-sandbox-stdin", stdin)
    result_r, result_w = os.pipe()
    diag_r, diag_w = os.pipe()
    try:
        fds = [config_fd, stdin_fd, result_w, diag_w, *(call_fds or ())]
        pid = _spawn_supervisor(isolation.python or sys.executable, fds)
    except BaseException:
        os.close(result_r)
        os.close(diag_r)
        raise
    finally:
        for fd in (config_fd, stdin_fd, result_w, diag_w):
            os.close(fd)
    return _Run(pid, result_r, diag_r, time.monotonic() + limits.wall_s)


def _collect(run: _Run) -> RunResult:
    """Read the supervisor's report (header line, stdout, stderr) and its diagnostics."""
    deadline = run.deadline + _SUPERVISOR_GRACE_S
    chunks: dict[int, list[bytes]] = {run.result_r: [], run.diag_r: []}
    open_fds = [run.result_r, run.diag_r]
    try:
        while open_fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill_group(run.pid)
                raise SandboxError(f"the sandbox supervisor did not report within {_SUPERVISOR_GRACE_S:g}s of its limit; killed")
            for fd in select.select(open_fds, [], [], remaining)[0]:
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    chunks[fd].append(chunk)
                else:
                    open_fds.remove(fd)
    finally:
        os.close(run.result_r)
        os.close(run.diag_r)
    out = b"".join(chunks[run.result_r])
    header_line, _, rest = out.partition(b"\n")
    try:
        header = json.loads(header_line)
    except json.JSONDecodeError:
        diag = b"".join(chunks[run.diag_r]).decode(errors="replace")[-2000:]
        raise SandboxError(f"the sandbox supervisor failed without a report: {diag or 'no diagnostics'}") from None
    if header["setup_error"]:
        raise SandboxError(f"sandbox set-up failed: {header['setup_error']}")
    if header["cleanup_error"]:
        raise SandboxError(f"sandbox clean-up failed: {header['cleanup_error']}")
    split = header["stdout_bytes"]
    return RunResult(
        exit_code=header["exit_code"],
        signal=header["signal"],
        timed_out=header["timed_out"],
        output_limited=header["output_limited"],
        stdout=rest[:split],
        stderr=rest[split:],
        duration_s=header["duration_s"],
        isolation=tuple(header["isolation"]),
        user=header["user"],
        leftover_processes=header["leftover_processes"],
    )


class _Zygote:
    """The long-lived, clean process that forks one supervisor per program (see sandbox_child).

    One per scoring process and interpreter. It exits when this process closes the socket
    (or dies); a dead one is replaced on the next request.
    """

    def __init__(self, python: str):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [python, "-I", "-S", str(SUPERVISOR), "--zygote", str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                env=_CLEAN_ENV,
                cwd="/",
                start_new_session=True,
            )
        except OSError as err:
            ours.close()
            raise SandboxError(f"could not start the sandbox zygote with {python}: {err}") from err
        finally:
            theirs.close()
        self.sock = ours
        self.owner = os.getpid()

    def alive(self) -> bool:
        return self.owner == os.getpid() and self.proc.poll() is None

    def spawn(self, fds: list[int]) -> int:
        """Hand `fds` over; return the new supervisor's pid."""
        socket.send_fds(self.sock, [b"run"], fds)
        reply = b""
        while len(reply) < 8:
            chunk = self.sock.recv(8 - len(reply))
            if not chunk:
                raise ConnectionError("the sandbox zygote closed its socket")
            reply += chunk
        return struct.unpack("!q", reply)[0]


_ZYGOTES: dict[str, _Zygote] = {}
_ZYGOTE_LOCK = threading.Lock()


def _spawn_supervisor(python: str, fds: list[int]) -> int:
    # Threads share one zygote per interpreter; the lock covers the hand-over, not the runs.
    with _ZYGOTE_LOCK:
        zygote = _ZYGOTES.get(python)
        if zygote is None or not zygote.alive():
            zygote = _ZYGOTES[python] = _Zygote(python)
        try:
            return zygote.spawn(fds)
        except OSError as err:
            raise SandboxError(f"the sandbox zygote is gone ({err}); the next run starts a new one") from err


def _memory_file(name: str, payload: bytes) -> int:
    fd = os.memfd_create(name)
    _write_all(fd, payload)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
