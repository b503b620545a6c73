"""Run untrusted programs in a supervised child process and decide the verdict outside it.

Code written by the policy is hostile by assumption: GRPO rewards whatever makes the number
go up, and the policy finds what pays. So:

* every program runs in its own child process, forked by a per-program *supervisor*,
  itself forked from a clean *zygote* (``child.py``) that each scoring process starts once;
  forking it costs a millisecond where starting Python costs 30;
* the trusted side (``trusted.py``, in the scoring worker) runs the *test* code itself and
  calls the candidate's functions over a pipe; arguments go out and results come back as
  plain data (``wire.py``: JSON, checked for cost; never pickle, never ``eval``), so no
  object made by the candidate reaches a comparison; a call that raised one of Python's
  ordinary errors (``PLAIN_ERRORS``: ValueError, KeyError, ...) raises a fresh instance of
  that class made by the trusted side (a test may require a program to raise), anything
  else (StopIteration, SystemExit, a class the program defined) ``CandidateError``, so
  nothing the candidate chooses changes the checker's control flow beyond what raising an
  ordinary error in a correct program does;
* stdin/stdout programs are judged from their captured output and exit status.

Isolation, the same whether the scorer runs as root or not (``isolation.py``, ``policy.py``;
``RunResult.isolation`` lists what was in force):

* a user namespace per program, in which the scorer's user appears as ``nobody``: PID,
  network, IPC, UTS and cgroup namespaces need no root then. A root scorer's supervisor
  first becomes the host user ``nobody`` (65534), so nothing runs with host privileges;
* a private root: a read-only tmpfs with read-only binds of the system folders and the
  interpreter only, five device files, and a size-capped memory-backed ``/tmp`` (the
  working folder). No ``/proc``, no run folder, no checkout, no virtual environment (its
  packages only with ``Isolation(packages=True)``), no other process to see or signal;
* Landlock (reads beneath the exposed folders only, writes in ``/tmp`` only, no TCP,
  signals and abstract Unix sockets scoped to the program itself), every capability
  dropped, ``no_new_privs``, and a seccomp filter against new namespaces and mounts,
  keyrings, System V IPC, memfd, file locks and watches, ptrace and process-memory calls,
  ``socket``, io_uring, bpf and perf (the list and why: ``policy.py``);
* limits: CPU time and resident memory of all the program's processes *together*
  (polled by the supervisor every 20 ms, the tree killed when over), a process count per
  program (``RLIMIT_NPROC`` counts per user namespace), each process's address space, file
  size, open files, output bytes, and a wall clock as a backstop for programs that wait;
* each supervisor is its own session (the scheduler's autogroup: a program's processes
  share one CPU share, and ``setsid`` is denied to them); it is a child subreaper, PID 1 of
  the program's PID namespace takes every process in it down when it dies, and the sweep
  after the run kills whatever is left: nothing outlives the verdict.

Without user namespaces (a kernel or a container that refuses them, or
``Isolation(namespaces=False)``) the program runs as the scorer's user (``nobody`` for a
root scorer) with Landlock, the seccomp filter and the same limits, and nothing writable.

What it does NOT protect against (read before trusting it with more than RL rewards):

* **Not a security boundary against kernel exploits.** The seccomp filter is a deny list:
  the remaining system calls (several hundred) are reachable, and a kernel bug in one of
  them is a way out. Run the scorer in a VM if the policy could be trained to find one.
* **Memory is polled, not a hard cgroup limit.** Between two polls (20 ms) a fast
  fork-and-allocate program can go past ``memory_mb`` by what it allocates in that time
  (each process also stops at its ``memory_mb`` of address space); kernel memory (pipe
  and socket buffers, page tables) is bounded only by the process and open-file limits.
  No cgroup is created.
* **Timing side channels**: CPU contention between concurrent sandboxes and the shared
  page cache of the read-only system files (``mincore``/``cachestat`` are denied, timing a
  read is not) can carry a few bits between concurrently running programs.
* **Readable system files**: everything in ``/usr``, ``/etc``, ``/lib`` and the interpreter's
  standard library that the sandbox user may read is readable (not the run folder, the
  checkout, the virtual environment or the interpreter's own site-packages). Do not keep
  secrets there. Without user namespaces, names and metadata of other files can be
  probed with ``stat`` (Landlock restricts opening, not looking up).
* **The checker's own work on returned values**: a result is at most 1 MiB and a session's
  results 4 MiB, refused when deeper than 100 levels or built of colliding hashes; what
  the test code then does with a value (a backtracking regex over a returned string) is
  the test's own cost, bounded only by the scoring worker's time limit (NaN when passed).
* **CPU fairness relies on the scheduler's autogroups** (one group per session, on by
  default on most distributions); where they are off or the scorer sits in a cgroup with
  its own CPU controller, a program's processes compete one by one, and only the CPU-time
  budget (not the wall clock) keeps a correct program beside a hog from being failed.
* **Without user namespaces**: the process count is per user (a program of a non-root
  scorer shares it with the scorer's own processes, so it may not be able to fork), and
  on Landlock before ABI 6 (Linux 6.12) signals and abstract Unix sockets are not scoped:
  a candidate of a non-root scorer could then signal the scorer's processes. Without
  Landlock and without user namespaces the sandbox refuses to run (a SandboxError: the row
  gets NaN, not a verdict); with namespaces and no Landlock it runs without it. Without
  libseccomp/pyseccomp it refuses to run.
* **Not hidden from the program**: its own source, the arguments the test sends it, and
  the fact that it is being called again (which reveals that the previous answer passed).
"""

from rewards.sandbox.trusted import (
    MAX_REPLY_BYTES,
    PLAIN_ERRORS,
    SANDBOX_GROUP,
    SANDBOX_USER,
    CandidateError,
    Isolation,
    Limits,
    RunResult,
    SandboxError,
    Session,
    SessionBroken,
    run_script,
)

__all__ = [
    "MAX_REPLY_BYTES",
    "PLAIN_ERRORS",
    "SANDBOX_GROUP",
    "SANDBOX_USER",
    "CandidateError",
    "Isolation",
    "Limits",
    "RunResult",
    "SandboxError",
    "Session",
    "SessionBroken",
    "run_script",
]
