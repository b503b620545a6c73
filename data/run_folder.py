"""What a run folder holds and where, known in one place: iteration folders, the start point
of a resume, checkpoint rotation, prompt pools of scheduled runs, and one writer per folder.

A run folder is resumed by running the flow on it again (docs/design.md, "Run directory"):

* **Start point.** The flow starts after the last iteration that is complete (its
  ``metrics.json`` written) *and* checkpointed (``checkpoint/`` saved and recorded): the
  policy and optimiser state come from that checkpoint, and older iterations are not even
  re-checked, so a resume costs the same after 5 iterations or after 5,000.
* **Replay.** With ``save_every > 1`` the iterations after that checkpoint may be done on
  disk while their updated weights were only in the memory of the killed process; the flow's
  runner replays those updates from their stored artifacts (flows/runner.py).
* **Half-done stages** were never recorded in the manifest, so they run again from their
  inputs; the temp files they left are removed when the flow starts.
* **Rotation.** Once an iteration is complete, `prune_checkpoints` keeps the newest
  ``save_total_limit`` checkpoints and removes the optimiser state from all but the newest
  one: only the checkpoint a resume starts from needs it (1.1 of the 1.6 GB per iteration at
  135M parameters). The resumable checkpoint is never removed, whatever the limit.

This module reads and writes files only: `grpo inspect` imports it and must not load torch.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from data.store import TMP_PREFIX, Manifest

ITERATION_PREFIX = "iter-"  # iter-0003/: the artifacts of iteration 3 (iter-0000: the baseline evaluation)
CHECKPOINT = "checkpoint"
OPTIMIZER_FILE = "optimizer.pt"  # tasks.model's name too; not imported: this module must not load torch
POOL_PREFIX = "prompts-from-"  # dataset/prompts-from-0007.parquet: prompts of iterations 7..
FINAL = "final"  # <run_dir>/final/: the trained model of a run
METRICS_FILE = "metrics.json"  # an iteration is complete once its metrics.json is written


def iteration_dir(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / f"{ITERATION_PREFIX}{iteration:04d}"


def iteration_of(folder: str | Path) -> int | None:
    """The iteration an ``iter-NNNN`` folder holds, or None for any other folder."""
    suffix = Path(folder).name.removeprefix(ITERATION_PREFIX)
    return int(suffix) if Path(folder).name.startswith(ITERATION_PREFIX) and suffix.isdigit() else None


def is_iteration_dir(folder: str | Path) -> bool:
    return iteration_of(folder) is not None


# --- start point -------------------------------------------------------------------------
@dataclass(frozen=True)
class ResumePoint:
    iteration: int  # the last complete, checkpointed iteration
    checkpoint: str  # its checkpoint folder: the policy the next iteration starts from


def iteration_numbers(run_dir: str | Path) -> list[int]:
    """The iterations that have a folder in `run_dir` (iter-0000 is the baseline eval)."""
    found = (iteration_of(folder) for folder in Path(run_dir).glob(f"{ITERATION_PREFIX}*") if folder.is_dir())
    return sorted(n for n in found if n is not None)


def resume_point(run_dir: str | Path, up_to: int) -> ResumePoint | None:
    """The latest iteration <= `up_to` that is complete and has a saved checkpoint."""
    for it in reversed([n for n in iteration_numbers(run_dir) if 1 <= n <= up_to]):
        folder = iteration_dir(run_dir, it)
        entry = Manifest(folder).entries().get(CHECKPOINT, {})
        if entry.get("kind") == "folder" and (folder / CHECKPOINT).is_dir() and (folder / METRICS_FILE).is_file():
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


def completed_iterations(run_dir: str | Path) -> int:
    """The highest iteration with its metrics.json written (0 for a new folder)."""
    done = [
        it for it in iteration_numbers(run_dir) if it >= 1 and (iteration_dir(run_dir, it) / METRICS_FILE).is_file()
    ]
    return max(done, default=0)


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


@contextmanager
def hold_run_folder(run_dir: str | Path) -> Iterator[None]:
    """Hold `run_dir`'s lock while the block runs: two runs writing one folder would interleave
    their artifacts. The OS drops it when the process ends, killed or not."""
    fd = os.open(Path(run_dir) / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunFolderBusy(f"run folder {run_dir} is in use by another grpo process (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    try:
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
