"""Progress bars for the long stages (generation, scoring, update, evaluation): drawn on a
terminal, silent in CI, in logs and in tests.

The flow names the stage being run (`stage_label`), so a bar reads "iter-0003 update" and
the crash tests can stop a run in the middle of a named stage (`data.store.pause_point`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from data.crash_points import pause_point

# "iter-0003/checkpoint" while the flow runs that stage; empty outside a flow.
_STAGE: contextvars.ContextVar[str] = contextvars.ContextVar("grpoflow_stage", default="")


@contextlib.contextmanager
def stage_label(label: str) -> Iterator[None]:
    token = _STAGE.set(label)
    try:
        yield
    finally:
        _STAGE.reset(token)


def current_stage() -> str:
    return _STAGE.get()


class _Bar:
    def __init__(self, progress: Progress | None, task_id, label: str):
        self._progress, self._task_id, self._label = progress, task_id, label

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task_id, n)
        pause_point(self._label)


def bars_enabled(stream=None) -> bool:
    """Bars only for a person watching: a terminal, not CI, not a dumb terminal, and not
    turned off with GRPOFLOW_PROGRESS=0."""
    stream = stream if stream is not None else sys.stderr
    if os.environ.get("GRPOFLOW_PROGRESS", "1") == "0" or os.environ.get("CI") or os.environ.get("TERM") == "dumb":
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[_Bar]:
    stage = current_stage()
    label = f"{stage}: {description}" if stage else description
    if not bars_enabled():
        yield _Bar(None, None, label)
        return
    shown = f"{stage.split('/')[0]} {description}" if stage else description
    columns = (
        TextColumn("{task.description:>20}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        yield _Bar(bar, bar.add_task(shown, total=total), label)
