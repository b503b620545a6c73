"""Hostile programs against the code reward: each must score 0 and leave no trace.

Every program is a HumanEval-style row (``solve`` plus a ``check``). Where an attack would
*succeed* the program returns the value the check expects (the secret, True for "the file
was written"), so a score of 0 proves the attack failed, not merely that the answer was
wrong. For each program: score 0, finish within the time budget plus a margin, no process
left behind, no file changed outside the working directory, and a correct program scores
1.0 right after it on the same thread.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rewards import make_reward
from rewards.sandbox import SANDBOX_USER, Isolation, Limits, Session, run_script

BUDGET_S = 2.0  # the code reward's timeout_s for these programs
MARGIN_S = 3.0  # start-up, clean-up and a loaded CI machine
MARKER = f"grpoflow-adversary-{uuid.uuid4().hex[:12]}"
SECRET = f"s3cret-{uuid.uuid4().hex}"
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the full sandbox (namespaces, user switch) needs root")


@pytest.fixture(scope="module")
def canaries():
    """Files a naive sandbox would let `nobody` change: in /tmp and in a world-writable folder."""
    tmp_file = Path(f"/tmp/{MARKER}.txt")
    tmp_file.write_text("original")
    tmp_file.chmod(0o666)
    folder = REPO / f".{MARKER}"  # outside every tmpfs the sandbox mounts: the read-only root
    folder.mkdir()
    folder.chmod(0o777)
    kept = folder / "keep.txt"
    kept.write_text("original")
    kept.chmod(0o666)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    os.environ["GRPOFLOW_CANARY_SECRET"] = SECRET
    yield {"tmp_file": tmp_file, "folder": folder, "kept": kept, "port": listener.getsockname()[1], "listener": listener}
    del os.environ["GRPOFLOW_CANARY_SECRET"]
    listener.close()
    tmp_file.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def _snapshot(c) -> dict[str, str | None]:
    paths = [c["tmp_file"], c["kept"], *sorted(c["folder"].iterdir())]
    return {str(p): (p.read_text() if p.exists() else None) for p in paths} | {"/etc": str(sorted(os.listdir("/etc")))}


def _sandbox_processes() -> set[int]:
    """Processes that run as the sandbox user or carry this module's marker."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        if uid == SANDBOX_USER or MARKER.encode() in cmdline:
            found.add(int(entry))
    return found


ADD_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
YES_TEST = "def check(candidate):\n    assert candidate() is True\n"
SECRET_TEST = f"def check(candidate):\n    assert candidate() == {SECRET!r}\n"
CORRECT_ADD = "def solve(a, b):\n    return a + b\n"


def _programs(c) -> dict[str, tuple[str, str]]:
    """name -> (program, test). A program that 'wins' against a weak sandbox scores 1."""
    tmp_file, folder, kept, port = c["tmp_file"], c["folder"], c["kept"], c["port"]
    return {
        "infinite_loop": ("while True:\n    pass\n" + CORRECT_ADD, ADD_TEST),
        "sleep_past_limit": ("import time\ntime.sleep(60)\n" + CORRECT_ADD, ADD_TEST),
        "ignore_sigterm": (
            "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "while True:\n    pass\n" + CORRECT_ADD,
            ADD_TEST,
        ),
        "fork_bomb": (
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n" + CORRECT_ADD,
            ADD_TEST,
        ),
        "memory_bomb": ("blob = bytearray(8 << 30)\n" + CORRECT_ADD, ADD_TEST),
        "memory_bomb_in_call": (
            "def solve(a, b):\n    hoard = []\n    while True:\n        hoard.append(bytearray(1 << 26))\n",
            ADD_TEST,
        ),
        "huge_file": (
            "with open('big.bin', 'wb') as fh:\n    for _ in range(1024):\n        fh.write(b'x' * (1 << 20))\n" + CORRECT_ADD,
            ADD_TEST,
        ),
        "print_gigabytes": ("import sys\nfor _ in range(2048):\n    sys.stdout.write('x' * (1 << 20))\n" + CORRECT_ADD, ADD_TEST),
        "stderr_flood_in_call": (
            "import sys\ndef solve(a, b):\n    for _ in range(2048):\n        sys.stderr.write('x' * (1 << 20))\n    return a + b\n",
            ADD_TEST,
        ),
        # Writing /tmp succeeds, into the private tmpfs: the host snapshot shows it did not leak.
        "write_outside_workdir": (
            "def solve():\n    for path in ["
            f"{str(tmp_file)!r}, '../{MARKER}', {str(kept)!r}, {str(folder / 'new.txt')!r}, '/etc/{MARKER}']:\n"
            "        try:\n            open(path, 'w').write('pwned')\n        except OSError:\n            pass\n"
            f"    return open({str(kept)!r}).read() == 'pwned' or __import__('os').path.exists('/etc/{MARKER}')\n",
            YES_TEST,
        ),
        "delete_outside_workdir": (
            "import os, shutil\ndef solve():\n    gone = 0\n"
            f"    for path in [{str(tmp_file)!r}, {str(kept)!r}]:\n"
            "        try:\n            os.remove(path)\n            gone += 1\n        except OSError:\n            pass\n"
            # The folder may be invisible in the sandbox (a checkout under /tmp sits below the
            # sandbox's own tmpfs): only a folder that existed and went away counts as deleted.
            f"    existed = os.path.exists({str(folder)!r})\n"
            f"    shutil.rmtree({str(folder)!r}, ignore_errors=True)\n"
            f"    return gone > 0 or (existed and not os.path.exists({str(folder)!r}))\n",
            YES_TEST,
        ),
        "read_env_secret": ("import os\ndef solve():\n    return os.environ.get('GRPOFLOW_CANARY_SECRET')\n", SECRET_TEST),
        "read_proc_environ": (
            "import os\ndef solve():\n    for pid in os.listdir('/proc'):\n        try:\n"
            "            data = open(f'/proc/{pid}/environ', 'rb').read()\n        except OSError:\n            continue\n"
            "        for item in data.split(b'\\0'):\n            if item.startswith(b'GRPOFLOW_CANARY_SECRET='):\n"
            "                return item.split(b'=', 1)[1].decode()\n    return None\n",
            SECRET_TEST,
        ),
        "socket_to_scorer_host": (
            "import socket\ndef solve():\n    try:\n"
            f"        socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n        return True\n"
            "    except OSError:\n        return False\n",
            YES_TEST,
        ),
        "socket_to_internet": (
            "import socket\ndef solve():\n    for host in [('1.1.1.1', 53), ('8.8.8.8', 53)]:\n        try:\n"
            "            socket.create_connection(host, timeout=1).close()\n            return True\n"
            "        except OSError:\n            pass\n    return False\n",
            YES_TEST,
        ),
        "sys_exit_before_tests": ("import sys\ndef solve(a, b):\n    return 0\nsys.exit(0)\n", ADD_TEST),
        "os_exit_before_tests": ("import os\ndef solve(a, b):\n    return 0\nos._exit(0)\n", ADD_TEST),
        "raise_systemexit_before_tests": ("def solve(a, b):\n    return 0\nraise SystemExit(0)\n", ADD_TEST),
        "exit_inside_call": ("import os\ndef solve(a, b):\n    os._exit(0)\n", ADD_TEST),
        "atexit_exit_zero": (
            "import atexit, os\natexit.register(lambda: os._exit(0))\ndef solve(a, b):\n    return 0\n",
            ADD_TEST,
        ),
        "always_equal_object": (
            "class Anything:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
            "def solve(a, b):\n    return Anything()\n",
            ADD_TEST,
        ),
        "monkeypatch_builtins": (
            "import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\n"
            "builtins.isinstance = lambda *a: True\nbuiltins.abs = lambda x: 0\n"
            "def solve(a, b):\n    return -1\n",
            ADD_TEST,
        ),
        "forge_the_reply_channel": (
            "import sys\nharness = sys.modules['__main__']\n"
            "harness.encode_literal = lambda message: \"('ok', True)\"\n"
            "def solve(a, b):\n    return 'wrong'\n",
            ADD_TEST,
        ),
        "walk_frames_for_the_verdict": (
            "import sys, gc\ndef solve(a, b):\n    frame = sys._getframe()\n    while frame is not None:\n"
            "        for name in list(frame.f_locals):\n            if 'check' in name or 'expected' in name:\n"
            "                frame.f_locals[name] = True\n        frame = frame.f_back\n"
            "    for obj in gc.get_objects():\n        if isinstance(obj, dict) and 'check' in obj:\n"
            "            return obj\n    return None\n",
            ADD_TEST,
        ),
        "deep_recursion": (
            "import sys\nsys.setrecursionlimit(10 ** 8)\ndef solve(a, b):\n    return solve(a, b) + 1\n",
            ADD_TEST,
        ),
        "detached_child_outlives_parent": (
            "import os, subprocess\n"
            f"subprocess.Popen(['/bin/sh', '-c', 'sleep 60 # {MARKER}'], start_new_session=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv('/bin/sh', ['/bin/sh', '-c', 'sleep 60 # {MARKER}'])\n    os._exit(0)\n"
            "def solve(a, b):\n    return 0\n",
            ADD_TEST,
        ),
        # Survival is the test here: the correct program scored right after proves it.
        "kill_everything": (
            "import os, signal\ndef solve(a, b):\n    try:\n        os.kill(-1, signal.SIGKILL)\n    except OSError:\n        pass\n"
            "    return 0\n",
            ADD_TEST,
        ),
        "become_root": (
            "import os\ndef solve():\n    for attempt in (lambda: os.setuid(0), lambda: os.setgid(0), lambda: os.seteuid(0)):\n"
            "        try:\n            attempt()\n        except OSError:\n            continue\n"
            "    return os.geteuid() == 0 or os.access('/root', os.W_OK)\n",
            YES_TEST,
        ),
    }


def test_adversarial_programs_score_zero_and_leave_no_trace(canaries):
    programs = _programs(canaries)
    assert len(programs) >= 20
    code = make_reward("code", {"timeout_s": BUDGET_S})
    before_files = _snapshot(canaries)
    before_procs = _sandbox_processes()

    def attack(name: str) -> tuple[str, float, float, float]:
        program, test = programs[name]
        started = time.monotonic()
        score = code(program, {"test": test, "entry_point": "solve"})
        elapsed = time.monotonic() - started
        # The scorer keeps working right after, on the same thread.
        follow_up = code(CORRECT_ADD, {"test": ADD_TEST, "entry_point": "solve"})
        return name, score, elapsed, follow_up

    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(attack, programs))

    failures = []
    for name, score, elapsed, follow_up in outcomes:
        if score != 0.0:
            failures.append(f"{name}: scored {score}")
        if elapsed > BUDGET_S + MARGIN_S:
            failures.append(f"{name}: took {elapsed:.1f}s, over {BUDGET_S + MARGIN_S}s")
        if follow_up != 1.0:
            failures.append(f"{name}: the next, correct program scored {follow_up}")
    assert not failures, "\n".join(failures)
    assert _snapshot(canaries) == before_files
    assert _sandbox_processes() - before_procs == set()
    assert not canaries["tmp_file"].with_name(f"{MARKER}-never").exists()
    with pytest.raises(BlockingIOError):
        canaries["listener"].accept()  # nothing ever connected to the scorer's host


def test_adversarial_programs_through_the_worker_pool(canaries):
    """The same attacks, scored in the score stage's worker processes, then a correct one."""
    from rewards.pool import RewardPool

    programs = _programs(canaries)
    chosen = ["fork_bomb", "detached_child_outlives_parent", "kill_everything", "sys_exit_before_tests", "read_env_secret"]
    rows = [(programs[n][0], {"test": programs[n][1], "entry_point": "solve"}) for n in chosen]
    rows.append((CORRECT_ADD, {"test": ADD_TEST, "entry_point": "solve"}))
    before_procs = _sandbox_processes()
    with RewardPool([make_reward("code", {"timeout_s": BUDGET_S})], workers=2) as pool:
        outcomes = pool.score(rows)
    assert [o[0].value for o in outcomes] == [0.0] * len(chosen) + [1.0]
    assert all(o[0].error is None for o in outcomes)
    assert _sandbox_processes() - before_procs == set()


FALLBACK_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(
    not (os.path.exists(FALLBACK_PYTHON) and os.stat(os.path.dirname(os.path.realpath(FALLBACK_PYTHON))).st_mode & 0o001),
    reason="the fallback needs an interpreter the sandbox user can read",
)
def test_fallback_without_namespaces_still_reaps_and_contains(canaries):
    """No namespaces (a kernel that refuses them): the user switch and the subreaper hold."""
    fallback = Isolation(namespaces=False, python=FALLBACK_PYTHON)
    limits = Limits(wall_s=BUDGET_S)
    before_procs = _sandbox_processes()
    program, _ = _programs(canaries)["detached_child_outlives_parent"]
    detached = run_script(program, limits=limits, isolation=fallback)
    assert detached.isolation == () and detached.user == SANDBOX_USER
    assert detached.leftover_processes >= 2  # found and killed by the sweep, not by a namespace
    bomb = run_script(_programs(canaries)["fork_bomb"][0], limits=limits, isolation=fallback)
    assert bomb.timed_out
    secret = run_script("import os\nprint(os.environ.get('GRPOFLOW_CANARY_SECRET'))", limits=limits, isolation=fallback)
    assert secret.stdout.strip() == b"None"
    with Session("import sys\ndef solve(a, b):\n    return a + b\nsys.exit(0)\n", limits, fallback) as session:
        assert not session.ready
    assert _sandbox_processes() - before_procs == set()
    assert canaries["kept"].read_text() == "original"
