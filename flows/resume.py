"""Continuing a run folder: where to start again, how to get the policy back, which
prompts an iteration draws from, and one writer per folder.

A run folder is resumed by running the flow on it again (DESIGN.md, "Run directory"):

* **Start point.** The flow starts after the last iteration that is complete (its
  ``metrics.json`` written) *and* checkpointed (``checkpoint/`` saved and recorded): the
  policy and optimiser state come from that checkpoint, and older iterations are not even
  re-checked, so a resume costs the same after 5 iterations or after 5,000.
* **Replay.** With ``save_every > 1`` the iterations after that checkpoint may be done on
  disk (artifacts recorded) while their updated weights were only ever in the memory of the
  killed process. Those updates are *replayed*: the same update stage, with the same
  arguments, on the stored generations and advantages, in order. Nothing is generated again
  and the result is the same weights and optimiser state, because every input of an update
  is on disk and its shuffling is seeded by the iteration. A replay happens only when a
  stage that is about to run reads those weights (a later generate, update or eval).
* **Half-done stages** were never recorded in the manifest, so they run again from their
  inputs; the temp files they left are removed when the flow starts.
* **Settings.** A folder is resumed with its stored settings (config.json). A different
  value of a setting that changes what the artifacts mean is refused before anything is
  written (`SettingsMismatch`, one line per setting, stored vs given); the settings listed
  in flows.config.MID_RUN_SAFE may change, and each change is kept in config.json's
  "changes" with the first iteration it applies to.
* **Rotation.** Once an iteration is complete, `prune_checkpoints` keeps the newest
  ``save_total_limit`` checkpoints and removes the optimiser state from all but the newest
  one: only the checkpoint a resume starts from needs it (1.1 of the 1.6 GB per iteration at
  135M parameters). The resumable checkpoint is never removed, whatever the limit.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.store import TMP_PREFIX, Manifest, iteration_dir
from tasks.progress import stage_label

CHECKPOINT = "checkpoint"
OPTIMIZER_FILE = "optimizer.pt"  # tasks.model's name too; not imported: this module must not load torch
POOL_PREFIX = "prompts-from-"  # dataset/prompts-from-0007.parquet: prompts of iterations 7..


# --- start point -------------------------------------------------------------------------
@dataclass(frozen=True)
class ResumePoint:
    iteration: int  # the last complete, checkpointed iteration
    checkpoint: str  # its checkpoint folder: the policy the next iteration starts from


def iteration_numbers(run_dir: str | Path) -> list[int]:
    """The iterations that have a folder in `run_dir` (iter-0000 is the baseline eval)."""
    numbers = []
    for folder in Path(run_dir).glob("iter-*"):
        suffix = folder.name.removeprefix("iter-")
        if folder.is_dir() and suffix.isdigit():
            numbers.append(int(suffix))
    return sorted(numbers)


def resume_point(run_dir: str | Path, up_to: int) -> ResumePoint | None:
    """The latest iteration <= `up_to` that is complete and has a saved checkpoint."""
    for it in reversed([n for n in iteration_numbers(run_dir) if 1 <= n <= up_to]):
        folder = iteration_dir(run_dir, it)
        entry = Manifest(folder).entries().get(CHECKPOINT, {})
        if entry.get("kind") == "folder" and (folder / CHECKPOINT).is_dir() and (folder / "metrics.json").is_file():
            return ResumePoint(it, str(folder / CHECKPOINT))
    return None


START_POLICY = "start-policy"  # manifest entry: the policy an iteration started from, when not the previous one's


def record_start_policy(run_dir: str | Path, iteration: int, policy: str) -> bool:
    """Make `iteration` start from `policy` instead of the previous iteration's checkpoint,
    unless it has started already (then it keeps what it started from: a resume continues
    the same run). Recorded in its manifest, so every later resume starts it the same way."""
    manifest = Manifest(iteration_dir(run_dir, iteration))
    if manifest.entries():
        return False
    manifest.record(START_POLICY, policy=str(policy))
    return True


def start_policy(run_dir: str | Path, iteration: int) -> str | None:
    """The policy recorded by `record_start_policy` for `iteration`, if any."""
    return Manifest(iteration_dir(run_dir, iteration)).entries().get(START_POLICY, {}).get("policy")


def checkpointed_iterations(run_dir: str | Path) -> list[int]:
    """The iterations whose checkpoint folder is on disk, oldest first."""
    return [it for it in iteration_numbers(run_dir) if it >= 1 and (iteration_dir(run_dir, it) / CHECKPOINT).is_dir()]


def _remove_folder(folder: Path) -> None:
    # Renamed first, so a kill mid-delete leaves a .tmp-* folder (removed at the next start),
    # never a half checkpoint under its real name.
    doomed = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}removed-{folder.name}.", dir=folder.parent))
    os.replace(folder, doomed / folder.name)
    shutil.rmtree(doomed)


def _mark_removed(folder: Path) -> None:
    """Note in the manifest that the checkpoint was removed on purpose (grpo inspect shows
    'removed', not 'changed'); it stays recorded as done, so nothing tries to redo it."""
    Manifest(folder).annotate(CHECKPOINT, removed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def prune_checkpoints(run_dir: str | Path, keep: int | None) -> dict[str, list[int]]:
    """Keep the newest `keep` checkpoints (None: all) and the optimiser state of the
    resumable one only. Checkpoints newer than the resumable one (their iteration not yet
    complete) are left alone. Returns the iterations whose checkpoint / optimiser state
    was removed."""
    resumable = resume_point(run_dir, 10**9)
    if resumable is None:
        return {"checkpoints": [], "optimizer_states": []}
    older = [it for it in checkpointed_iterations(run_dir) if it <= resumable.iteration]
    kept = older if keep is None else older[-keep:]
    if resumable.iteration not in kept:  # cannot happen with keep >= 1, but never lose it
        kept.append(resumable.iteration)
    removed, stripped = [], []
    for it in older:
        folder = iteration_dir(run_dir, it) / CHECKPOINT
        if it not in kept:
            _remove_folder(folder)
            _mark_removed(iteration_dir(run_dir, it))
            removed.append(it)
        elif it != resumable.iteration and (folder / OPTIMIZER_FILE).exists():
            (folder / OPTIMIZER_FILE).unlink()
            stripped.append(it)
    return {"checkpoints": removed, "optimizer_states": stripped}


def saved_metrics(run_dir: str | Path, iteration: int) -> dict:
    path = iteration_dir(run_dir, iteration) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# --- settings of a resumed folder ----------------------------------------------------------
class SettingsMismatch(ValueError):
    pass


def stored_settings(run_dir: str | Path) -> dict[str, Any]:
    """The settings in `run_dir`'s config.json ({} for a new folder)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SettingsMismatch(f"{path}: not valid JSON ({err}); it holds the settings of this run folder") from None
    return dict(saved.get("config", saved))


def completed_iterations(run_dir: str | Path) -> int:
    """The highest iteration with its metrics.json written (0 for a new folder)."""
    done = [
        it for it in iteration_numbers(run_dir) if it >= 1 and (iteration_dir(run_dir, it) / "metrics.json").is_file()
    ]
    return max(done, default=0)


def _same(name: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    # One local folder or file named two ways ("./m" and "/abs/m") is the same setting.
    if name in ("model", "dataset", "eval_dataset") and isinstance(old, str) and isinstance(new, str):
        a, b = Path(old).expanduser(), Path(new).expanduser()
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    return False


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list, str)) else str(value)


def setting_changes(run_dir: str | Path, config) -> dict[str, tuple[Any, Any]]:
    """The settings of `config` that differ from `run_dir`'s stored ones, as (stored, given);
    refuses (SettingsMismatch) when any of them may not change mid-run, or when fewer
    iterations are asked for than are already done. {} for a new folder."""
    from flows.config import GRPOConfig, may_change_mid_run

    stored = stored_settings(run_dir)
    if not stored:
        return {}
    try:
        before = GRPOConfig(**stored).model_dump(mode="json")
    except ValueError as err:  # pydantic's ValidationError is a ValueError
        detail = (
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            if hasattr(err, "errors")
            else str(err)
        )
        raise SettingsMismatch(
            f"{Path(run_dir) / 'config.json'}: its settings are not valid for this grpoflow ({detail}); "
            "resume it with the grpoflow version that wrote it, or start a new --run-dir"
        ) from None
    after = config.model_dump(mode="json")
    changes = {k: (before.get(k), after[k]) for k in after if not _same(k, before.get(k), after[k]) and k != "run_dir"}
    refused = {k: v for k, v in changes.items() if not may_change_mid_run(k)}
    if refused:
        lines = [
            f"run folder {run_dir} holds a run made with other settings ({len(refused)} differ); a resume may not change what "
            "its artifacts mean: drop these flags to resume, or give a new --run-dir"
        ]
        lines += [f"  {k}: stored {_shown(old)}, given {_shown(new)}" for k, (old, new) in sorted(refused.items())]
        raise SettingsMismatch("\n".join(lines))
    done = completed_iterations(run_dir)
    if config.iterations < done:
        raise SettingsMismatch(
            f"run folder {run_dir} already has {done} complete iterations; --iterations {config.iterations} "
            f"would go back (give {done} or more)"
        )
    return changes


def resumed_config(given: dict[str, Any]):
    """The config of a run: `given` (flags and --config file) on top of the stored settings
    of its run folder when it has some, checked by `setting_changes` before anything is
    written."""
    from flows.config import GRPOConfig

    run_dir = given.get("run_dir")
    stored = stored_settings(run_dir) if run_dir is not None else {}
    config = GRPOConfig(**(stored | given))
    if stored:
        setting_changes(run_dir, config)
    return config


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {_shown(old)} -> {_shown(new)}" for k, (old, new) in sorted(changes.items()))


# --- replay ------------------------------------------------------------------------------
@dataclass
class _Deferred:
    checkpoint: str  # where the weights of this update belong
    label: str  # "iter-0004/checkpoint"
    call: Callable[[], Any]  # the update stage with the arguments it was first run with


class PendingUpdates:
    """Updates recorded as done whose weights are neither saved nor held in memory."""

    def __init__(self) -> None:
        self._deferred: list[_Deferred] = []

    def clear(self) -> None:
        self._deferred.clear()

    def defer(self, checkpoint: str | Path, label: str, call: Callable[[], Any]) -> None:
        """Note a skipped update, unless its weights are on disk or in this process."""
        from tasks.model import holds_live_policy  # here: `grpo inspect` imports this module and must not load torch

        checkpoint = str(checkpoint)
        if Path(checkpoint).is_dir() or holds_live_policy(checkpoint):
            return
        self._deferred.append(_Deferred(checkpoint, label, call))

    def catch_up(self, used: Iterable[Any], log) -> None:
        """Replay, in order, the deferred updates up to the last one whose weights appear in
        `used` (the arguments of a stage about to run)."""
        paths = {str(v) for v in _flatten(used)}
        last = max((i for i, d in enumerate(self._deferred) if d.checkpoint in paths), default=-1)
        for deferred in self._deferred[: last + 1]:
            started = time.perf_counter()
            with stage_label(deferred.label):
                deferred.call()
            log.info(
                f"{deferred.label}: update replayed from the stored generations and advantages ({time.perf_counter() - started:.1f}s)"
            )
        del self._deferred[: last + 1]


def _flatten(values: Iterable[Any]) -> Iterable[Any]:
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flatten(v)
        else:
            yield v


# --- prompt pools ------------------------------------------------------------------------
def prompt_pool(data_manifest: Manifest, default: str, iteration: int) -> tuple[str, int]:
    """The prompt file iteration `iteration` draws from, and the iteration before its first.

    A plain run draws every iteration from ``dataset/prompts.parquet``. A scheduled run
    (flows/serve.py) adds ``prompts-from-NNNN.parquet`` with the prompts no earlier
    iteration used; iterations from NNNN on walk through that file from its start.
    """
    best: tuple[int, str] | None = None
    for name, entry in data_manifest.entries().items():
        first = entry.get("first_iteration")
        if (
            name.startswith(POOL_PREFIX)
            and isinstance(first, int)
            and first <= iteration
            and (best is None or first > best[0])
        ):
            best = (first, name)
    if best is None:
        return default, 0
    return str(data_manifest.folder / best[1]), best[0] - 1


def pool_name(first_iteration: int) -> str:
    return f"{POOL_PREFIX}{first_iteration:04d}.parquet"


# --- one writer per run folder ------------------------------------------------------------
class RunFolderBusy(RuntimeError):
    pass


_HELD: dict[str, int] = {}


def hold_run_folder(run_dir: str | Path) -> None:
    """Take `run_dir`'s lock for this process (two runs writing one folder would interleave
    their artifacts). The OS drops it when the process ends, killed or not; a second call
    from the same process is a no-op."""
    key = os.path.abspath(run_dir)
    if key in _HELD:
        return
    fd = os.open(Path(run_dir) / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunFolderBusy(f"run folder {run_dir} is in use by another grpo process (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _HELD[key] = fd


def release_run_folder(run_dir: str | Path) -> None:
    fd = _HELD.pop(os.path.abspath(run_dir), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock
