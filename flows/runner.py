"""One object per flow run that runs, skips, records and replays its stages.

Every stage a flow runs goes through `StageRunner.run`: a stage whose output is already
recorded in its folder's manifest (with a matching checksum) is skipped and its stored
summary returned, so re-running a run folder continues it; a stage that runs is timed,
recorded, logged in one line and described in a Prefect artifact (flows/observe/views.py).

The update stage goes through `StageRunner.update`, because its output may not be on disk:
an update whose checkpoint `save_every` skipped (or that the background writer had not
finished when the process died) is done, but its weights were only ever in memory. Such
an update is *replayed* -- the same stage, with the same arguments, on the stored
generations and advantages -- when a later stage is about to read its weights. Nothing is
generated again and the weights and optimiser state come out the same, because every
input of an update is on disk and its shuffling is seeded by the iteration.

What lives as long as the flow run lives here (the deferred updates, the background views,
the warning counts), never in a module global: `grpo serve` runs many flows in one process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from data.run_folder import CHECKPOINT
from data.store import Manifest
from flows.observe.views import BackgroundViews
from tasks.model import after_save, holds_live_policy
from tasks.progress import stage_label

STAGE_LINE_LIMIT = 120  # characters of a stage's log line; the rest of its summary is in metrics.json and the manifest
# Marks a log line as a detail: the console shows it only with `grpo --verbose` (flows/cli.py);
# the Prefect API (its UI) always receives it. A run's console is one line per iteration.
DETAIL = {"grpoflow_detail": True}

Logger = logging.Logger | logging.LoggerAdapter[Any]


def stage_line(where: str, summary: dict[str, Any], seconds: float, limit: int = STAGE_LINE_LIMIT) -> str:
    """`where: k v, k v, ... (1.2s)` with as many of the summary's scalars, in order, as fit
    in `limit` characters; the count of the others is named, never silently dropped."""
    items = [
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in summary.items()
        if not isinstance(v, (list, dict))
    ]
    tail = f" ({seconds:.1f}s)"
    shown: list[str] = []
    for k, item in enumerate(items):
        more = len(items) - k - 1
        rest = f", +{more} more" if more else ""
        line = f"{where}: {', '.join([*shown, item])}{rest}{tail}"
        if len(line) > limit and shown:
            return f"{where}: {', '.join(shown)}, +{len(items) - k} more{tail}"
        shown.append(item)
    return f"{where}: {', '.join(shown)}{tail}"


class RunWarnings:
    """Warnings that save hours, each said the first 3 times it applies and every 10th after,
    with the count, so a run that never learns says so without drowning its log."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def say(self, log: Logger, key: str, message: str | None) -> bool:
        if message is None:
            return False
        count = self.counts[key] = self.counts.get(key, 0) + 1
        if count <= 3 or count % 10 == 0:
            log.warning(message + (f" ({count} iterations so far)" if count > 1 else ""))
            return True
        return False


@dataclass
class _Deferred:
    checkpoint: str  # where the weights of this update belong
    label: str  # "iter-0004/checkpoint"
    call: Callable[[], Any]  # the update stage with the arguments it was first run with


@dataclass
class PendingUpdates:
    """Updates recorded as done whose weights are neither saved nor held in memory."""

    deferred: list[_Deferred] = field(default_factory=list)

    def defer(self, checkpoint: str | Path, label: str, call: Callable[[], Any]) -> None:
        """Note a skipped update, unless its weights are on disk or in this process."""
        checkpoint = str(checkpoint)
        if Path(checkpoint).is_dir() or holds_live_policy(checkpoint):
            return
        self.deferred.append(_Deferred(checkpoint, label, call))

    def catch_up(self, used: Iterable[Any], log: Logger) -> None:
        """Replay, in order, the deferred updates up to the last one whose weights appear in
        `used` (the arguments of a stage about to run)."""
        paths = {str(v) for v in _flatten(used)}
        last = max((i for i, d in enumerate(self.deferred) if d.checkpoint in paths), default=-1)
        for deferred in self.deferred[: last + 1]:
            started = time.perf_counter()
            with stage_label(deferred.label):
                deferred.call()
            seconds = time.perf_counter() - started
            # Not a detail: a user resuming a run should see that work is being redone, and why.
            log.info(f"{deferred.label}: update replayed from the stored generations and advantages ({seconds:.1f}s)")
        del self.deferred[: last + 1]


def _flatten(values: Iterable[Any]) -> Iterable[Any]:
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flatten(v)
        else:
            yield v


class StageRunner:
    """Runs the stages of one flow run (see the module docstring); use it as a context
    manager so the views still being built are published before the flow ends."""

    def __init__(self, log: Logger) -> None:
        self.log = log
        self.pending = PendingUpdates()
        self.views = BackgroundViews()
        self.warnings = RunWarnings()

    def __enter__(self) -> StageRunner:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.views.drain()  # the stage artifacts and learning curve of the last iteration too

    def run(
        self,
        manifest: Manifest,
        output: str,
        stage: Callable[..., dict[str, Any]],
        *args: Any,
        schema_version: int | None = None,
        manifest_extra: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Run `stage(*args, **kwargs)` unless `output` is already recorded as done in
        `manifest`; record it after. The stage's summary is kept in the manifest (with its
        duration, the paths it read and `manifest_extra`), so a skipped stage still reports it."""
        summary, _ = self._run(manifest, output, stage, args, kwargs, schema_version, manifest_extra)
        return summary

    def update(
        self,
        manifest: Manifest,
        stage: Callable[..., dict[str, Any]],
        *args: Any,
        manifest_extra: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Run the update stage, whose output is the iteration's checkpoint. A done update
        whose weights were not saved is deferred and replayed when a later stage reads them;
        a checkpoint left to the background writer is recorded as a folder once it lands."""
        where = f"{manifest.folder.name}/{CHECKPOINT}"
        entry = manifest.entries().get(CHECKPOINT, {})
        if manifest.is_done(CHECKPOINT) and entry.get("kind") != "folder":
            self.pending.defer(
                manifest.folder / CHECKPOINT,
                where,
                lambda: (stage(*args, **kwargs), self._record_when_saved(manifest)),
            )
        summary, ran = self._run(manifest, CHECKPOINT, stage, args, kwargs, None, manifest_extra)
        if ran:
            self._record_when_saved(manifest)
        return summary

    def catch_up(self, policy: str) -> None:
        """Replay the deferred updates that `policy`'s weights need (before a step outside
        `run`, such as the final export, reads them)."""
        self.pending.catch_up([policy], self.log)

    def _run(
        self,
        manifest: Manifest,
        output: str,
        stage: Callable[..., dict[str, Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        schema_version: int | None,
        manifest_extra: dict[str, Any] | None,
    ) -> tuple[dict[str, Any], bool]:
        where = f"{manifest.folder.name}/{output}"
        if manifest.is_done(output):
            self.log.info(f"{where}: done already, skipped", extra=DETAIL)
            return manifest.entries()[output].get("summary", {}), False
        self.pending.catch_up([*args, *kwargs.values()], self.log)
        started = time.perf_counter()
        with stage_label(where):
            summary = stage(*args, **kwargs)
        seconds = time.perf_counter() - started
        manifest.record(
            output,
            schema_version=schema_version,
            summary=summary,
            seconds=round(seconds, 3),
            inputs=[str(a) for a in args if isinstance(a, (str, Path))],
            **(manifest_extra or {}),
        )
        self.views.publish_stage_report(manifest.folder, output, summary)
        self.log.info(stage_line(where, summary, seconds), extra=DETAIL)
        return summary, True

    def _record_when_saved(self, manifest: Manifest) -> None:
        """A checkpoint that the update left to the background writer (tasks.model) is
        recorded as a folder once it is on disk. Until then its entry is a "result", as for
        an iteration that save_every does not save: a process killed before the write lands
        resumes by replaying that update, which saves it again."""
        where = f"{manifest.folder.name}/{CHECKPOINT}"

        def landed() -> None:
            try:
                manifest.refresh(CHECKPOINT, saved_in_background=True)
            except OSError as err:  # the entry stays a "result": a resume replays the update; nothing is lost
                self.log.warning(f"{where}: written, but its manifest entry could not be updated ({err})")

        after_save(manifest.folder / CHECKPOINT, landed)
