"""The system-call policy of every candidate process: a seccomp-bpf filter (libseccomp).

A deny list on top of namespaces and Landlock, aimed at the ways out that those leave:

* new namespaces and mounts (``unshare``, ``clone`` with a ``CLONE_NEW*`` flag, ``mount``
  and the new mount API): a user namespace made by the candidate would give it a tmpfs
  outside every memory cap and capabilities over its own mounts;
* shared kernel objects that outlive a sandbox or span sandboxes: the keyrings (per user,
  the classic cross-sample channel), System V IPC and POSIX message queues, ``memfd``
  (memory no address-space limit counts), file locks, leases and inotify/fanotify/dnotify
  watches on the read-only files that every sandbox sees, and the page-cache probes
  ``mincore``/``cachestat``;
* reaching other processes: ``ptrace``, ``process_vm_readv/writev``, ``pidfd_*``,
  ``kcmp``, ``setsid`` (a new session would also be a new scheduler group: it escapes the
  per-program CPU share), terminal injection (``TIOCSTI``);
* kernel attack surface a test program has no use for: ``bpf``, ``perf_event_open``,
  ``userfaultfd``, ``io_uring`` (its operations bypass this filter), ``socket`` (of any
  family; ``socketpair`` stays), module and kexec calls.

Denied calls fail with EPERM (ENOSYS for ``clone3``, so that the C library falls back to
``clone``, whose flags the filter can see); everything else is allowed. The filter is
compiled once per zygote (``build``) and loaded into each candidate after its set-up.
libseccomp, through its ctypes binding ``pyseccomp``, knows every architecture's call
numbers and rejects calls made through a foreign ABI (x32, i386), which a hand-written
filter would have to get right itself.
"""

from __future__ import annotations

import ctypes
import errno
import os
import tempfile

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

CLONE_NEW_FLAGS = 0x7E020080  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME
TIOCSTI = 0x5412
# fcntl commands that lock or watch files: F_SETLK, F_SETLKW, F_OFD_SETLK, F_OFD_SETLKW,
# F_SETLEASE, F_NOTIFY.
LOCKING_FCNTL = (6, 7, 37, 38, 1024, 1026)

DENIED = (
    # namespaces and mounts
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    # kernel objects shared beyond one sandbox
    "add_key",
    "request_key",
    "keyctl",
    "shmget",
    "shmat",
    "shmctl",
    "msgget",
    "msgsnd",
    "msgrcv",
    "msgctl",
    "semget",
    "semop",
    "semtimedop",
    "semctl",
    "mq_open",
    "mq_unlink",
    "mq_timedsend",
    "mq_timedreceive",
    "mq_notify",
    "mq_getsetattr",
    "memfd_create",
    "memfd_secret",
    "flock",
    "inotify_init",
    "inotify_init1",
    "inotify_add_watch",
    "fanotify_init",
    "fanotify_mark",
    "mincore",
    "cachestat",
    # other processes
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_open",
    "pidfd_getfd",
    "pidfd_send_signal",
    "kcmp",
    "process_madvise",
    "setsid",
    # kernel surface
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "socket",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "name_to_handle_at",
    "open_by_handle_at",
    "acct",
    "swapon",
    "swapoff",
    "quotactl",
    "syslog",
    "lookup_dcookie",
    "uselib",
    "vhangup",
)


def build() -> bytes | str:
    """The compiled BPF program, or why there is none (pyseccomp or libseccomp missing)."""
    try:
        import pyseccomp as seccomp
    except (ImportError, OSError) as err:  # OSError: the binding found no libseccomp.so
        return f"seccomp is unavailable ({type(err).__name__}: {err}); install pyseccomp and libseccomp2"
    deny = seccomp.ERRNO(errno.EPERM)
    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in dict.fromkeys(DENIED):
        try:
            rules.add_rule(deny, name)
        except (RuntimeError, ValueError, OSError):
            pass  # a call this kernel or architecture does not have cannot be made either
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for bit in (1 << n for n in range(32) if CLONE_NEW_FLAGS >> n & 1):
        rules.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, bit, bit))
    for command in LOCKING_FCNTL:
        rules.add_rule(deny, "fcntl", seccomp.Arg(1, seccomp.EQ, command))
    rules.add_rule(deny, "ioctl", seccomp.Arg(1, seccomp.EQ, TIOCSTI))
    # Compiled here once; each candidate loads the bytes with one prctl (``load``) instead of
    # libseccomp compiling the rules again in every process (2 ms each).
    with tempfile.TemporaryFile() as fh:
        rules.export_bpf(fh)
        fh.seek(0)
        return fh.read()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def load(program: bytes) -> None:
    """Install `program` in this process (needs no_new_privs); it holds for every descendant."""
    libc = ctypes.CDLL(None, use_errno=True)
    prog = _SockFprog(len(program) // 8, program)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"loading the seccomp filter: {os.strerror(err)}")
