"""Scheduled retraining: `grpo serve` against a real `prefect server start`, runs triggered
with `prefect deployment run`; each continues the run folder from its latest checkpoint on
prompts it has not seen. Everything the test starts is stopped, by process group, even
when it fails."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from data import builtin
from data.run_folder import iteration_dir
from data.schemas import PROMPTS
from data.sources import normalise_row, prompts_table
from data.store import Manifest, atomic_write_json, read_table, write_table

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENT = "grpo-scheduled/test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, data: dict | None = None):
    request = urllib.request.Request(
        url, data=None if data is None else json.dumps(data).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_for(what: str, check, timeout: float, procs: list[subprocess.Popen], logs: list[Path]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                pytest.fail(f"{what}: a process exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.25)
    pytest.fail(f"{what}: not within {timeout}s\n" + "\n".join(log.read_text()[-2000:] for log in logs))


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM to the process group (the runner then stops its flow-run processes), SIGKILL
    after `grace` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass


def test_served_deployment_runs_append_iterations_on_unseen_prompts(tmp_path, tiny_model_dir):
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("".join(json.dumps(p) + "\n" for p in builtin.train_problems(8, seed=11)))
    run_dir = tmp_path / "run"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = os.environ | {
        "PREFECT_API_URL": api,  # every child talks to this server
        "PREFECT_HOME": str(tmp_path / "prefect-home"),  # a fresh database
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # the served process looks for runs every second (default 10)
    }
    logs = [tmp_path / "server.log", tmp_path / "serve.log"]
    procs: list[subprocess.Popen] = []
    try:
        with open(logs[0], "w") as out:
            # No UI and no background services: runs are triggered by hand here, and the API
            # is all the runner needs.
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "prefect",
                        "server",
                        "start",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--no-ui",
                        "--no-services",
                    ],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

        def healthy() -> bool:
            try:
                return get_json(f"{api}/health") is True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        wait_for("server health", healthy, 90, procs, logs[:1])
        with open(logs[1], "w") as out:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "flows.cli",
                        "serve",
                        "--cron",
                        "0 3 * * *",
                        "--name",
                        "test",
                        "--run-dir",
                        str(run_dir),
                        "--model",
                        str(tiny_model_dir),
                        "--dataset",
                        str(dataset),
                        "--task",
                        "arithmetic",
                        "--iterations",
                        "1",
                        "--prompts-per-iteration",
                        "4",
                        "--group-size",
                        "3",
                        "--max-new-tokens",
                        "4",
                        "--beta",
                        "0",
                    ],
                    cwd=REPO,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

        def deployed() -> bool:
            try:
                return get_json(f"{api}/deployments/name/{DEPLOYMENT}")["name"] == "test"
            except urllib.error.URLError:
                return False

        wait_for("deployment served", deployed, 90, procs, logs)

        def trigger_and_wait() -> None:
            out = subprocess.run(
                [sys.executable, "-m", "prefect", "deployment", "run", DEPLOYMENT],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0, out.stdout + out.stderr
            run_id = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)

            def finished():
                state = get_json(f"{api}/flow_runs/{run_id}")["state"]
                return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

            state = wait_for("flow run", finished, 120, procs, logs)
            assert state["type"] == "COMPLETED", f"{state['message']}\n{logs[1].read_text()[-3000:]}"

        trigger_and_wait()  # an empty folder: iteration 1 from the given model
        assert (iteration_dir(run_dir, 1) / "metrics.json").is_file()
        assert not iteration_dir(run_dir, 2).exists()
        trigger_and_wait()  # iteration 2, from iteration 1's checkpoint, on the other 4 prompts
    finally:
        for proc in reversed(procs):  # the runner first, while the server can still answer it
            stop(proc)

    second = iteration_dir(run_dir, 2)
    assert (second / "metrics.json").is_file() and (second / "checkpoint" / "model.safetensors").is_file()
    first_ids, second_ids = (
        set(read_table(iteration_dir(run_dir, it) / "prompts.parquet", PROMPTS)["prompt_id"].to_pylist())
        for it in (1, 2)
    )
    assert len(first_ids) == len(second_ids) == 4 and not first_ids & second_ids
    assert str(iteration_dir(run_dir, 1) / "checkpoint") in Manifest(second).entries()["generations.parquet"]["inputs"]
    assert json.loads((run_dir / "config.json").read_text())["config"]["iterations"] == 2


def test_a_run_with_no_unseen_prompts_adds_nothing_and_leaves_no_pool(tmp_path, prefect_harness):
    from flows.serve import grpo_scheduled

    run_dir = tmp_path / "run"
    rows = builtin.train_problems(4, seed=2)
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("".join(json.dumps(p) + "\n" for p in rows))
    # A folder whose iteration 1 already used every prompt of the dataset.
    seen = prompts_table([normalise_row(r, data_source=str(dataset), row=i) for i, r in enumerate(rows)])
    write_table(seen, iteration_dir(run_dir, 1) / "prompts.parquet", PROMPTS)
    Manifest(iteration_dir(run_dir, 1)).record("prompts.parquet")
    atomic_write_json(iteration_dir(run_dir, 1) / "metrics.json", {"iteration": 1, "reward": 0.0})
    settings = {
        "dataset": str(dataset),
        "task": "arithmetic",
        "prompts_per_iteration": 2,
        "model": "unused-never-loaded",
    }

    result = grpo_scheduled(str(run_dir), settings, iterations=3)
    assert result == {"iterations_added": 0, "last_iteration": 1, "unseen_prompts": 0}
    assert not (run_dir / "dataset" / "prompts-from-0002.parquet").exists()
    assert "prompts-from-0002.parquet" not in Manifest(run_dir / "dataset").entries()


def test_serve_needs_a_run_folder_and_a_valid_config(capsys):
    from flows.cli import main

    assert main(["serve", "--cron", "0 3 * * *"]) == 2
    assert "grpo serve needs --run-dir" in capsys.readouterr().err
    assert main(["serve", "--run-dir", "x", "--group-size", "1"]) == 2  # checked now, not at 3 a.m.
    assert "'group_size'" in capsys.readouterr().err
