"""Learning-rate schedules over a run's optimiser steps, as TRL and verl users know them.

The formulas are those of transformers' `get_scheduler` (TRL's `lr_scheduler_type`), so the
same settings give the same learning rates step for step: a linear warm-up from 0 over
``ceil(warmup_ratio x total)`` steps (step 0 of a warm-up trains at lr 0, as there), then
constant, linear decay to 0, or half a cosine to 0.

A schedule is a pure function of the step number, and the flow derives the step from the
iteration number (``(iteration - 1) x steps per iteration``), never from an object in
memory: a resumed run, or an update replayed after a crash, gets exactly the learning rate
of the run that never stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

# factor(step, warmup, total) -> multiplier of the base learning rate, for steps after warm-up
_SCHEDULES: dict[str, Callable[[int, int, int], float]] = {}


def register_schedule(name: str):
    def wrap(fn: Callable[[int, int, int], float]):
        if name in _SCHEDULES:
            raise ValueError(f"learning-rate schedule '{name}' is registered twice")
        _SCHEDULES[name] = fn
        return fn

    return wrap


def known_schedules() -> list[str]:
    return list(_SCHEDULES)


@register_schedule("constant")
def _constant(step: int, warmup: int, total: int) -> float:
    return 1.0


@register_schedule("linear")
def _linear(step: int, warmup: int, total: int) -> float:
    return max(0.0, (total - step) / max(1, total - warmup))


@register_schedule("cosine")
def _cosine(step: int, warmup: int, total: int) -> float:
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of every optimiser step of a run (steps counted from 0)."""

    base: float
    kind: str = "constant"
    total_steps: int = 1
    warmup_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule '{self.kind}'; known: {', '.join(known_schedules())}")

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup_ratio * self.total_steps)

    def at(self, step: int) -> float:
        warmup = self.warmup_steps
        if step < warmup:
            return self.base * step / max(1, warmup)
        return self.base * _SCHEDULES[self.kind](step, warmup, self.total_steps)
