"""The zygote, the per-program supervisor and the candidate process (runs outside the scorer).

``trusted.py`` starts this file once per scoring process as a *zygote*
(``python -I -S child.py --zygote <socket-fd> [site folders]``), in a new session with a
scrubbed environment. It uses the standard library plus ``pyseccomp`` (found in the given
site folders, without running their ``.pth`` hooks) and never sees test code, gold
answers or other rows: everything below is forked from it, the candidate included. For
each program the scorer sends it file descriptors (the config in a memory file, stdin,
the result pipe, the call pipes); it forks a *supervisor* for that one program and
answers with the supervisor's pid. Forking an interpreter that has already started and
imported what candidates commonly use costs about a millisecond; starting one costs 30.

The supervisor, for its one program:

1. makes itself a child subreaper (orphans of the candidate come back to it, not to init);
   a root scorer's supervisor becomes ``nobody`` first;
2. enters new user, PID, network, IPC, UTS and cgroup namespaces (``isolation.py``); where
   the kernel refuses user namespaces it goes on without, and Landlock alone hides files
   and processes;
3. forks the candidate process, which (still trusted code) builds its private root, closes
   every inherited descriptor, sets its rlimits, restricts itself with Landlock, drops
   every capability, sets no_new_privs, loads the seccomp filter (``policy.py``) and only
   then runs the candidate's code;
4. drains stdout/stderr with a size cap; every ``_TICK_S`` adds up the CPU time and the
   resident memory of all the candidate's processes and kills them all when either total
   passes its limit (a fork-and-spin or fork-and-allocate program is one budget, not one
   per process) or the wall clock runs out; then kills PID 1 of the namespace (the kernel
   takes every other process in it down too) and sweeps any descendant left;
5. writes one JSON line with the outcome, then the captured stdout and stderr bytes.

In ``serve`` mode the candidate, after running the program, answers function calls over
two pipes: one request line in, one reply line out, both in the plain-data format of
``wire.py`` (JSON; never pickle, never ``eval``).
"""

from __future__ import annotations

import functools
import json
import os
import select
import signal
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # started as a script, with -I
import isolation
import policy
import wire

SANDBOX_WORKDIR = "/tmp/work"  # inside the private /tmp tmpfs with namespaces
SETUP_FAILED = 125  # exit status of a candidate process whose set-up (trusted code) failed
MAX_LINE = 16 << 20  # largest request the candidate side accepts, in bytes
REQ_FD, RESP_FD = 3, 4  # where the call pipes sit in the supervisor and the candidate
_TICK_S = 0.02  # how often the supervisor totals the candidate's CPU time and memory
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
# Imported once by the zygote, so that candidates (forked from it) find them loaded: the
# modules HumanEval/MBPP-style programs import, and what the serve loop itself needs.
PRELOAD = (
    "ast",
    "bisect",
    "builtins",
    "collections",
    "copy",
    "fractions",
    "functools",
    "hashlib",
    "heapq",
    "itertools",
    "math",
    "operator",
    "random",
    "re",
    "statistics",
    "string",
    "traceback",
    "typing",
    "json",
)
_FILTER: bytes | str = "the zygote did not build a seccomp filter"
_SITE_FOLDERS: list[str] = []  # the scorer's package folders, given to the zygote


def zygote(sock_fd: int, site_folders: list[str]) -> None:
    """Fork one supervisor per request until the scorer closes the socket."""
    global _FILTER
    _SITE_FOLDERS[:] = site_folders
    sock = socket.socket(fileno=sock_fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    sys.path.extend(site_folders)  # plain folders, no .pth hooks: for pyseccomp
    _FILTER = policy.build()
    for module in PRELOAD:
        __import__(module)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 16, 8)
        except OSError:
            return
        if not message:
            return  # the scorer is gone
        # A root scorer's supervisor needs two-line id maps, which only a process outside its
        # new user namespace may write: this one, asked over a pipe (no helper process).
        ask_r, ask_w = os.pipe()
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                sock.close()
                os.close(ask_r)
                os.close(done_w)
                code = _supervise(fds, functools.partial(_ask_for_maps, ask_w, done_r))
            except BaseException:  # the scorer sees a missing result and reports it
                import traceback

                traceback.print_exc()
                code = 1
            os._exit(code)
        for fd in (*fds, ask_w, done_r):
            os.close(fd)
        _write_maps_when_asked(pid, ask_r, done_w)
        sock.sendall(struct.pack("!q", pid))


def _ask_for_maps(ask_w: int, done_r: int, ids: tuple[int, int] | None) -> bool:
    """Supervisor side: ask the zygote to map inside 0 -> host 0 and 65534 -> `ids`."""
    os.write(ask_w, (f"{ids[0]} {ids[1]}" if ids else "none").encode() + b"\n")
    os.close(ask_w)
    answer = os.read(done_r, 1)
    os.close(done_r)
    return answer == b"1"


def _write_maps_when_asked(pid: int, ask_r: int, done_w: int) -> None:
    """Zygote side: write the maps of supervisor `pid` if it asks (only a root scorer's does)."""
    ok = False
    try:
        if os.geteuid() == 0 and select.select([ask_r], [], [], 10.0)[0]:
            request = os.read(ask_r, 100).decode().split()
            if len(request) == 2:
                uid, gid = (int(v) for v in request)
                for name, inside in (("uid_map", uid), ("gid_map", gid)):
                    with open(f"/proc/{pid}/{name}", "w") as fh:
                        fh.write(f"0 0 1\n{isolation.SANDBOX_ID} {inside} 1")
                ok = True
    except (OSError, ValueError):
        pass  # the supervisor reports that its namespace could not be set up
    finally:
        try:
            os.write(done_w, b"1" if ok else b"0")
        except OSError:
            pass
        os.close(ask_r)
        os.close(done_w)


def _supervise(fds: list[int], ask_for_maps) -> int:
    """One program: place the received descriptors, then supervise the run."""
    os.setsid()  # its own session and process group (and scheduler autogroup)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    config_fd, stdin_fd, result_fd, diag_fd, *call_fds = fds
    with os.fdopen(config_fd, "rb") as fh:
        config = json.loads(fh.read())
    parked = [os.dup(fd) for fd in (stdin_fd, result_fd, diag_fd, *call_fds)]
    parked = [_dup_high(fd) for fd in parked]
    for fd in (stdin_fd, result_fd, diag_fd, *call_fds):
        os.close(fd)
    # A program with no call channels (a script, not a function call) has three descriptors:
    # the call slots stay unused, so the shorter list is meant (strict=False on purpose).
    for target, fd in zip((0, 1, 2, REQ_FD, RESP_FD), parked, strict=False):
        os.dup2(fd, target)
        os.close(fd)
    if call_fds:
        config["req_fd"], config["resp_fd"] = REQ_FD, RESP_FD
    run(config, ask_for_maps)
    return 0


def _dup_high(fd: int) -> int:
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100)
    os.close(fd)
    return high


def run(config: dict, ask_for_maps) -> None:
    """Supervise one program as `config` describes; write the outcome to stdout."""
    started = time.monotonic()
    isolation.prctl(isolation.PR_SET_CHILD_SUBREAPER, 1)
    setup_error = None
    in_force: list[str] = []
    refused: str | None = None
    folders: list[str] = []
    hidden: list[str] = []
    root_scorer = os.geteuid() == 0
    try:
        python_paths = _python_paths(config["packages"])
        folders = isolation.exposed_folders(python_paths)
        hidden = isolation.hidden_folders(folders, python_paths)
        if config["namespaces"]:
            in_force, refused = isolation.enter_namespaces(root_scorer, config["uid"], config["gid"], ask_for_maps)
        elif root_scorer:
            ask_for_maps(None)
        if root_scorer and not in_force:
            isolation.drop_to(config["uid"], config["gid"])
        if isinstance(_FILTER, str):
            raise OSError(_FILTER)
    except OSError as err:
        setup_error = f"{type(err).__name__}: {err}"
    if setup_error is not None:
        _report({"setup_error": setup_error}, b"", b"")
        return

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    status_r, status_w = os.pipe()
    keep = [out_w, err_w, status_w] + [fd for fd in (config.get("req_fd"), config.get("resp_fd")) if fd is not None]
    pid = os.fork()
    if pid == 0:  # the candidate process: never return into the supervisor's code
        _candidate_process(config, folders, hidden, bool(in_force), root_scorer, out_w, err_w, status_w)
    for fd in keep:
        os.close(fd)
    outcome = _watch(pid, started, config, out_r, err_r)
    status = _read_all(status_r).decode(errors="replace")
    landlock = status.split("\n", 1)[0].split() if status.startswith("ok") else []
    header = {
        **outcome["header"],
        "setup_error": None if status.startswith("ok") else (status or "the candidate process died during set-up"),
        "isolation": in_force + landlock[1:] + ["seccomp"],
        "refused": refused,
        "user": config["uid"] if root_scorer else os.geteuid(),
        "duration_s": time.monotonic() - started,
    }
    _report(header, outcome["stdout"], outcome["stderr"])


def _python_paths(packages: bool) -> list[str]:
    """This interpreter's standard library (with its extension modules), and the scorer's
    package folders when asked: what a candidate may read besides the system folders."""
    stdlib = os.path.dirname(os.__file__)
    own = [p for p in sys.path if p.startswith(stdlib) and "-packages" not in p]
    return [stdlib, *own, *(_SITE_FOLDERS if packages else [])]


def _report(header: dict, stdout: bytes, stderr: bytes) -> None:
    try:
        sys.stdout.buffer.write(json.dumps(header).encode() + b"\n" + stdout + stderr)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        pass  # the scorer that asked is gone (killed at its own time limit); nothing to report to


def _watch(pid: int, started: float, config: dict, out_r: int, err_r: int) -> dict:
    """Collect output until the candidate exits, or a limit is passed (time, CPU, memory, output)."""
    cap = config["output_bytes"]
    captured = {out_r: bytearray(), err_r: bytearray()}
    open_fds = {out_r, err_r}
    pidfd = os.pidfd_open(pid)
    deadline = started + config["wall_s"]
    limit = ""  # which limit ended the run: "wall", "cpu", "memory", "output"
    cpu_s = memory = peak = 0.0
    exited = False
    next_tick = time.monotonic() + _TICK_S
    while not exited and not limit:
        now = time.monotonic()
        if now >= deadline:
            limit = "wall"
            break
        if now >= next_tick:
            cpu_s, memory = _usage(pid)
            peak = max(peak, memory)
            if cpu_s > config["cpu_s"]:
                limit = "cpu"
            elif memory > config["memory_bytes"]:
                limit = "memory"
            next_tick = now + _TICK_S
            continue
        ready, _, _ = select.select([*open_fds, pidfd], [], [], min(deadline, next_tick) - now)
        for fd in ready:
            if fd == pidfd:
                exited = True
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                open_fds.discard(fd)
            elif len(captured[fd]) + len(chunk) > cap:
                captured[fd] += chunk[: cap - len(captured[fd])]
                limit = "output"
            else:
                captured[fd] += chunk
    final_cpu, final_memory = _usage(pid)
    # PID 1 of a PID namespace takes every process in it down with it; without the namespace
    # the process group goes too, and _reap_descendants sweeps up whatever left that group.
    for target in (lambda: os.kill(pid, signal.SIGKILL), lambda: os.killpg(pid, signal.SIGKILL)):
        try:
            target()
        except ProcessLookupError:
            pass
    _, status, usage = os.wait4(pid, 0)
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
    children = os.times()  # everything reaped here: the candidate and the swept orphans
    header = {
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "timed_out": limit in ("wall", "cpu"),
        "limit": limit or None,
        "output_limited": limit == "output",
        "cpu_s": max(cpu_s, final_cpu, children.children_user + children.children_system),
        "peak_memory_bytes": max(peak, final_memory),
        "stdout_bytes": len(captured[out_r]),
        "stderr_bytes": len(captured[err_r]),
        "leftover_processes": leftovers,
        "cleanup_error": "processes of the program survived the sweep" if survivors else None,
    }
    return {"header": header, "stdout": bytes(captured[out_r]), "stderr": bytes(captured[err_r])}


def _tree(root: int) -> list[int]:
    """`root` and its live descendants, from /proc/<pid>/task/<tid>/children."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as fh:
                    todo.extend(int(c) for c in fh.read().split())
            except OSError:
                pass
    return found


def _usage(root: int) -> tuple[float, float]:
    """(CPU seconds, resident bytes) of `root`'s tree, children already waited for included.

    Orphans re-parented to this supervisor are outside `root`'s tree: they are counted as
    this process's own descendants below.
    """
    cpu = rss = 0
    pids = _tree(root) + [p for p in _tree(os.getpid())[1:] if p != root]
    for pid in dict.fromkeys(pids):
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                fields = fh.read().rpartition(b")")[2].split()
        except OSError:
            continue
        cpu += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
        rss += int(fields[21])
    return cpu / _CLK_TCK, rss * _PAGE


def _reap_descendants(limit_s: float = 5.0) -> tuple[int, bool]:
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
            return len(killed), False
        found = _tree(os.getpid())[1:]
        if time.monotonic() > give_up:
            return len(killed), bool(found)
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


def _candidate_process(config, folders, hidden, namespaced, root_scorer, out_w, err_w, status_w) -> None:
    try:
        os.setpgid(0, 0)
        if namespaced:
            isolation.private_root(folders, hidden, config["tmpfs_bytes"])
            os.mkdir(SANDBOX_WORKDIR, 0o700)
            if root_scorer:  # created by the namespace's root; the candidate is 65534 there
                os.chown(SANDBOX_WORKDIR, isolation.SANDBOX_ID, isolation.SANDBOX_ID)
            workdir, writable = SANDBOX_WORKDIR, ["/tmp"]
        else:
            # Nothing is writable without a private tmpfs: a folder on the host's disk could
            # be filled, and would outlive the run if the supervisor were killed.
            workdir, writable = "/", []
        os.chdir(workdir)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        _close_fds_except({0, 1, 2, status_w, *(fd for fd in (config.get("req_fd"), config.get("resp_fd")) if fd)})
        isolation.set_limits(
            config["cpu_s"], config["memory_bytes"], config["processes"], config["file_bytes"], config["open_files"]
        )
        stdlib = os.path.dirname(os.__file__)
        if not os.access(stdlib, os.R_OK | os.X_OK):
            raise PermissionError(
                f"the sandbox user cannot read the Python standard library at {stdlib}; "
                "install Python under a world-readable prefix or allow user namespaces"
            )
        devices = [f"/dev/{d}" for d in isolation.DEVICES]
        # With a private root the hidden folders are covered by empty tmpfs already; only
        # without one must Landlock leave them out (rule by rule: slower, fallback only).
        if namespaced and isolation.landlock_abi() < 1:
            landlock = []  # a kernel without Landlock: the private root alone hides the host
        else:
            landlock = isolation.landlock(folders, [] if namespaced else hidden, writable, devices)
        isolation.drop_capabilities(become=isolation.SANDBOX_ID if namespaced and root_scorer else None)
        isolation.prctl(isolation.PR_SET_NO_NEW_PRIVS, 1)
        isolation.prctl(isolation.PR_SET_PDEATHSIG, signal.SIGKILL)
        policy.load(_FILTER)
        sys.path[:] = [p for p in sys.path if any(p == f or p.startswith(f + "/") for f in folders) and p not in hidden]
        os.environ.clear()
        os.environ.update(
            {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"} | ({"TMPDIR": "/tmp"} if writable else {})
        )
    except BaseException as err:  # report set-up failures as the scorer's problem, not a verdict
        try:
            frame = err.__traceback__
            while frame.tb_next is not None:
                frame = frame.tb_next
            where = f"{frame.tb_frame.f_code.co_name}, line {frame.tb_lineno}"
            os.write(status_w, f"{type(err).__name__}: {err} (in {where})".encode())
        finally:
            os._exit(SETUP_FAILED)
    os.write(status_w, " ".join(["ok", *landlock]).encode())
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
    low = -1
    for fd in sorted(keep):
        if fd > low + 1:  # closerange(n, n) would be close_range(n, n - 1): everything from n on
            os.closerange(low + 1, fd)
        low = fd
    os.closerange(low + 1, 1 << 20)


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
    """Run the program, then answer calls: ``[name, args, kwargs]`` in, a reply line out.

    Replies: ``["ok", value]``, ``["raise", type name, message, built-in, args]``,
    ``["unsendable", why]``. ``built-in`` says whether the class is Python's own (not one the
    program defined); ``args`` are the exception's arguments when they are plain scalars
    (else null). The scorer decides what a reply means (trusted.py); this side is the
    candidate's process and may have been rewritten by it, so nothing here is believed
    beyond what the candidate could have raised itself.
    """
    import builtins
    import traceback

    namespace = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        exec(compile(source, "solution.py", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        return 1
    names = [n for n, v in namespace.items() if callable(v) and not n.startswith("__")][:1000]
    _send(resp_fd, ["ready", names])
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
        name, args, kwargs = wire.decode(line, MAX_LINE)
        try:
            reply = ["ok", namespace[name](*args, **kwargs)]
        except BaseException as err:  # SystemExit, KeyboardInterrupt too: a failed call, told
            reply = _raised(err)
        try:
            _send(resp_fd, reply)
        except (TypeError, ValueError, RecursionError) as err:
            _send(resp_fd, ["unsendable", str(err)[:2000]])


def _raised(err: BaseException) -> list:
    """The reply for a call that raised `err`: its class, message and plain arguments."""
    import builtins

    kind = type(err)
    try:
        message = str(err)[:2000]
    except BaseException:  # a __str__ that raises: the class still says enough
        message = ""
    builtin = kind.__module__ == "builtins" and getattr(builtins, kind.__name__, None) is kind
    args = getattr(err, "args", None)
    plain = (
        type(args) is tuple
        and len(args) <= 8
        and all(
            a is None or type(a) in (bool, int, float) or (type(a) in (str, bytes) and len(a) <= 2000) for a in args
        )
    )
    return ["raise", kind.__name__[:100], message, builtin, list(args) if plain else None]


def _send(fd: int, message) -> None:
    data = (wire.encode(message) + "\n").encode()
    while data:
        data = data[os.write(fd, data) :]


if __name__ == "__main__":
    if sys.argv[1:2] != ["--zygote"]:
        raise SystemExit("usage: python -I -S child.py --zygote <socket-fd> [site folders...]")
    zygote(int(sys.argv[2]), sys.argv[3:])
