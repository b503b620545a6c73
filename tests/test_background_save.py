"""Checkpoints written in the background (tasks.model.save_in_background, the local flow's
way): each holds the weights and optimiser state of its own update, the next update waits
for it before changing a weight, and a failed write is raised there, naming the folder."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import tasks.model
import tasks.update
from data.store import DiskFull
from tasks.model import CheckpointNotSaved, forget_live_policies, wait_for_saves
from tasks.objective import LossSettings
from tasks.update import update_policy
from tests import test_update_stage

# test_update_stage's module fixtures, shared by name (pytest finds a fixture as a module attribute):
# one torch thread for tiny matrices, and the tiny model with its generations and advantages.
_one_thread = test_update_stage._one_thread
artifacts = test_update_stage.artifacts


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(
        tasks.model, "BACKGROUND_SAVE_MIN_BYTES", 0
    )  # the tiny model's checkpoint is below the real threshold
    forget_live_policies()
    yield
    try:
        wait_for_saves()  # a test that failed half-way leaves no write for the next one
    finally:
        forget_live_policies()


def two_updates(artifacts, out, background: bool) -> list:
    """Two chained updates from the tiny model, each saving its checkpoint; returns their paths."""
    gens, advs = artifacts[4]
    settings = dict(
        learning_rate=1e-2,
        loss=LossSettings(beta=0.04),
        micro_batch_size=64,
        seed=3,
        device="cpu",
        background_save=background,
    )
    first, second = out / "ck1", out / "ck2"
    update_policy(gens, advs, artifacts["model"], str(first), **settings)
    update_policy(gens, advs, str(first), str(second), **settings)
    wait_for_saves()
    return [first, second]


def optimizer_tensors(path) -> list[torch.Tensor]:
    state = torch.load(path / "optimizer.pt", weights_only=True)["state"]
    return [t for k in sorted(state) for t in state[k].values()]


def test_the_next_update_waits_for_the_write_and_each_checkpoint_holds_its_own_update(artifacts, tmp_path, monkeypatch):
    synchronous = two_updates(artifacts, tmp_path / "sync", background=False)
    forget_live_policies()

    events: list[str] = []
    real_save = tasks.model.save_checkpoint

    def slow_save(policy, final, **kw):  # a slow disk: the next update would run into the write if it did not wait
        events.append("write starts")
        time.sleep(0.3)
        real_save(policy, final, **kw)
        events.append("write ends")

    real_clip = tasks.update.clip_gradients

    def clip(model, norm):  # just before each optimiser step changes the weights
        events.append("step")
        return real_clip(model, norm)

    monkeypatch.setattr(tasks.model, "save_checkpoint", slow_save)
    monkeypatch.setattr(tasks.update, "clip_gradients", clip)
    threads_before = threading.active_count()
    background = two_updates(artifacts, tmp_path / "background", background=True)
    assert events == ["step", "write starts", "write ends", "step", "write starts", "write ends"]
    assert threading.active_count() <= threads_before + 1  # one writer thread, reused

    for sync, bg in zip(synchronous, background, strict=True):
        assert (bg / "model.safetensors").is_file() and not list(bg.parent.glob(".tmp-*"))
        mine, theirs = load_file(bg / "model.safetensors"), load_file(sync / "model.safetensors")
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert all(torch.equal(a, b) for a, b in zip(optimizer_tensors(bg), optimizer_tensors(sync), strict=True))
    first, second = (load_file(p / "model.safetensors") for p in background)
    assert any(not torch.equal(first[k], second[k]) for k in first)  # the second update did move the weights


@pytest.mark.parametrize(
    "error,raised",
    [
        (PermissionError(13, "Permission denied"), CheckpointNotSaved),
        (DiskFull(28, "disk full writing ck1: 1 KiB free there"), DiskFull),
    ],
)
def test_a_failed_background_write_is_raised_by_the_next_update_naming_the_folder(
    artifacts, tmp_path, monkeypatch, error, raised
):
    def failing_save(policy, final, **kw):
        raise error

    monkeypatch.setattr(tasks.model, "save_checkpoint", failing_save)
    gens, advs = artifacts[4]
    settings = dict(
        learning_rate=1e-2,
        loss=LossSettings(beta=0.04),
        micro_batch_size=64,
        seed=3,
        device="cpu",
        background_save=True,
    )
    update_policy(gens, advs, artifacts["model"], str(tmp_path / "ck1"), **settings)  # returns before the write fails
    with pytest.raises(raised, match="ck1"):
        update_policy(gens, advs, str(tmp_path / "ck1"), str(tmp_path / "ck2"), **settings)
    assert not (tmp_path / "ck1").exists() and not (tmp_path / "ck2").exists()
    wait_for_saves()  # reported once: nothing is left pending


def test_a_small_checkpoint_is_written_by_the_update_itself(artifacts, tmp_path):
    gens, advs = artifacts[4]
    tasks.model.BACKGROUND_SAVE_MIN_BYTES = 2**40  # (monkeypatched to 0 above; restored after the test)
    update_policy(
        gens,
        advs,
        artifacts["model"],
        str(tmp_path / "ck1"),
        learning_rate=1e-2,
        loss=LossSettings(beta=0.04),
        micro_batch_size=64,
        seed=3,
        device="cpu",
        background_save=True,
    )
    assert (tmp_path / "ck1" / "model.safetensors").is_file()
    assert not tasks.model.after_save(tmp_path / "ck1", lambda: None)  # nothing was left to a writer


def test_a_failed_rotation_after_a_background_write_warns_and_the_next_update_goes_on(artifacts, tmp_path, monkeypatch):
    import functools
    import logging

    import flows.train

    def no_permission(run_dir, keep):
        raise PermissionError(13, "Permission denied", str(run_dir))

    monkeypatch.setattr(flows.train, "prune_checkpoints", no_permission)
    log = logging.getLogger("test-rotation")
    warnings: list[str] = []
    monkeypatch.setattr(log, "warning", warnings.append)
    gens, advs = artifacts[4]
    settings = dict(
        learning_rate=1e-2,
        loss=LossSettings(beta=0.04),
        micro_batch_size=64,
        seed=3,
        device="cpu",
        background_save=True,
    )
    update_policy(gens, advs, artifacts["model"], str(tmp_path / "ck1"), **settings)
    assert tasks.model.after_save(tmp_path / "ck1", functools.partial(flows.train.rotate_checkpoints, tmp_path, 1, log))
    update_policy(
        gens, advs, str(tmp_path / "ck1"), str(tmp_path / "ck2"), **settings
    )  # the checkpoint landed: no CheckpointNotSaved
    wait_for_saves()
    assert (tmp_path / "ck2" / "model.safetensors").is_file()
    assert len(warnings) == 1 and "could not be removed" in warnings[0] and "Permission denied" in warnings[0]
