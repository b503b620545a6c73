"""Kernel isolation for one candidate: user and other namespaces, a minimal root, Landlock.

Standard library only (ctypes): the zygote imports it. The pieces, in the order the
supervisor and the candidate process apply them (``child.py``):

1. ``enter_namespaces`` (supervisor): a new *user* namespace, in which the candidate
   appears as ``nobody`` (65534): the scorer's own user for a non-root scorer, the host
   user ``nobody`` for a root one; then PID, network, IPC, UTS and cgroup namespaces. No
   root needed: this is why isolation is the same for a root and a non-root scorer.
   One user namespace per program also gives each its own process count (``RLIMIT_NPROC``
   is counted per user namespace) and its own keyrings.
2. ``private_root`` (candidate, before its code runs): its own mount namespace whose root is
   a fresh read-only tmpfs holding only read-only binds of the system folders and the
   interpreter, ``/dev/{null,zero,full,random,urandom}``, and a size-capped writable
   ``/tmp`` (``/dev/shm`` points there). The run folder, the checkout, the virtual
   environment, ``/proc`` and every other process are simply not there.
3. ``landlock`` (candidate, with or without namespaces): the same file-system view as an
   access policy (read and execute beneath the exposed folders, write only in the working
   folder), no TCP, and, from Landlock ABI 6, no signals to and no abstract Unix sockets of
   processes outside the candidate's own domain. Without namespaces this is what hides the
   scorer's files and processes from a candidate that runs as the scorer's user.
4. ``drop_capabilities``: the capabilities the user namespace gave are gone (bounding set,
   ambient set, effective/permitted/inheritable), so the candidate can change no mount.
"""

from __future__ import annotations

import ctypes
import os
import resource

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)
SYS_LANDLOCK = (444, 445, 446)  # create_ruleset, add_rule, restrict_self
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
SANDBOX_ID = 65534  # the user and group a candidate appears as inside its namespace
# Device files a program may use; everything else in /dev stays out.
DEVICES = ("null", "zero", "full", "random", "urandom")
WRITABLE_DEVICES = ("null", "zero", "full")
SYSTEM_FOLDERS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def prctl(option: int, value: int, arg3: int = 0) -> None:
    _check(_libc.prctl(option, value, arg3, 0, 0), f"prctl({option})")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


# --- 1. the supervisor's namespaces ---------------------------------------------------------


def drop_to(uid: int, gid: int) -> None:
    """A root scorer's supervisor becomes `uid` before anything else (a user namespace then
    maps that user, not root). Dumpable again, so it may write its own uid_map."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    prctl(PR_SET_DUMPABLE, 1)


def enter_namespaces(root_scorer: bool, uid: int, gid: int, ask_for_maps) -> tuple[list[str], str | None]:
    """Enter new user, PID, network, IPC, UTS and cgroup namespaces.

    Inside, ``SANDBOX_ID`` (65534) is the candidate's identity: the scorer's own user for a
    non-root scorer, host `uid`/`gid` for a root one (whose supervisor stays root inside,
    without any capability outside, to build the private root; the candidate switches to
    65534 before its code runs); its two-line id maps need CAP_SETUID outside the new
    namespace, so `ask_for_maps((uid, gid))` has the zygote write them (``ask_for_maps(None)``:
    none needed). Returns (names in force, None), or ([], why) when the
    kernel refuses user namespaces (nothing changed: the caller goes on with Landlock alone).
    """
    host_uid, host_gid = os.geteuid(), os.getegid()
    if root_scorer:
        os.setgroups([])
        if _libc.unshare(CLONE_NEWUSER) != 0:
            errno = ctypes.get_errno()
            ask_for_maps(None)
            return [], f"user namespaces refused: {os.strerror(errno)}"
        if not ask_for_maps((uid, gid)):
            raise OSError("could not write the user namespace's id maps")
    else:
        if _libc.unshare(CLONE_NEWUSER) != 0:
            return [], f"user namespaces refused: {os.strerror(ctypes.get_errno())}"
        maps = [
            ("setgroups", "deny"),
            ("uid_map", f"{SANDBOX_ID} {host_uid} 1"),
            ("gid_map", f"{SANDBOX_ID} {host_gid} 1"),
        ]
        for path, text in maps:
            with open(f"/proc/self/{path}", "w") as fh:
                fh.write(text)
    others = [
        ("pid", CLONE_NEWPID),
        ("net", CLONE_NEWNET),
        ("ipc", CLONE_NEWIPC),
        ("uts", CLONE_NEWUTS),
        ("cgroup", CLONE_NEWCGROUP),
    ]
    for name, flag in others:
        _check(_libc.unshare(flag), f"unshare {name} namespace")
    return ["user", *(name for name, _ in others), "mount"], None


def exposed_folders(python_paths: list[str]) -> list[str]:
    """The folders a candidate may read: system folders and the interpreter's, outermost only."""
    wanted = {
        os.path.realpath(p) for p in (*SYSTEM_FOLDERS, *python_paths) if os.path.isdir(p) and not os.path.islink(p)
    }
    return sorted(p for p in wanted if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in wanted))


# --- 2. the candidate's private root --------------------------------------------------------


def hidden_folders(folders: list[str], packages: list[str]) -> list[str]:
    """Package folders inside the exposed ones (the interpreter's own site-packages, which can
    hold a dataset's solutions) that stay hidden unless they are among `packages`."""
    found = []
    for folder in folders:
        for name in ("site-packages", "dist-packages"):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and path not in packages and not folder.startswith("/usr/"):
                found.append(path)
    return found


def private_root(folders: list[str], hidden: list[str], tmpfs_bytes: int, base: str = "/tmp") -> None:
    """Make the root a read-only tmpfs with only `folders` (read-only, without `hidden`),
    the device files and a writable /tmp."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare mount namespace")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    new = base
    for folder in folders:
        target = new + folder
        os.makedirs(target, 0o755, exist_ok=True)
        mount(folder, target, None, MS_BIND | MS_REC)
        _read_only(target, recursive=True)
    for folder in hidden:
        mount("tmpfs", new + folder, "tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY, "size=4k,nr_inodes=1,mode=0555")
    for link in SYSTEM_FOLDERS:  # /bin -> usr/bin on merged-/usr systems
        if os.path.islink(link):
            os.symlink(os.readlink(link), new + link)
    os.makedirs(new + "/dev", 0o755)
    for device in DEVICES:
        if os.path.exists(f"/dev/{device}"):
            open(f"{new}/dev/{device}", "w").close()
            mount(f"/dev/{device}", f"{new}/dev/{device}", None, MS_BIND)
    os.symlink("/tmp", new + "/dev/shm")
    os.symlink("/proc/self/fd", new + "/dev/fd")
    os.makedirs(new + "/tmp", 0o755)
    mount("tmpfs", new + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmpfs_bytes},nr_inodes=4096,mode=1777")
    os.chdir(new)
    pivot = SYS_PIVOT_ROOT.get(os.uname().machine)
    if pivot is None:
        raise OSError(f"pivot_root: unknown system call number on {os.uname().machine}")
    _check(_libc.syscall(pivot, b".", b"."), "pivot_root")  # the old root now sits below "."
    _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir("/")
    _read_only("/", recursive=False)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _read_only(path: str, recursive: bool) -> None:
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    if _libc.syscall(SYS_MOUNT_SETATTR, -100, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)) == 0:
        return
    if ctypes.get_errno() != 38:  # ENOSYS: a kernel before 5.12; remount (top mount only)
        _check(-1, f"mount_setattr {path}")
    keep = os.statvfs(path).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)  # locked flags must stay
    mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | keep)


# --- 3. Landlock ------------------------------------------------------------------------------


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1, 2, 4, 8
FS_TRUNCATE, FS_IOCTL_DEV = 1 << 14, 1 << 15
# Every file-system right of each ABI version (1: 13 rights, 2: +REFER, 3: +TRUNCATE, 5: +IOCTL_DEV).
_FS_ALL = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV


def landlock_abi() -> int:
    version = _libc.syscall(SYS_LANDLOCK[0], None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    return max(0, version)


def landlock(readable: list[str], hidden: list[str], writable: list[str], devices: list[str]) -> list[str]:
    """Restrict this process (and all it starts) to `readable` (less `hidden`) / `writable`
    folders and the device files; no TCP; scoped signals and abstract sockets. Returns what
    is in force."""
    abi = landlock_abi()
    if abi < 1:
        raise OSError("Landlock is not available in this kernel (Linux 5.13+ with Landlock enabled)")
    fs_all = _FS_ALL.get(abi, _FS_ALL[5])
    attr = _RulesetAttr(fs_all, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # BIND|CONNECT_TCP; ABSTRACT_UNIX|SIGNAL
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = _libc.syscall(SYS_LANDLOCK[0], ctypes.byref(attr), size, 0)
    if ruleset < 0:
        _check(-1, "landlock_create_ruleset")
    try:
        read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
        rules = [(p, read) for p in _without(readable, hidden)] + [(p, fs_all) for p in writable]
        for device in devices:
            rights = FS_READ_FILE | (
                FS_WRITE_FILE | (FS_TRUNCATE if abi >= 3 else 0) if os.path.basename(device) in WRITABLE_DEVICES else 0
            )
            rules.append((device, rights))
        for path, rights in rules:
            if not os.path.exists(path):
                continue
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                if not os.path.isdir(path):
                    rights &= _FILE_RIGHTS
                rule = _PathBeneath(rights & fs_all, fd)
                _check(
                    0 if _libc.syscall(SYS_LANDLOCK[1], ruleset, 1, ctypes.byref(rule), 0) == 0 else -1,
                    f"landlock rule {path}",
                )
            finally:
                os.close(fd)
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        _check(0 if _libc.syscall(SYS_LANDLOCK[2], ruleset, 0) == 0 else -1, "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return ["landlock-fs", *(["landlock-tcp"] if abi >= 4 else []), *(["landlock-scope"] if abi >= 6 else [])]


def _without(folders: list[str], hidden: list[str]) -> list[str]:
    """`folders`, each containing a hidden folder replaced by its other entries (Landlock only
    grants, so a parent cannot be allowed with one child left out)."""
    result = []
    for folder in folders:
        inside = [h for h in hidden if h.startswith(folder + "/")]
        if not inside:
            result.append(folder)
            continue
        for entry in os.listdir(folder):
            path = os.path.join(folder, entry)
            if path not in hidden:
                result.extend(_without([path], inside) if os.path.isdir(path) else [path])
    return result


# --- 4. capabilities and limits -------------------------------------------------------------


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities(become: int | None = None) -> None:
    """No capability left in any set, and none to be had again (bounding set emptied);
    `become`: switch to that user and group (inside the namespace) on the way."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:
            break  # EINVAL: past the last capability this kernel knows
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if become is not None:
        os.setgroups([])
        os.setresgid(become, become, become)
        os.setresuid(become, become, become)
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def set_limits(cpu_s: float, memory_bytes: int, processes: int, file_bytes: int, open_files: int) -> None:
    cpu = max(1, int(cpu_s + 0.999)) + 1  # a backstop: the supervisor kills at the tree's total
    limits = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),
        resource.RLIMIT_AS: (memory_bytes, memory_bytes),
        resource.RLIMIT_NPROC: (processes, processes),
        resource.RLIMIT_FSIZE: (file_bytes, file_bytes),
        resource.RLIMIT_NOFILE: (open_files, open_files),
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_MEMLOCK: (0, 0),
        resource.RLIMIT_MSGQUEUE: (0, 0),
    }
    for which, (soft, hard) in limits.items():
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(which, (soft, hard))
