"""The base of every stage's settings object.

A stage's settings are built once per run from the config (flows/settings.py) and handed
to its Prefect task whole, so Prefect's UI shows them as the task run's parameters. The
plain stage function keeps keyword arguments (what tests and scripts call); a task unpacks
its settings into them with `keywords()`.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class StageSettings:
    def keywords(self) -> dict[str, Any]:
        """The settings as the plain stage function's keyword arguments (shallow: nested
        settings objects such as LossSettings stay objects)."""
        assert dataclasses.is_dataclass(self), f"{type(self).__name__} must be a dataclass"
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
