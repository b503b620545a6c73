"""Environments: multi-turn episodes, tools and the adapters to environment libraries.

Importing this package registers every built-in environment (see ``registry``)."""

# Built-in environment modules: each registers its environments on import.
from rewards.environments import (
    calculator,  # noqa: F401  (registers "calculator")
    guess_number,  # noqa: F401  (registers "guess_number")
    reasoning_gym_adapter,  # noqa: F401  (registers "reasoning_gym:<task>"; the package is imported on use)
)
from rewards.environments.base import (
    END_REASONS,
    Environment,
    Episode,
    EpisodeLimits,
    Message,
    Rubric,
    RubricItem,
    RubricScore,
    SingleTurnEnvironment,
    StepResult,
    ToolCallRecord,
    Trajectory,
)
from rewards.environments.registry import (
    EnvironmentOptionsError,
    UnknownEnvironmentError,
    environment_options,
    known_environments,
    make_environment,
    register_environment,
)

__all__ = [
    "END_REASONS",
    "Environment",
    "EnvironmentOptionsError",
    "Episode",
    "EpisodeLimits",
    "Message",
    "Rubric",
    "RubricItem",
    "RubricScore",
    "SingleTurnEnvironment",
    "StepResult",
    "ToolCallRecord",
    "Trajectory",
    "UnknownEnvironmentError",
    "environment_options",
    "known_environments",
    "make_environment",
    "register_environment",
]
