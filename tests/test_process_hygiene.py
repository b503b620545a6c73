"""No process of ours outlives the CLI (issue 13, section 5): `grpo run` killed with SIGKILL
mid-run leaves neither its Prefect API server nor a scoring worker behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data import builtin

pytestmark = pytest.mark.slow  # kills a `grpo run` subprocess

ROOT = Path(__file__).resolve().parents[1]


def _session_members(sid: int) -> dict[int, str]:
    """pid -> command line of every live process in session `sid` (zombies aside)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            if int(fields[3]) == sid and fields[0] != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue  # gone while we looked
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkill_of_grpo_run_leaves_no_process_behind(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in builtin.train_problems(64, seed=1)))
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"OMP_NUM_THREADS": "1"}
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            "--run-dir",
            str(run),
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(data),
            "--iterations",
            "200",
            "--prompts-per-iteration",
            "2",
            "--group-size",
            "2",
            "--max-new-tokens",
            "2",
            "--score-workers",
            "1",
        ],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not (run / "iter-0002").exists():  # the flow is running: server and scoring workers are up
            assert cli.poll() is None, cli.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the run did not reach iteration 2"
            time.sleep(0.2)
        children = _session_members(cli.pid)
        assert any("uvicorn" in c and "prefect.server" in c for c in children.values()), (
            children
        )  # the API server is ours
        assert len(children) >= 3, children  # the CLI, the server, a scoring worker
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait(timeout=10)
        deadline = time.monotonic() + 20  # the server gets SIGTERM and shuts down; workers get SIGKILL
        while (left := _session_members(cli.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"still running after SIGKILL of grpo run: {left}"
    finally:
        if cli.poll() is None:
            cli.kill()
        for pid in _session_members(cli.pid):  # never leave our own strays to the next test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
