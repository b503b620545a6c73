"""The sandbox's building blocks: runs, limits, the call protocol, the zygote."""

from __future__ import annotations

import ast
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards import sandbox
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
from rewards.sandbox_child import encode_literal

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and the user switch need root")


def test_exit_status_output_and_stdin():
    result = run_script("import sys\nprint(sys.stdin.read().upper())\nprint('oops', file=sys.stderr)\nsys.exit(3)", stdin=b"hello")
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


@root_only
def test_isolation_in_force_as_root():
    result = run_script("import os\nprint(os.getuid(), os.getgid(), os.getgroups(), os.getpid(), os.getcwd())")
    assert set(result.isolation) == {"mount", "pid", "net", "ipc"}
    assert result.user == SANDBOX_USER
    assert result.stdout.split()[:3] == [b"65534", b"65534", b"[]"]
    assert result.stdout.split()[3] == b"1"  # PID 1 of its own namespace


def test_each_run_gets_a_fresh_working_directory():
    first = run_script("import os\nopen('mine.txt', 'w').write('x')\nprint(os.listdir('.'))")
    second = run_script("import os\nprint(os.listdir('.'))")
    assert first.stdout == b"['mine.txt']\n" and second.stdout == b"[]\n"


def test_wall_clock_limit_kills_the_program():
    started = time.monotonic()
    result = run_script("import time\ntime.sleep(30)", limits=Limits(wall_s=0.5))
    assert result.timed_out and result.signal == signal.SIGKILL
    assert time.monotonic() - started < 3


def test_cpu_limit():
    result = run_script("while True:\n    pass", limits=Limits(wall_s=10, cpu_s=1))
    assert not result.timed_out and result.signal in (signal.SIGXCPU, signal.SIGKILL)


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
    program = "import os, time\nn = 0\ntry:\n    for _ in range(50):\n        if os.fork() == 0:\n            time.sleep(5)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\nprint(n)"
    result = run_script(program, limits=Limits(wall_s=3, processes=8))
    assert int(result.stdout) < 8


def test_session_calls_and_exceptions():
    source = (
        "class Oops(Exception):\n    pass\n"
        "def add(a, b=0):\n    return a + b\n"
        "def fail(kind):\n    raise {'value': ValueError, 'custom': Oops}[kind]('bad')\n"
        "def weird():\n    return object()\n"
    )
    with Session(source, Limits(wall_s=5)) as session:
        assert session.ready and {"add", "fail", "weird"} <= set(session.names)
        add = session.function("add")
        assert add(2, b=3) == 5 and add([1], [2]) == [1, 2]
        with pytest.raises(ValueError, match="bad"):
            session.call("fail", ("value",))
        with pytest.raises(CandidateError, match="Oops: bad"):
            session.call("fail", ("custom",))
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
    lambda inner: st.lists(inner, max_size=4)
    | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=4)
    | st.frozensets(st.integers() | st.text(max_size=5), max_size=4).map(set),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_literals)
def test_literal_encoding_round_trips(value):
    decoded = ast.literal_eval(encode_literal(value))
    assert decoded == value
    assert type(decoded) is type(value)


def test_literal_encoding_refuses_behaviour_and_nan():
    class Sneaky:
        def __eq__(self, other):
            return True

    for bad in (Sneaky(), math.nan, [1, object()], {1: len}, 1.0 + math.nan * 1j):
        with pytest.raises(TypeError):
            encode_literal(bad)
