"""Environments by name, as rewards are: ``@register_environment("name")`` on a factory.

A factory's keyword-only parameters (each with a default) are the environment's options;
``make_environment(name, options)`` binds them, rejecting unknown names (listing the valid
ones) and checking each value against its annotation with pydantic, as ``make_reward`` does.

A *family* takes an argument after a colon: ``reasoning_gym:gcd`` calls the factory
registered as ``reasoning_gym`` with ``"gcd"`` as its one positional argument. A name whose
part before the colon is not a registered family is an import path,
``package.module:factory``, for environments that live outside this package.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic

from data.errors import UserError
from rewards.environments.base import Environment, SingleTurnEnvironment

EnvironmentFactory = Callable[..., Environment]


class UnknownEnvironmentError(UserError, KeyError):
    """An environment name that is neither registered nor importable (the CLI prints it in one line)."""

    def __str__(self) -> str:  # KeyError quotes its message; a user should read it plainly
        return str(self.args[0])


class EnvironmentOptionsError(UserError):
    """Options that the named environment does not have, or values of the wrong type."""


@dataclass(frozen=True)
class _Entry:
    factory: EnvironmentFactory
    family: bool  # takes an argument after the colon


_REGISTRY: dict[str, _Entry] = {}


def register_environment(name: str, *, family: bool = False) -> Callable[[EnvironmentFactory], EnvironmentFactory]:
    """Decorator: make `factory` available as `name` (``name:<argument>`` when `family`)."""
    if ":" in name:
        raise ValueError(f"environment name '{name}' must not contain ':' (it separates a family's argument)")

    def wrap(factory: EnvironmentFactory) -> EnvironmentFactory:
        if name in _REGISTRY and _REGISTRY[name].factory is not factory:
            raise ValueError(f"environment '{name}' is already registered (by {_REGISTRY[name].factory.__module__})")
        _option_parameters(factory, name, family)  # fail at import time, not at the first run
        _REGISTRY[name] = _Entry(factory, family)
        return factory

    return wrap


def known_environments() -> list[str]:
    """Registered names; families shown as ``name:<argument>``."""
    _load_builtins()
    return sorted(f"{n}:<argument>" if e.family else n for n, e in _REGISTRY.items())


def environment_options(name: str) -> dict[str, Any]:
    """The options of environment `name` with their defaults."""
    entry, _ = _resolve(name)
    return {p.name: p.default for p in _option_parameters(entry.factory, name, entry.family).values()}


def make_environment(name: str, options: Mapping[str, Any] | None = None) -> Environment:
    """Environment `name` (``family:argument`` or ``package.module:factory`` too) with `options` bound."""
    entry, argument = _resolve(name)
    params = _option_parameters(entry.factory, name, entry.family)
    options = dict(options or {})
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise EnvironmentOptionsError(
            f"environment '{name}' has no option {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(params) or '(none)'}"
        )
    hints = typing.get_type_hints(entry.factory, include_extras=True)
    bound = {}
    for key, value in options.items():
        try:
            bound[key] = pydantic.TypeAdapter(hints.get(key, Any)).validate_python(value)
        except pydantic.ValidationError as err:
            problems = "; ".join(e["msg"] for e in err.errors())
            raise EnvironmentOptionsError(f"environment '{name}' option '{key}' = {value!r}: {problems}") from None
    environment = entry.factory(argument, **bound) if entry.family else entry.factory(**bound)
    if not isinstance(environment, Environment):
        raise TypeError(f"environment '{name}': its factory returned {type(environment).__name__}, not an Environment")
    return environment


def _resolve(name: str) -> tuple[_Entry, str | None]:
    head, colon, argument = name.partition(":")
    _load_builtins()
    entry = _REGISTRY.get(head)
    if entry is not None:
        if entry.family and not argument:
            raise UnknownEnvironmentError(f"environment '{head}' needs an argument: '{head}:<argument>'")
        if not entry.family and colon:
            raise UnknownEnvironmentError(f"environment '{head}' takes no argument, got '{name}'")
        return entry, argument or None
    if colon and argument:
        try:
            factory = getattr(importlib.import_module(head), argument)
        except (ImportError, AttributeError) as err:
            raise UnknownEnvironmentError(f"cannot load environment '{name}': {err}") from None
        if not callable(factory):
            raise UnknownEnvironmentError(f"environment '{name}' is not callable")
        return _Entry(factory, family=False), None
    raise UnknownEnvironmentError(
        f"unknown environment '{name}'; known environments: {', '.join(known_environments())} "
        "(or give an import path 'package.module:factory')"
    )


def _option_parameters(factory: EnvironmentFactory, name: str, family: bool) -> dict[str, inspect.Parameter]:
    params = list(inspect.signature(factory).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) != (1 if family else 0) or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        wanted = "(argument, *, options...)" if family else "(*, options...)"
        raise TypeError(f"environment '{name}' factory must take {wanted}, got {inspect.signature(factory)}")
    options = {p.name: p for p in params if p.kind is p.KEYWORD_ONLY}
    missing = [n for n, p in options.items() if p.default is p.empty]
    if missing:
        raise TypeError(f"environment '{name}': options need defaults: {', '.join(missing)}")
    return options


def _load_builtins() -> None:
    # Importing the package registers every built-in environment module it lists.
    importlib.import_module("rewards.environments")


@register_environment("single_turn")
def single_turn(
    *, rewards: dict[str, float] | None = None, reward_options: dict[str, dict[str, Any]] | None = None
) -> Environment:
    """Today's task as an environment: the row's prompt, one completion, the named rewards
    (name -> weight) with their options."""
    if not rewards:
        raise EnvironmentOptionsError("environment 'single_turn' needs the option 'rewards' (reward name -> weight)")
    return SingleTurnEnvironment(rewards, reward_options)
