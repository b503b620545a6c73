"""The reward registry: a reward is a pure function ``(completion, example) -> float``.

``example`` is the prompt row as a mapping (``answer``, ``test``/``entry_point``, ``tests``,
``io``, ``extra_info``...); the score stage adds ``completion_tokens`` (the completion's
length in tokens) and ``finish_reason``. Register with ``@register("name")``; a duplicate name
is an error, and an unknown name fails with the list of known ones. Custom rewards outside
this package are named by import path, ``package.module:function``.

Options. A reward's keyword-only parameters (each with a default) are its options, e.g.
``math(completion, example, *, last_number=True, ...)``; the config binds them by name with
``make_reward(name, options)``, which rejects unknown names (listing the valid ones) and
checks each value against the parameter's annotation (pydantic, which the config model
uses too). Calling the plain function uses the defaults.

Time limits. Every bound reward carries ``time_limit_s``: how long one call may run in a
scoring worker before the worker is killed and the row gets NaN plus the error text. It is
the registered default, which may depend on the options (the code reward's limit follows
its sandbox budget), unless the config overrides it with the option ``time_limit_s``.

A reward that cannot score a row raises; the score stage records the error text and NaN
for that row, so an infrastructure failure never becomes a silent 0. A reward that scores a
row but wants to say why it paid nothing (the candidate's program crashed) returns an
``Explained`` value: the number counts as any other, the text lands in the row's error column.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pydantic

from data.errors import UserError

RewardFn = Callable[[str, Mapping[str, Any]], float]
# Seconds one call may take in a scoring worker, fixed or computed from the bound options.
TimeLimit = float | Callable[[Mapping[str, Any]], float]

DEFAULT_TIME_LIMIT_S = 10.0
TIME_LIMIT_OPTION = "time_limit_s"  # accepted by every reward; consumed by the scorer


class Explained(float):
    """A reward value with the reason for it: ``Explained(0.0, "solve() raised NameError: ...")``.

    A plain float everywhere; the scorer records ``why`` in the row's ``error/<fn>`` column
    beside the value (NaN there means the row could not be scored; a number means it was).
    """

    why: str

    def __new__(cls, value: float, why: str) -> Explained:
        self = super().__new__(cls, value)
        self.why = why
        return self

    def __reduce__(self) -> tuple[type[Explained], tuple[float, str]]:
        return (Explained, (float(self), self.why))


@dataclass(frozen=True)
class _Entry:
    fn: RewardFn
    time_limit_s: TimeLimit
    # Checks that span options (cache_length <= max_length); raises ValueError.
    check_options: Callable[[Mapping[str, Any]], None] | None = None


_REGISTRY: dict[str, _Entry] = {}


class UnknownRewardError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; a user should read it plainly
        return str(self.args[0])


class RewardOptionsError(UserError):
    """Options that the named reward does not have, or values of the wrong type."""


def register(
    name: str,
    *,
    time_limit_s: TimeLimit = DEFAULT_TIME_LIMIT_S,
    check_options: Callable[[Mapping[str, Any]], None] | None = None,
) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` available to configs as `name`.

    `time_limit_s` is the default per-call limit in a scoring worker (a number, or a function
    of the bound options); `check_options` validates combinations of options at bind time.
    """

    def wrap(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"reward '{name}' is already registered (by {_REGISTRY[name].fn.__module__})")
        _option_parameters(fn, name)  # fail at import time, not at the first scored row
        _REGISTRY[name] = _Entry(fn, time_limit_s, check_options)
        return fn

    return wrap


def known_rewards() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_reward(name: str) -> RewardFn:
    """The reward registered as `name`, or loaded from an import path ``pkg.mod:fn``."""
    return _entry(name).fn


def reward_options(name: str) -> dict[str, Any]:
    """The options of reward `name` with their defaults (``time_limit_s`` included)."""
    entry = _entry(name)
    defaults = {p.name: p.default for p in _option_parameters(entry.fn, name).values()}
    return defaults | {TIME_LIMIT_OPTION: _time_limit(entry, defaults)}


@dataclass(frozen=True)
class BoundReward:
    """A reward with its options bound: callable as ``(completion, example) -> float``.

    Picklable (the function travels by reference), so scoring workers receive it as is.
    """

    name: str
    fn: RewardFn
    options: Mapping[str, Any] = field(default_factory=dict)
    time_limit_s: float = DEFAULT_TIME_LIMIT_S

    def __call__(self, completion: str, example: Mapping[str, Any]) -> float:
        return self.fn(completion, example, **self.options)


def make_reward(name: str, options: Mapping[str, Any] | None = None) -> BoundReward:
    """Bind `options` (from the config's ``reward_options[name]``) to reward `name`."""
    entry = _entry(name)
    params = _option_parameters(entry.fn, name)
    options = dict(options or {})
    time_limit = options.pop(TIME_LIMIT_OPTION, None)
    unknown = sorted(set(options) - set(params))
    if unknown:
        valid = ", ".join([*params, TIME_LIMIT_OPTION])
        raise RewardOptionsError(
            f"reward '{name}' has no option {', '.join(map(repr, unknown))}; valid options: {valid}"
        )
    hints = typing.get_type_hints(entry.fn, include_extras=True)
    bound = {}
    for key, value in options.items():
        annotation = hints.get(key, Any)
        try:
            bound[key] = pydantic.TypeAdapter(annotation).validate_python(value)
        except pydantic.ValidationError as err:
            problems = "; ".join(e["msg"] for e in err.errors())
            raise RewardOptionsError(f"reward '{name}' option '{key}' = {value!r}: {problems}") from None
    resolved = {p.name: p.default for p in params.values()} | bound
    if entry.check_options is not None:
        try:
            entry.check_options(resolved)
        except ValueError as err:
            raise RewardOptionsError(f"reward '{name}': {err}") from None
    if time_limit is None:
        time_limit = _time_limit(entry, resolved)
    elif not isinstance(time_limit, (int, float)) or isinstance(time_limit, bool) or time_limit <= 0:
        raise RewardOptionsError(
            f"reward '{name}' option '{TIME_LIMIT_OPTION}' must be a positive number, got {time_limit!r}"
        )
    return BoundReward(name=name, fn=entry.fn, options=bound, time_limit_s=float(time_limit))


def _time_limit(entry: _Entry, resolved_options: Mapping[str, Any]) -> float:
    limit = entry.time_limit_s
    return float(limit(resolved_options) if callable(limit) else limit)


def _option_parameters(fn: RewardFn, name: str) -> dict[str, inspect.Parameter]:
    """The keyword-only parameters of `fn`, after checking it has the reward signature."""
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) != 2 or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise TypeError(f"reward '{name}' must take (completion, example, *, options...), got {inspect.signature(fn)}")
    options = {p.name: p for p in params if p.kind is p.KEYWORD_ONLY}
    missing = [n for n, p in options.items() if p.default is p.empty]
    if missing:
        raise TypeError(f"reward '{name}': options need defaults, so the plain call works: {', '.join(missing)}")
    if TIME_LIMIT_OPTION in options:
        raise TypeError(f"reward '{name}': '{TIME_LIMIT_OPTION}' is reserved for the scorer's time limit")
    return options


def _entry(name: str) -> _Entry:
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise UnknownRewardError(f"cannot load reward '{name}': {err}") from None
        if not callable(fn):
            raise UnknownRewardError(f"reward '{name}' is not callable")
        return _Entry(fn, DEFAULT_TIME_LIMIT_S)
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
