"""Rule-based rewards. Importing this package registers every built-in reward."""

# Built-in reward modules: each registers its functions on import.
from rewards import (
    arithmetic,  # noqa: F401  (registers "exact_answer")
    code_tests,  # noqa: F401  (registers "code")
    countdown,  # noqa: F401  (registers "countdown")
    format_length,  # noqa: F401  (registers "format", "overlong")
    math_answers,  # noqa: F401  (registers "math")
)
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
