"""Rule-based rewards. Importing this package registers every built-in reward."""

from rewards.registry import RewardFn, UnknownRewardError, get_reward, known_rewards, register

# Built-in reward modules: each registers its functions on import.
from rewards import arithmetic  # noqa: E402,F401  (registers "exact_answer")
from rewards import countdown  # noqa: E402,F401  (registers "countdown")

__all__ = ["RewardFn", "UnknownRewardError", "get_reward", "known_rewards", "register"]
