"""Resume after a crash: a run killed with SIGKILL at several points and re-run ends with the
same artifacts, value for value, as a run that was never interrupted.

The kills land at exact places thanks to the pause points (data.store.pause_point): the
child process stops there and announces it in a marker file, and the test sends SIGKILL to
its process group. Iteration 1 is not checkpointed (save_every 2), so resuming also needs
the replay of its update from the stored artifacts (flows/resume.py).
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
from data.store import TMP_PREFIX, Manifest, remove_stale_temp_files
from flows.config import GRPOConfig

REPO = Path(__file__).resolve().parents[1]
ITERATIONS = 3


def prefers_short(completion: str, example) -> float:
    """A reward with spread on a random model, so every update really moves the weights."""
    return -float(len(completion))


def settings(run_dir: Path, model: Path, dataset: Path) -> dict:
    return dict(
        run_dir=run_dir,
        model=str(model),
        dataset=str(dataset),
        task="arithmetic",
        iterations=ITERATIONS,
        save_every=2,
        prompts_per_iteration=4,
        group_size=3,
        max_new_tokens=4,
        micro_batch_size=4,
        beta=0.04,
        learning_rate=0.01,
        seed=7,
        rewards={"tests.test_resume:prefers_short": 1.0},
        score_workers=1,
    )


def cli_args(config: dict) -> list[str]:
    args = ["run"]
    for key, value in config.items():
        args += ["--" + key.replace("_", "-"), json.dumps(value) if isinstance(value, dict) else str(value)]
    return args


@pytest.fixture()
def dataset(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in builtin.train_problems(40, seed=3)))
    return path


class Child:
    """`grpo run` in its own process group, optionally told to pause at a point."""

    def __init__(self, args: list[str], log: Path, pause_at: str | None, api_url: str):
        self.marker = log.with_suffix(".paused")
        # The tiny model's checkpoint written as a real model's is: on the background writer.
        env = os.environ | {
            "PREFECT_API_URL": api_url,
            "GRPOFLOW_PAUSE_MARKER": str(self.marker),
            "GRPOFLOW_BACKGROUND_SAVE_MIN_BYTES": "0",
        }
        env.pop("GRPOFLOW_PAUSE_AT", None)
        if pause_at is not None:
            env["GRPOFLOW_PAUSE_AT"] = pause_at
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", *args],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text()

    def kill_when_paused(self, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while not self.marker.exists():
            if self.proc.poll() is not None:
                pytest.fail(
                    f"the run ended (status {self.proc.returncode}) before its pause point:\n{self.output()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no pause within {timeout}s:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        os.killpg(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL
        return self.marker.read_text()

    def wait(self, timeout: float = 180) -> None:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not finish within {timeout}s:\n{self.output()[-3000:]}")
        assert code == 0, self.output()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def _optimizer_states_equal(a: Path, b: Path) -> bool:
    import torch  # here, not at the top: scoring workers import this module for its reward

    left, right = torch.load(a, weights_only=True), torch.load(b, weights_only=True)

    def same(x, y) -> bool:
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return isinstance(y, (list, tuple)) and len(x) == len(y) and all(same(p, q) for p, q in zip(x, y))
        return x == y

    return same(left, right)


def _without_timings(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith(("seconds", "time", "tokens_per_second"))}


def test_sigkill_at_every_stage_then_resume_equals_an_uninterrupted_run(
    tmp_path, tiny_model_dir, dataset, prefect_harness
):
    from prefect.settings import PREFECT_API_URL

    from flows.train import grpo_train

    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    grpo_train(GRPOConfig(**settings(reference, tiny_model_dir, dataset)))

    args = cli_args(settings(crashed, tiny_model_dir, dataset))
    api_url = PREFECT_API_URL.value()
    # (where the process is killed, what it must have left behind at that moment). Each kill
    # is followed by a fresh process that resumes the folder.
    kills = [
        (f"write {crashed}/iter-0001/rewards.parquet", "during scoring", ".tmp-rewards.parquet"),
        ("iter-0002/checkpoint: update", "during the update, after its first micro-batch", None),
        # The checkpoint is written on a background thread: the flow goes on into iteration 3
        # (how far, when the kill lands, varies) and its update waits for the write.
        (f"write {crashed}/iter-0002/checkpoint", "during the checkpoint write", ".tmp-checkpoint"),
        # Iteration 2's update is recorded but its checkpoint never landed: this process replays
        # it (and saves it) before iteration 3's update, which it is killed in.
        ("iter-0003/checkpoint: update", "during the last update, after replaying two", None),
    ]
    logs = []
    for n, (pause_at, what, leftover) in enumerate(kills):
        child = Child(args, tmp_path / f"kill-{n}.log", pause_at, api_url)
        try:
            label = child.kill_when_paused()
        finally:
            child.stop()
        assert pause_at in label, what
        if leftover is not None:
            assert any(p.name.startswith(leftover) for p in crashed.rglob(f"{TMP_PREFIX}*")), (
                f"{what}: no partial file to clean up"
            )
        logs.append(child.output())
    # Iteration 1 was never checkpointed (save_every 2): the processes that must redo
    # iteration 2's update first replay iteration 1's from its stored artifacts.
    assert "iter-0001/checkpoint: update replayed" in logs[2] and "iter-0001/checkpoint: update replayed" in logs[3]

    final = Child(args, tmp_path / "final.log", None, api_url)
    try:
        final.wait()
    finally:
        final.stop()
    # Checkpoint 2 was written by then (by the replay of the fourth process): the last process
    # starts from it, so iteration 3's update is applied to weights and optimiser state read
    # from disk.
    assert "iter-0002/checkpoint: update replayed" in logs[3]
    assert "resuming after iteration 2" in final.output()

    assert not list(crashed.rglob(f"{TMP_PREFIX}*")), "temp files left behind"
    for it in range(1, ITERATIONS + 1):
        ref, got = iteration_dir(reference, it), iteration_dir(crashed, it)
        manifest = Manifest(got)
        assert set(manifest.entries()) == set(Manifest(ref).entries())
        assert all(manifest.is_done(name) for name in manifest.entries()), (
            f"iteration {it}: a recorded artifact does not match"
        )
        for name in ("prompts.parquet", "generations.parquet", "rewards.parquet", "advantages.parquet"):
            assert (got / name).read_bytes() == (ref / name).read_bytes(), f"iteration {it}: {name} differs"
        assert _without_timings(json.loads((got / "metrics.json").read_text())) == _without_timings(
            json.loads((ref / "metrics.json").read_text())
        )
        if it == 1:
            assert not (got / "checkpoint").exists() and not (ref / "checkpoint").exists()  # save_every 2
        else:
            assert (got / "checkpoint" / "model.safetensors").read_bytes() == (
                ref / "checkpoint" / "model.safetensors"
            ).read_bytes()
        if it == ITERATIONS:  # only the resumable (last) checkpoint keeps its optimiser state
            assert _optimizer_states_equal(got / "checkpoint" / "optimizer.pt", ref / "checkpoint" / "optimizer.pt")
        else:
            assert (
                not (got / "checkpoint" / "optimizer.pt").exists()
                and not (ref / "checkpoint" / "optimizer.pt").exists()
            )
    assert (crashed / "final" / "model.safetensors").read_bytes() == (
        reference / "final" / "model.safetensors"
    ).read_bytes()
    # The updates did train: the final weights are not the initial ones.
    assert (crashed / "iter-0003" / "checkpoint" / "model.safetensors").read_bytes() != (
        tiny_model_dir / "model.safetensors"
    ).read_bytes()


def test_stale_temp_files_and_checkpoint_folders_are_removed(tmp_path):
    (tmp_path / "iter-0001" / f"{TMP_PREFIX}checkpoint.abc").mkdir(parents=True)
    (tmp_path / "iter-0001" / f"{TMP_PREFIX}checkpoint.abc" / "model.safetensors").write_bytes(b"half")
    (tmp_path / "iter-0001" / f"{TMP_PREFIX}rewards.parquet.xyz").write_bytes(b"half")
    (tmp_path / "iter-0001" / "rewards.parquet").write_bytes(b"whole")
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == [f"{TMP_PREFIX}checkpoint.abc", f"{TMP_PREFIX}rewards.parquet.xyz"]
    assert [p.name for p in (tmp_path / "iter-0001").iterdir()] == ["rewards.parquet"]


def test_pause_point_is_inert_unless_asked(tmp_path, monkeypatch):
    from data.store import atomic_write_bytes

    monkeypatch.setenv("GRPOFLOW_PAUSE_AT", "something-else")
    atomic_write_bytes(tmp_path / "a.bin", b"x")  # passes its pause point without stopping
    assert (tmp_path / "a.bin").read_bytes() == b"x"


def test_a_second_writer_of_a_run_folder_is_refused(tmp_path):
    import fcntl

    from data.run_folder import RunFolderBusy, hold_run_folder

    # Another process's lock, as hold_run_folder leaves it (flock locks are per open file,
    # so a second open in this process stands for that other process).
    other = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(other, b"4242")
    with pytest.raises(RunFolderBusy, match=r"in use by another grpo process \(pid 4242\)"):
        with hold_run_folder(tmp_path):
            pass
    os.close(other)  # what the OS does when that process dies, killed or not
    with hold_run_folder(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    with hold_run_folder(tmp_path):  # released when the block ends: the same process may take it again
        pass
