"""Ctrl-C and SIGTERM stop a command (issue 24): `grpo run` / `grpo rescore` / `grpo serve`,
started as a terminal starts them (own session and process group, output to a file, not a
TTY, no PREFECT_API_URL: each starts its own Prefect API), get the signal sent to their
process group as a terminal sends Ctrl-C, and must

* print one line naming where they stopped and the command that resumes them, and exit
  130 (SIGINT) or 143 (SIGTERM);
* stop at once: no stage recorded after the signal (counted in the manifests) and little
  CPU spent stopping (read from /proc before the signal and from wait4 after). Wall-clock
  limits are only generous hang detectors (HANG_S): a loaded 2-core machine can take
  seconds for what an idle one does in one, but a hang never ends;
* leave no process behind: every process descended from the command when the signal came
  (found by parent links, so the sandbox's zygotes and supervisors, which live in sessions
  of their own, are included) and every process of its session;
* resume, in a new process, to the artifacts of a run that was never interrupted.

The stops land at exact places thanks to the pause points (data.store.pause_point), as in
tests/test_resume.py, whose settings, reward and comparisons are reused.
"""

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
from data.run_folder import iteration_dir
from data.store import TMP_PREFIX, Manifest
from flows.config import GRPOConfig
from tests.test_resume import _without_timings, cli_args, settings

REPO = Path(__file__).resolve().parents[1]
ITERATIONS = 2
HANG_S = 180  # a command still running this long after its signal hangs (a stop takes ~2-8 s here)
STOP_CPU_S = 10.0  # CPU seconds a stop may cost, the command and its children together
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def run_settings(run_dir: Path, model: Path, dataset: Path) -> dict:
    return settings(run_dir, model, dataset) | {"iterations": ITERATIONS}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stop-data") / "train.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in builtin.train_problems(40, seed=3)))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, dataset, prefect_harness) -> Path:
    """One uninterrupted run, shared by every case of this module."""
    from flows.train import grpo_train

    folder = tmp_path_factory.mktemp("stop-reference") / "run"
    grpo_train(GRPOConfig(**run_settings(folder, tiny_model_dir, dataset)))
    return folder


# --- processes, read from /proc -----------------------------------------------------------------
def _processes() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, session id, start time) of every live process (zombies aside)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone while we looked
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if fields[0] != "Z":
            found[int(entry.name)] = (int(fields[1]), int(fields[3]), int(fields[19]))
    return found


def _family(root: int) -> set[tuple[int, int]]:
    """(pid, start time) of `root` and every process descended from it, whatever its session."""
    table = _processes()
    family, frontier = set(), [root]
    while frontier:
        pid = frontier.pop()
        if pid in table:
            family.add((pid, table[pid][2]))
            frontier += [child for child, (parent, _, _) in table.items() if parent == pid]
    return family


def _still_alive(family: set[tuple[int, int]], session: int) -> list[str]:
    """Processes of `family` still running (the same pid and start time), and any process of `session`."""
    table = _processes()
    left = {pid for pid, started in family if table.get(pid, (0, 0, -1))[2] == started}
    left |= {pid for pid, (_, sid, _) in table.items() if sid == session}
    described = []
    for pid in sorted(left):
        try:
            command = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")
            described.append(f"{pid}: {command[:200]!r}")
        except OSError:
            continue
    return described


def _cpu_seconds(family: set[tuple[int, int]]) -> float:
    total = 0
    for pid, _ in family:
        try:
            stat = (Path("/proc") / str(pid) / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / CLOCK_TICKS


def _recorded(run_dir: Path) -> set[str]:
    """Every output recorded as done in the run folder's manifests."""
    folders = [run_dir, run_dir / "dataset", *sorted(run_dir.glob("iter-*"))]
    return {f"{m.folder.name}/{name}" for m in map(Manifest, folders) for name in m.entries() if m.is_done(name)}


# --- a command as a terminal starts it ------------------------------------------------------------
class Command:
    """`grpo ARGS` in its own session, output to a file (not a TTY), optionally told to pause
    at a point (data.store.pause_point); it starts its own Prefect API."""

    def __init__(self, args: list[str], log: Path, pause_at: str | None = None, env: dict[str, str] | None = None):
        self.log, self.marker = log, log.with_suffix(".paused")
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "GRPOFLOW_PAUSE_AT")} | (env or {})
        # (no OMP_NUM_THREADS here: the reference run's thread count gives its exact samples)
        env |= {"GRPOFLOW_PAUSE_MARKER": str(self.marker)}
        if pause_at is not None:
            env["GRPOFLOW_PAUSE_AT"] = pause_at
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", *args],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.proc.pid

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, ready, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"ended (status {self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"not {what} within {timeout}s:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def wait_paused(self) -> str:
        self.wait_for(self.marker.exists, "its pause point")
        return self.marker.read_text()

    def reap(self, timeout: float = HANG_S) -> tuple[int, float]:
        """(exit status, CPU seconds of its whole life, waited-for children included)."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                return self.proc.returncode, usage.ru_utime + usage.ru_stime
            if time.monotonic() > deadline:
                pytest.fail(f"still running {timeout}s after its signal (a hang):\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def finish(self) -> None:
        code, _ = self.reap(timeout=600)
        assert code == 0, self.output()[-3000:]

    def kill(self) -> None:
        """Test clean-up: nothing of ours is left to the next test, whatever failed."""
        family = _family(self.pid)
        for pid, _ in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.returncode is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def stop_when_paused(command: Command, signum: int, run_dir: Path | None) -> str:
    """Send `signum` to the paused command's process group; check that it stopped at once,
    with its status and one line, and left nothing behind. Returns that line."""
    command.wait_paused()
    recorded = _recorded(run_dir) if run_dir is not None else set()
    family = _family(command.pid)
    assert len(family) >= 2, "the command and its Prefect API, at least"
    cpu_before = _cpu_seconds(family)
    os.killpg(command.pid, signum)
    code, cpu_total = command.reap()
    output = command.output()
    assert code == 128 + signum, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("grpo: stopping on")]
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0], output[-3000:]
    assert "stopped at once" not in output, output[-3000:]  # not the clean-up's time limit
    assert "Traceback" not in output, output[-3000:]
    if run_dir is not None:
        assert _recorded(run_dir) == recorded, "a stage was recorded after the signal: it did not stop at once"
        assert not list(run_dir.rglob(f"{TMP_PREFIX}*")), "a half-written file was left"
    spent = cpu_total - cpu_before
    assert spent < STOP_CPU_S, f"stopping cost {spent:.1f} CPU seconds:\n{output[-3000:]}"
    for _ in range(100):  # children the kernel signals when their parent dies take a moment to go
        if not (left := _still_alive(family, command.pid)):
            break
        time.sleep(0.1)
    assert not left, f"still running after the command stopped: {left}"
    return lines[0]


def same_artifacts(got: Path, ref: Path) -> None:
    """The artifacts of `got` are those of `ref`, value for value (timings aside)."""
    for it in range(1, ITERATIONS + 1):
        a, b = iteration_dir(got, it), iteration_dir(ref, it)
        assert set(Manifest(a).entries()) == set(Manifest(b).entries())
        for name in ("prompts.parquet", "generations.parquet", "rewards.parquet", "advantages.parquet"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), f"iteration {it}: {name} differs"
        assert _without_timings(json.loads((a / "metrics.json").read_text())) == _without_timings(
            json.loads((b / "metrics.json").read_text())
        )
    last = iteration_dir(got, ITERATIONS) / "checkpoint" / "model.safetensors"
    assert last.read_bytes() == (iteration_dir(ref, ITERATIONS) / "checkpoint" / "model.safetensors").read_bytes()
    assert (got / "final" / "model.safetensors").read_bytes() == (ref / "final" / "model.safetensors").read_bytes()
    assert not list(got.rglob(f"{TMP_PREFIX}*")), "temp files left behind"


def _other(signum: int) -> int:
    return signal.SIGTERM if signum == signal.SIGINT else signal.SIGINT


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux's")
@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT-first", "SIGTERM-first"])
def test_a_signal_during_each_stage_stops_the_run_and_resuming_equals_an_uninterrupted_run(
    tmp_path, tiny_model_dir, dataset, reference, first
):
    """Each kind of stage of `grpo run` in turn, the signals alternating: the two cases together
    send SIGINT and SIGTERM during each. Every stop is followed by a new process that
    resumes the folder, up to the next stop; the last one finishes the run."""
    run = tmp_path / "run"
    args = cli_args(run_settings(run, tiny_model_dir, dataset))
    # (pause point, the stage the stop line names). The select and advantages stages stop as
    # the generate stage does (in the main thread, in an artifact's atomic write): a process
    # started per stop costs 15-110 s on 2 busy cores, so they are not repeated here.
    stops = [
        (f"write {run}/iter-0001/generations.parquet", "iter-0001/generations.parquet"),
        ("iter-0001/rewards.parquet: score", "iter-0001/rewards.parquet"),  # the scoring workers busy
        # Iteration 1 was not checkpointed (save_every 2): this update first replays it.
        ("iter-0002/checkpoint: update", "iter-0002/checkpoint"),
        (f"write {run}/final", "final"),  # the final export
    ]
    for n, (pause_at, stage) in enumerate(stops):
        signum = first if n % 2 == 0 else _other(first)
        command = Command(args, tmp_path / f"stop-{n}.log", pause_at)
        try:
            line = stop_when_paused(command, signum, run)
        finally:
            command.kill()
        assert f"during {stage}" in line, line
        resume = line.split("resume with: ", 1)[1].split(" (", 1)[0]
        assert resume.startswith("grpo run ") and f"--run-dir {run}" in resume, line
    finish = Command(args, tmp_path / "finish.log")
    try:
        finish.finish()
    finally:
        finish.kill()
    same_artifacts(run, reference)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux's")
def test_a_second_ctrl_c_exits_at_once(tmp_path, tiny_model_dir, dataset):
    """The first Ctrl-C's clean-up waits for the checkpoint being written in the background;
    that write is held at its pause point, so only the second Ctrl-C can end the process."""
    run = tmp_path / "run"
    args = cli_args(run_settings(run, tiny_model_dir, dataset) | {"save_every": 1})
    # The tiny model's checkpoint written as a real model's is: on the background writer.
    background = {"GRPOFLOW_BACKGROUND_SAVE_MIN_BYTES": "0"}
    command = Command(args, tmp_path / "run.log", f"write {run}/iter-0001/checkpoint", env=background)
    try:
        command.wait_paused()
        family = _family(command.pid)
        os.killpg(command.pid, signal.SIGINT)
        command.wait_for(lambda: "grpo: stopping on SIGINT" in command.output(), "its stop line")
        os.killpg(command.pid, signal.SIGINT)
        code, _ = command.reap()
        assert code == 130, command.output()[-3000:]
        assert "stopped at once by a second SIGINT" in command.output()
        for _ in range(100):
            if not (left := _still_alive(family, command.pid)):
                break
            time.sleep(0.1)
        assert not left, f"still running after the second Ctrl-C: {left}"
    finally:
        command.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux's")
def test_losing_the_prefect_api_fails_the_run_in_one_line(tmp_path, tiny_model_dir, dataset):
    """The run's own API server killed under it (an OOM kill, a stray `kill`): the run ends at
    once, in one line, instead of training on against a dead API."""
    run = tmp_path / "run"
    command = Command(
        cli_args(run_settings(run, tiny_model_dir, dataset)), tmp_path / "run.log", "rewards.parquet: score"
    )
    try:
        command.wait_paused()
        family = _family(command.pid)
        servers = [pid for pid, _ in family if b"prefect.server" in (Path("/proc") / str(pid) / "cmdline").read_bytes()]
        assert len(servers) == 1, family
        os.kill(servers[0], signal.SIGKILL)
        code, _ = command.reap()
        output = command.output()
        assert code == 2, output[-3000:]
        errors = [line for line in output.splitlines() if line.startswith("grpo: error:")]
        assert len(errors) == 1 and "Prefect API server of this command" in errors[0], output[-3000:]
        assert f"resume with: grpo run --run-dir {run}" in errors[0]
        assert "Traceback" not in output
        for _ in range(100):
            if not (left := _still_alive(family, command.pid)):
                break
            time.sleep(0.1)
        assert not left, f"still running after the API was lost: {left}"
    finally:
        command.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux's")
def test_building_the_tiny_model_is_announced_on_a_console_that_is_not_a_terminal(tmp_path):
    """A cold `grpo run` (no --model, an empty cache) says, before the minutes of the build,
    that it builds the built-in model; here the console is a file, as under CI or `| tee`.
    The run is then stopped with SIGTERM during that build."""
    args = ["run", "--run-dir", str(tmp_path / "run"), "--tiny-model-sft-steps", "400", "--iterations", "1"]
    command = Command(args, tmp_path / "run.log", env={"GRPOFLOW_CACHE": str(tmp_path / "cache")})
    try:
        command.wait_for(lambda: "building the built-in tiny model once" in command.output(), "the build's line")
        family = _family(command.pid)
        os.killpg(command.pid, signal.SIGTERM)
        code, _ = command.reap()
        assert code == 143, command.output()[-3000:]
        for _ in range(100):
            if not (left := _still_alive(family, command.pid)):
                break
            time.sleep(0.1)
        assert not left, f"still running after SIGTERM: {left}"
    finally:
        command.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux's")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_grpo_serve_stops_on_a_signal(tmp_path, tiny_model_dir, dataset, signum):
    """`grpo serve`, waiting for its next scheduled run, stops on Ctrl-C and on SIGTERM with
    its own Prefect API and every other process it started."""
    run = tmp_path / "run"
    args = ["serve", "--run-dir", str(run), "--model", str(tiny_model_dir), "--dataset", str(dataset)]
    command = Command(args, tmp_path / "serve.log")
    try:
        command.wait_for(lambda: "is being served" in command.output(), "serving")
        family = _family(command.pid)
        os.killpg(command.pid, signum)
        code, _ = command.reap()
        output = command.output()
        assert code == 128 + signum, output[-3000:]
        lines = [line for line in output.splitlines() if line.startswith("grpo: stopping on")]
        assert len(lines) == 1 and lines[0].endswith("again stops at once)"), output[-3000:]
        assert "resume with: grpo serve --run-dir" in lines[0]
        assert "Traceback" not in output, output[-3000:]
        for _ in range(100):
            if not (left := _still_alive(family, command.pid)):
                break
            time.sleep(0.1)
        assert not left, f"still running after {signal.Signals(signum).name}: {left}"
    finally:
        command.kill()
