"""The reward registry: a reward is a pure function ``(completion, example) -> float``.

``example`` is the prompt row as a mapping (``answer``, ``test``/``entry_point``, ``tests``,
``io``, ``extra_info``...). Register with ``@register("name")``; a duplicate name is an error,
and an unknown name fails with the list of known ones. Custom rewards outside this package
are named by import path, ``package.module:function``.

A reward that cannot score a row raises; the score stage records the error text and NaN
for that row, so an infrastructure failure never becomes a silent 0.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

RewardFn = Callable[[str, Mapping[str, Any]], float]

_REGISTRY: dict[str, RewardFn] = {}


class UnknownRewardError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; a user should read it plainly
        return str(self.args[0])


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` available to configs as `name`."""

    def wrap(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward '{name}' is already registered (by {_REGISTRY[name].__module__})")
        _REGISTRY[name] = fn
        return fn

    return wrap


def known_rewards() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_reward(name: str) -> RewardFn:
    """The reward registered as `name`, or loaded from an import path ``pkg.mod:fn``."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise UnknownRewardError(f"cannot load reward '{name}': {err}") from None
        if not callable(fn):
            raise UnknownRewardError(f"reward '{name}' is not callable")
        return fn
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownRewardError(
            f"unknown reward '{name}'; known rewards: {', '.join(sorted(_REGISTRY))} "
            "(or give an import path 'package.module:function')"
        ) from None


def _load_builtins() -> None:
    # Importing the package registers every built-in reward module it lists.
    importlib.import_module("rewards")
