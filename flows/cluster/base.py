"""What a place to run stages provides: the protocol both the flow and each cluster import.

`generate`, `score` and `update` take the same arguments as the local Prefect tasks
(tasks.generate.generate_task, tasks.score.score_task, tasks.update.update_task), whatever
runs them; `close` ends every process the cluster started.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any


@dataclass
class Stages:
    generate: Callable[..., dict[str, Any]]  # generate_task's signature
    score: Callable[..., dict[str, Any]]  # score_task's
    update: Callable[..., dict[str, Any]]  # update_task's
    close: Callable[[], None] = field(default=lambda: None)  # ends every process the cluster started
    # The update's checkpoint is written on a thread of this process while the next iteration
    # runs (tasks.model.save_in_background): only where the flow process holds the policy.
    saves_in_background: bool = False

    def __enter__(self) -> Stages:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()  # no worker of this run outlives it
