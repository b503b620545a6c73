"""The sandbox supervisor: the only code that stands between the scorer and untrusted code.

``rewards/sandbox.py`` starts this file once per scoring process as a *zygote*
(``python -I -S sandbox_child.py --zygote <socket-fd>``), in a new session with a scrubbed
environment. It is written against the standard library alone and never sees test code,
gold answers or other rows: everything below is forked from it, the candidate included,
and inherits its memory. For each program the scorer sends it file descriptors (the
config in a memory file, stdin, the result pipe, the call pipes); it forks a *supervisor*
for that one program and answers with the supervisor's pid. Forking an interpreter that
has already started and imported what candidates commonly use costs about a millisecond;
starting one costs 30.

The supervisor, for its one program:

1. makes itself a *child subreaper*, so any process the candidate detaches is re-parented
   to it and not to init, where it could outlive the verdict;
2. when it runs as root, moves into new mount, PID, network and IPC namespaces (each one
   separately, keeping those the kernel permits and reporting the rest);
3. forks the candidate process, which (still trusted code) mounts a private ``/proc``,
   fresh size-capped tmpfs over the world-writable folders, makes the root filesystem
   read-only for itself, enters a fresh working directory, sets its rlimits, drops to the
   unprivileged user, and only then runs the candidate's code;
4. drains the candidate's stdout/stderr with a size cap and enforces the wall-clock limit,
   then kills whatever is left: PID 1 of the namespace (the kernel then kills every other
   process in it), its process group, and every remaining descendant it can find;
5. writes one JSON line with the outcome, then the captured stdout and stderr bytes.

In ``serve`` mode the candidate, after running the program, answers function calls over
two pipes: one request line ``repr((name, args, kwargs))`` in, one reply line out. Both
sides encode plain literals only (``encode_literal``) and parse with ``ast.literal_eval``,
so no object made by the candidate ever reaches the scorer.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import select
import signal
import socket
import struct
import sys
import time

# Linux constants (sched.h, mount.h, prctl.h); Python 3.11 has no os.unshare.
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

NAMESPACES = (("mount", CLONE_NEWNS), ("pid", CLONE_NEWPID), ("net", CLONE_NEWNET), ("ipc", CLONE_NEWIPC))
# Folders every user may write to on a stock Linux root filesystem; each gets a private tmpfs.
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
SANDBOX_WORKDIR = "/tmp/work"  # inside the private /tmp tmpfs when the mount namespace is on
SETUP_FAILED = 125  # exit status of a candidate process whose set-up (trusted code) failed
MAX_LINE = 16 << 20  # largest request the candidate side accepts, in bytes
REQ_FD, RESP_FD = 3, 4  # where the call pipes sit in the supervisor and the candidate
# Imported once by the zygote, so that candidates (forked from it) find them loaded: the
# modules HumanEval/MBPP-style programs import, and what the serve loop itself needs.
PRELOAD = (
    "ast", "bisect", "builtins", "collections", "copy", "fractions", "functools", "hashlib",
    "heapq", "itertools", "math", "operator", "random", "re", "statistics", "string",
    "traceback", "typing",
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, value, 0, 0, 0), f"prctl({option})")


# --- plain-literal wire format (shared with rewards/sandbox.py) ---------------------------


def encode_literal(value, _depth: int = 0) -> str:
    """``repr`` restricted to values ``ast.literal_eval`` reads back equal.

    Infinite floats become ``1e999``; NaN and any non-literal type raise ``TypeError``:
    across the sandbox boundary only data travels, never objects with behaviour.
    """
    if _depth > 100:
        raise TypeError("value nested deeper than 100 levels")
    kind = type(value)
    if value is None or kind in (bool, int, str, bytes):
        return repr(value)
    if kind is float:
        if math.isnan(value):
            raise TypeError("NaN cannot be sent across the sandbox boundary")
        if math.isinf(value):
            return "1e999" if value > 0 else "-1e999"
        return repr(value)
    if kind is complex:
        if not (math.isfinite(value.real) and math.isfinite(value.imag)):
            raise TypeError("a complex number with an infinite or NaN part cannot be sent")
        return repr(value)
    if kind is list:
        return "[" + ", ".join(encode_literal(v, _depth + 1) for v in value) + "]"
    if kind is tuple:
        inner = ", ".join(encode_literal(v, _depth + 1) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if kind is dict:
        items = (f"{encode_literal(k, _depth + 1)}: {encode_literal(v, _depth + 1)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if kind in (set, frozenset):
        if not value:
            return "set()"
        return "{" + ", ".join(encode_literal(v, _depth + 1) for v in value) + "}"
    raise TypeError(f"a {kind.__name__} is not a plain literal value")


# --- supervisor ---------------------------------------------------------------------------


def zygote(sock_fd: int) -> None:
    """Fork one supervisor per request until the scorer closes the socket."""
    sock = socket.socket(fileno=sock_fd)
    # Supervisors are reaped by the kernel; each one resets this for its own children.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    for module in PRELOAD:
        __import__(module)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 16, 8)
        except OSError:
            return
        if not message:
            return  # the scorer is gone
        pid = os.fork()
        if pid == 0:
            try:
                sock.close()
                code = _supervise(fds)
            except BaseException:  # the scorer sees a missing result and reports it
                import traceback

                traceback.print_exc()
                code = 1
            os._exit(code)
        for fd in fds:
            os.close(fd)
        sock.sendall(struct.pack("!q", pid))


def _supervise(fds: list[int]) -> int:
    """One program: place the received descriptors, then supervise the run."""
    os.setsid()  # its own session and process group, killable as one by the scorer
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    config_fd, stdin_fd, result_fd, diag_fd, *call_fds = fds
    with os.fdopen(config_fd, "rb") as fh:
        config = json.loads(fh.read())
    # Park everything above the low numbers first, so that no dup2 overwrites a source.
    parked = [fcntl_dup_high(fd) for fd in (stdin_fd, result_fd, diag_fd, *call_fds)]
    for fd in (stdin_fd, result_fd, diag_fd, *call_fds):
        os.close(fd)
    for target, fd in zip((0, 1, 2, REQ_FD, RESP_FD), parked):
        os.dup2(fd, target)
        os.close(fd)
    if call_fds:
        config["req_fd"], config["resp_fd"] = REQ_FD, RESP_FD
    run(config)
    return 0


def fcntl_dup_high(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100)


def run(config: dict) -> None:
    """Supervise one program as `config` describes; write the outcome to stdout."""
    started = time.monotonic()
    deadline = started + config["wall_s"]
    _prctl(PR_SET_CHILD_SUBREAPER, 1)

    isolation, refused = [], {}
    privileged = os.geteuid() == 0
    if config["namespaces"] and privileged:
        for name, flag in NAMESPACES:
            if _libc.unshare(flag) == 0:
                isolation.append(name)
            else:
                refused[name] = os.strerror(ctypes.get_errno())
    host_workdir = None
    sys.path.extend(config["site_packages"])  # started with -S: plain folders, no .pth hooks
    if "mount" not in isolation:
        # No private tmpfs: a fresh folder on the host, owned by the sandbox user, removed below.
        import tempfile

        host_workdir = tempfile.mkdtemp(prefix="grpoflow-sandbox-")
        if privileged and config["uid"] is not None:
            os.chown(host_workdir, config["uid"], config["gid"])

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    status_r, status_w = os.pipe()
    keep = [out_w, err_w, status_w] + [fd for fd in (config.get("req_fd"), config.get("resp_fd")) if fd is not None]
    pid = os.fork()
    if pid == 0:  # the candidate process: never return into the supervisor's code
        _candidate_process(config, isolation, host_workdir, out_w, err_w, status_w)
    for fd in keep:
        os.close(fd)

    outcome = _watch(pid, deadline, config, out_r, err_r)
    setup_error = _read_all(status_r).decode(errors="replace")
    cleanup_error = None
    if outcome["header"].pop("survivors"):
        cleanup_error = "processes of the program survived the sweep"
    if host_workdir is not None:
        import shutil

        try:
            shutil.rmtree(host_workdir)
        except OSError as err:
            cleanup_error = f"could not remove {host_workdir}: {err}"
    header = {
        **outcome["header"],
        "setup_error": setup_error or None,
        "cleanup_error": cleanup_error,
        "isolation": isolation,
        "refused": refused,
        "user": config["uid"] if privileged else os.geteuid(),
        "duration_s": time.monotonic() - started,
    }
    try:
        sys.stdout.buffer.write(json.dumps(header).encode() + b"\n" + outcome["stdout"] + outcome["stderr"])
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        pass  # the scorer that asked is gone (killed at its own time limit); nothing to report to


def _watch(pid: int, deadline: float, config: dict, out_r: int, err_r: int) -> dict:
    """Collect the candidate's output until it exits, overruns the clock, or floods the pipes."""
    cap = config["output_bytes"]
    captured = {out_r: bytearray(), err_r: bytearray()}
    open_fds = {out_r, err_r}
    pidfd = os.pidfd_open(pid)
    timed_out = output_limited = False
    exited = False
    while not exited:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([*open_fds, pidfd], [], [], remaining)
        for fd in ready:
            if fd == pidfd:
                exited = True
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                open_fds.discard(fd)
            elif len(captured[fd]) + len(chunk) > cap:
                captured[fd] += chunk[: cap - len(captured[fd])]
                output_limited = True
            else:
                captured[fd] += chunk
        if output_limited:
            break
    # PID 1 of a PID namespace takes every process in it down with it; without the namespace
    # the process group goes too, and _reap_descendants sweeps up whatever left that group.
    for target in (lambda: os.kill(pid, signal.SIGKILL), lambda: os.killpg(pid, signal.SIGKILL)):
        try:
            target()
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    os.close(pidfd)
    leftovers, survivors = _reap_descendants()
    drain_until = time.monotonic() + 1.0
    for fd in list(open_fds):  # every writer is dead now, so this ends at EOF
        while (wait := drain_until - time.monotonic()) > 0 and select.select([fd], [], [], wait)[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            captured[fd] += chunk[: max(0, cap - len(captured[fd]))]
    for fd in (out_r, err_r):
        os.close(fd)
    exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    signal_number = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    header = {
        "exit_code": exit_code,
        "signal": signal_number,
        "timed_out": timed_out,
        "output_limited": output_limited,
        "stdout_bytes": len(captured[out_r]),
        "stderr_bytes": len(captured[err_r]),
        "leftover_processes": leftovers,
        "survivors": survivors,
    }
    return {"header": header, "stdout": bytes(captured[out_r]), "stderr": bytes(captured[err_r])}


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue  # exited while we looked
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _reap_descendants(limit_s: float = 5.0) -> tuple[int, list[int]]:
    """Kill and reap every process below this one: (how many were killed, any survivors).

    As a subreaper this process inherits every orphan the candidate leaves, so when
    ``waitpid`` reports no children, nothing the candidate started is alive. A process
    with a SIGKILL pending cannot fork any more, so the sweep converges.
    """
    killed: set[int] = set()
    give_up = time.monotonic() + limit_s
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return len(killed), []
        found = _descendants(os.getpid())
        if time.monotonic() > give_up:
            return len(killed), found
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.002)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


# --- the candidate process (forked; still trusted until _run_* starts) -------------------


def _candidate_process(config, isolation, host_workdir, out_w, err_w, status_w) -> None:
    try:
        os.setpgid(0, 0)
        if "mount" in isolation:
            _private_filesystem(config, proc="pid" in isolation)
            workdir = SANDBOX_WORKDIR
            os.mkdir(workdir, 0o700)
            if os.geteuid() == 0 and config["uid"] is not None:
                os.chown(workdir, config["uid"], config["gid"])
        else:
            workdir = host_workdir
        os.chdir(workdir)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        _close_fds_except({0, 1, 2, status_w, *(fd for fd in (config.get("req_fd"), config.get("resp_fd")) if fd)})
        _set_limits(config)
        if os.geteuid() == 0 and config["uid"] is not None:
            os.setgroups([])
            os.setresgid(config["gid"], config["gid"], config["gid"])
            os.setresuid(config["uid"], config["uid"], config["uid"])
        _prctl(PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries (su, ping, ...) cannot raise privileges
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        stdlib = os.path.dirname(os.__file__)
        if not os.access(stdlib, os.R_OK | os.X_OK):
            raise PermissionError(
                f"the sandbox user cannot read the Python standard library at {stdlib}; "
                "install Python under a world-readable prefix or allow mount namespaces"
            )
        os.environ.clear()
        os.environ.update({"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": "/tmp", "LANG": "C.UTF-8"})
    except BaseException as err:  # report set-up failures as the scorer's problem, not a verdict
        os.write(status_w, f"{type(err).__name__}: {err}".encode())
        os._exit(SETUP_FAILED)
    os.close(status_w)
    try:
        if config["mode"] == "serve":
            code = _run_serve(config["source"], config["req_fd"], config["resp_fd"])
        else:
            code = _run_script(config["source"])
    except BaseException:  # whatever the candidate did, this process ends here
        code = 1
    os._exit(code)


def _close_fds_except(keep: set[int]) -> None:
    """Close every inherited descriptor the candidate has no business holding."""
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the descriptor of the listing itself, already closed


def _private_filesystem(config: dict, proc: bool) -> None:
    """Mounts seen only by this namespace: private /proc and tmpfs, read-only root."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    if proc:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    size = f"size={config['tmpfs_bytes']},nr_inodes=4096,mode=1777"
    for folder in WORLD_WRITABLE:
        if os.path.isdir(folder):
            _mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, size)
    _expose_interpreter()
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def _expose_interpreter() -> None:
    """Make this interpreter's files reachable for the sandbox user.

    Python often lives below a folder only root may enter (``/root/.pyenv``); the candidate
    could then import nothing it has not already got. A tmpfs over that folder with just the
    interpreter's folders bind-mounted back opens them and hides everything else there.
    """
    needed = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, sys.base_exec_prefix, *sys.path) if p}
    needed = {p for p in needed if os.path.isdir(p)}
    needed = {p for p in needed if not any(p != q and p.startswith(q + os.sep) for q in needed)}
    blocked: dict[str, list[str]] = {}
    for path in sorted(needed):
        parts = path.strip(os.sep).split(os.sep)
        for depth in range(1, len(parts)):
            ancestor = os.sep + os.path.join(*parts[:depth])
            if not os.stat(ancestor).st_mode & 0o001:
                blocked.setdefault(ancestor, []).append(path)
                break
    for number, (ancestor, paths) in enumerate(sorted(blocked.items())):
        staged = []
        for index, path in enumerate(paths):
            stage = f"/tmp/.expose-{number}-{index}"
            os.mkdir(stage)
            _mount(path, stage, None, MS_BIND | MS_REC)
            staged.append((stage, path))
        _mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        for stage, path in staged:
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(stage, path, None, MS_BIND | MS_REC)
            _check(_libc.umount2(stage.encode(), MNT_DETACH), f"umount {stage}")
            os.rmdir(stage)


def _set_limits(config: dict) -> None:
    cpu = max(1, math.ceil(config["cpu_s"]))
    limits = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second on
        resource.RLIMIT_AS: (config["memory_bytes"],) * 2,
        resource.RLIMIT_NPROC: (config["processes"],) * 2,
        resource.RLIMIT_FSIZE: (config["file_bytes"],) * 2,
        resource.RLIMIT_NOFILE: (config["open_files"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, (soft, hard) in limits.items():
        _, current_hard = resource.getrlimit(which)
        if os.geteuid() != 0 and current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(which, (soft, hard))


def _run_script(source: str) -> int:
    """Run the program as ``python program.py`` would: exit status, traceback, atexit."""
    import builtins
    import traceback

    sys.argv = ["main.py"]
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(source, "main.py", "exec"), namespace)
        code = 0
    except SystemExit as stop:
        code = _exit_status(stop)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        import atexit
        import threading

        threading._shutdown()  # like interpreter exit: wait for non-daemon threads
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except SystemExit as stop:
        code = _exit_status(stop)
    except BaseException:
        code = code or 1
    return code


def _exit_status(stop: SystemExit) -> int:
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code & 0xFF
    print(stop.code, file=sys.stderr)
    return 1


def _run_serve(source: str, req_fd: int, resp_fd: int) -> int:
    """Run the program, then answer calls: ``(name, args, kwargs)`` in, literal reply out."""
    import ast
    import builtins
    import traceback

    namespace = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        exec(compile(source, "solution.py", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        return 1
    names = [n for n, v in namespace.items() if callable(v) and not n.startswith("__")][:1000]
    _send(resp_fd, ("ready", names))
    pending = b""
    while True:
        while b"\n" not in pending:
            chunk = os.read(req_fd, 1 << 16)
            if not chunk:
                return 0  # the scorer closed the session
            pending += chunk
            if len(pending) > MAX_LINE:
                return 1
        line, _, pending = pending.partition(b"\n")
        name, args, kwargs = ast.literal_eval(line.decode())
        try:
            reply = ("ok", namespace[name](*args, **kwargs))
        except Exception as err:
            reply = ("raise", type(err).__name__, str(err)[:2000])
        try:
            _send(resp_fd, reply)
        except (TypeError, ValueError, RecursionError) as err:
            _send(resp_fd, ("unsendable", str(err)[:2000]))


def _send(fd: int, message) -> None:
    data = (encode_literal(message) + "\n").encode()
    while data:
        data = data[os.write(fd, data) :]


if __name__ == "__main__":
    if sys.argv[1:2] != ["--zygote"]:
        raise SystemExit("usage: python -I -S sandbox_child.py --zygote <socket-fd>")
    zygote(int(sys.argv[2]))
