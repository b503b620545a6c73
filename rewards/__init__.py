"""Rule-based rewards. Importing this package registers every built-in reward."""

from rewards.registry import (
    BoundReward,
    Explained,
    RewardFn,
    RewardOptionsError,
    UnknownRewardError,
    get_reward,
    known_rewards,
    make_reward,
    register,
    reward_options,
)

# Built-in reward modules: each registers its functions on import.
from rewards import arithmetic  # noqa: E402,F401  (registers "exact_answer")
from rewards import code_tests  # noqa: E402,F401  (registers "code")
from rewards import format_length  # noqa: E402,F401  (registers "format", "overlong")
from rewards import math_answers  # noqa: E402,F401  (registers "math")
from rewards import countdown  # noqa: E402,F401  (registers "countdown")

__all__ = [
    "BoundReward",
    "Explained",
    "RewardFn",
    "RewardOptionsError",
    "UnknownRewardError",
    "get_reward",
    "known_rewards",
    "make_reward",
    "register",
    "reward_options",
]
