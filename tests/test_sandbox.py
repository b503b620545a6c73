"""The sandbox's building blocks: runs, limits, the call protocol, the zygote."""

from __future__ import annotations

import ast
import math
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.sandbox import (
    SANDBOX_USER,
    CandidateError,
    Isolation,
    Limits,
    SandboxError,
    Session,
    SessionBroken,
    run_script,
)
from rewards.sandbox import trusted as sandbox
from rewards.sandbox.wire import WireError, decode, encode

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the user switch of a root scorer")
FALLBACK_PYTHON = "/usr/bin/python3" if os.geteuid() == 0 else None  # readable by nobody


def test_exit_status_output_and_stdin():
    result = run_script(
        "import sys\nprint(sys.stdin.read().upper())\nprint('oops', file=sys.stderr)\nsys.exit(3)", stdin=b"hello"
    )
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"HELLO\n", b"oops\n")
    assert not result.ok
    crashed = run_script("raise KeyError('k')")
    assert crashed.exit_code == 1 and b"KeyError" in crashed.stderr
    assert run_script("print('fine')").ok


def test_atexit_handlers_and_threads_finish_like_a_real_interpreter():
    program = "import atexit, threading, time\natexit.register(lambda: print('bye'))\n"
    program += "threading.Thread(target=lambda: (time.sleep(0.1), print('thread'))).start()\n"
    assert run_script(program).stdout == b"thread\nbye\n"


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("GRPOFLOW_TEST_TOKEN", "do-not-leak")
    result = run_script("import os\nprint(sorted(os.environ))")
    assert ast.literal_eval(result.stdout.decode()) == ["HOME", "LANG", "PATH", "TMPDIR"]


def test_isolation_in_force_for_any_scorer():
    """User namespaces make root and non-root scorers equal: the same list in force."""
    result = run_script("import os\nprint(os.getuid(), os.getgid(), os.getgroups(), os.getpid(), os.getcwd())")
    assert {"user", "pid", "net", "ipc", "uts", "mount", "landlock-fs", "seccomp"} <= set(result.isolation)
    assert result.user == (SANDBOX_USER if os.geteuid() == 0 else os.geteuid())
    uid, gid, groups, pid, cwd = result.stdout.split()
    assert (uid, gid, pid, cwd) == (b"65534", b"65534", b"1", b"/tmp/work")  # PID 1 of its own namespace
    assert groups in (b"[]", b"[65534]")


def test_fallback_without_namespaces_has_landlock_and_seccomp():
    result = run_script("import os\nprint(os.getcwd())", isolation=Isolation(namespaces=False, python=FALLBACK_PYTHON))
    assert "user" not in result.isolation and {"landlock-fs", "seccomp"} <= set(result.isolation)


def test_each_run_gets_a_fresh_working_directory():
    first = run_script("import os\nopen('mine.txt', 'w').write('x')\nprint(os.listdir('.'))")
    second = run_script("import os\nprint(os.listdir('.'))")
    assert first.stdout == b"['mine.txt']\n" and second.stdout == b"[]\n"


def test_wall_clock_limit_kills_the_program():
    result = run_script("import time\ntime.sleep(30)", limits=Limits(wall_s=0.5))
    # Killed, not finished: a sleep that ran its 30 s would have exited 0 (no wall-clock bound
    # here, which a loaded machine can miss without anything being wrong).
    assert result.timed_out and result.signal == signal.SIGKILL


def test_cpu_limit_counts_every_process_of_the_program():
    result = run_script("while True:\n    pass", limits=Limits(wall_s=20, cpu_s=1))
    assert result.limit == "cpu" and result.signal == signal.SIGKILL and 1.0 <= result.cpu_s < 1.5
    spinners = "import os\nfor _ in range(3):\n    if os.fork() == 0:\n        break\nwhile True:\n    pass\n"
    result = run_script(spinners, limits=Limits(wall_s=20, cpu_s=1))
    assert result.limit == "cpu" and 1.0 <= result.cpu_s < 1.5  # four processes, one budget


def test_output_cap_cuts_the_stream_and_kills():
    result = run_script("while True:\n    print('x' * 1000)", limits=Limits(wall_s=10, output_bytes=50_000))
    assert result.output_limited and not result.timed_out
    assert len(result.stdout) == 50_000


def test_file_size_and_memory_limits():
    big_file = run_script("open('f', 'wb').write(b'x' * (3 << 20))", limits=Limits(file_mb=1))
    assert big_file.exit_code == 1 and b"File too large" in big_file.stderr  # Python ignores SIGXFSZ
    memory = run_script("x = bytearray(512 << 20)", limits=Limits(memory_mb=256))
    assert memory.exit_code == 1 and b"MemoryError" in memory.stderr


def test_process_limit():
    program = (
        "import os, time\nn = 0\ntry:\n    for _ in range(50):\n        if os.fork() "
        "== 0:\n            time.sleep(5)\n "
        "           os._exit(0)\n        n += 1\nexcept OSError:\n    pass\nprint(n)"
    )
    result = run_script(program, limits=Limits(wall_s=3, processes=8))
    assert int(result.stdout) < 8


def test_session_calls_and_exceptions():
    source = (
        "class Oops(Exception):\n    pass\n"
        "def add(a, b=0):\n    return a + b\n"
        "class KeyError(Exception):\n    pass\n"
        "def fail(kind):\n    raise {'value': ValueError, 'custom': Oops, 'stop': StopIteration, 'key': KeyError,"
        " 'exit': SystemExit}[kind]('bad')\n"
        "def missing(d):\n    return d['nope']\n"
        "def weird():\n    return object()\n"
    )
    with Session(source, Limits(wall_s=5)) as session:
        assert session.ready and {"add", "fail", "weird"} <= set(session.names)
        add = session.function("add")
        assert add(2, b=3) == 5 and add([1], [2]) == [1, 2]
        # Python's ordinary errors come back as fresh instances of their class, made here.
        with pytest.raises(ValueError, match="^bad$") as raised:
            session.call("fail", ("value",))
        assert type(raised.value) is ValueError and session.raised_by_program(raised.value)
        assert session.raised_text == "fail() raised ValueError: bad"
        with pytest.raises(KeyError) as raised:
            session.call("missing", ({},))
        assert type(raised.value) is KeyError and raised.value.args == ("nope",)
        # Control-flow classes and the program's own classes (whatever their name) never.
        for kind in ("custom", "stop", "key", "exit"):
            with pytest.raises(CandidateError, match=r"fail\(\) raised \w+: bad"):
                session.call("fail", (kind,))
        with pytest.raises(CandidateError, match="not plain data"):
            session.call("weird")
        with pytest.raises(ValueError, match="cannot send"):
            add(object(), 1)
        assert session.failure is None
    assert session.result is not None and session.result.exit_code == 0


def test_session_breaks_on_timeout_and_stays_broken():
    with Session("import time\ndef slow():\n    time.sleep(30)\n", Limits(wall_s=0.5)) as session:
        with pytest.raises(SessionBroken):
            session.call("slow")
        # Whichever notices first, this side's clock or the supervisor's kill (EOF).
        assert "wall-clock" in session.failure or "exited" in session.failure
        with pytest.raises(SessionBroken):
            session.call("slow")
    assert session.result.timed_out


def test_session_that_never_gets_ready():
    with Session("raise RuntimeError('at import')", Limits(wall_s=5)) as session:
        assert not session.ready and "exited" in session.failure
    assert b"at import" in session.result.stderr


@root_only
def test_a_broken_set_up_is_the_scorers_error_not_a_verdict():
    with pytest.raises(SandboxError, match="set-up failed"):
        run_script("print(1)", isolation=Isolation(group=-5))


def test_zygote_is_replaced_when_it_dies():
    assert run_script("print(1)").ok
    zygote = sandbox._ZYGOTES[sys.executable]
    zygote.proc.kill()
    zygote.proc.wait()
    assert run_script("print(2)").stdout == b"2\n"


def test_concurrent_runs_from_threads():
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda i: run_script(f"print({i} * 2)"), range(12)))
    assert [r.stdout for r in results] == [f"{i * 2}\n".encode() for i in range(12)]


_literals = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=4)
        | st.frozensets(st.integers() | st.text(max_size=5), max_size=4).map(set)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_literals)
def test_wire_format_round_trips(value):
    decoded = decode(encode(value))
    assert decoded == value
    assert type(decoded) is type(value)


def test_wire_format_refuses_behaviour():
    class Sneaky:
        def __eq__(self, other):
            return True

    for bad in (Sneaky(), [1, object()], {1: len}, range(3)):
        with pytest.raises(TypeError):
            encode(bad)
    assert math.isnan(decode(encode(math.nan)))


@pytest.mark.parametrize(
    "text",
    [
        '{"x": [1]}',  # unknown tag
        '{"t": [1], "s": [2]}',  # two tags
        "[" * 200 + "]" * 200,  # deeper than MAX_DEPTH
        "1" * 5000,  # over Python's 4300-digit limit
        '{"s": [[1]]}',  # unhashable set member
        "[" + ",".join(str(1 + i * ((1 << 61) - 1)) for i in range(64)) + "]",  # colliding hashes
        '{"d": [[1, 2, 3]]}',
        "not json",
    ],
)
def test_wire_format_refuses_costly_or_malformed_text(text):
    with pytest.raises(WireError):
        decode(text)


def test_wire_format_keeps_repeated_values_and_limits_size():
    assert decode(encode([5] * 1000)) == [5] * 1000  # equal values share a hash: not a collision
    assert decode(encode({-1, -2})) == {-1, -2}  # -1 and -2 do collide in CPython: a few may
    with pytest.raises(WireError, match="bytes"):
        decode("[" + "1," * 600_000 + "1]")
