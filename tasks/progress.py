"""Progress bars for the long stages: shown on a terminal, silent in CI and in logs."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Bar:
    def __init__(self, progress: Progress | None, task_id):
        self._progress, self._task_id = progress, task_id

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task_id, n)


def bars_enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI") and os.environ.get("GRPOFLOW_PROGRESS", "1") != "0"


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[_Bar]:
    if not bars_enabled():
        yield _Bar(None, None)
        return
    columns = (TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        yield _Bar(bar, bar.add_task(description, total=total))
