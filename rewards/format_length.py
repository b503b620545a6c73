"""Shape rewards: ``format`` (does the completion follow a template?) and ``overlong`` (DAPO).

``format`` scores 1.0 when the completion matches a regular expression, by default the
R1-style ``<think>...</think><answer>...</answer>`` with nothing around them but
whitespace. The default pattern forbids nested or repeated tags inside each section,
so stacking several ``<answer>`` blocks (one per guess) does not match.

``overlong`` is DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to
``max_length - cache_length``, then falling linearly to -1 at ``max_length``, and -1
beyond. Lengths are in tokens (``completion_tokens``, which the score stage adds to the
row) or in characters. Set ``max_length`` to the generation's token limit.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from rewards.registry import register

THINK_ANSWER = (
    r"\s*<think>(?:(?!</?think>).)*</think>"
    r"\s*<answer>(?:(?!</?answer>|</?think>).)*</answer>\s*"
)


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str, flags: int) -> re.Pattern[str]:
    return re.compile(pattern, flags)


def _valid_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"not a valid regular expression: {err}") from None
    return pattern


@register("format", time_limit_s=5.0)
def format_reward(
    completion: str,
    example: Mapping[str, Any],
    *,
    pattern: Annotated[str, AfterValidator(_valid_regex)] = THINK_ANSWER,
    match: Literal["full", "search"] = "full",
    dotall: bool = True,
) -> float:
    """1.0 when `pattern` matches the whole completion (``match="full"``) or part of it."""
    regex = _compiled(pattern, re.DOTALL if dotall else 0)
    found = regex.fullmatch(completion) if match == "full" else regex.search(completion)
    return float(found is not None)


def _check_lengths(options: Mapping[str, Any]) -> None:
    if options["cache_length"] > options["max_length"]:
        raise ValueError(
            f"cache_length ({options['cache_length']}) must not exceed max_length ({options['max_length']})"
        )


@register("overlong", time_limit_s=5.0, check_options=_check_lengths)
def overlong_reward(
    completion: str,
    example: Mapping[str, Any],
    *,
    max_length: Annotated[int, Field(gt=0)] = 4096,
    cache_length: Annotated[int, Field(gt=0)] = 1024,
    unit: Literal["tokens", "chars"] = "tokens",
) -> float:
    """DAPO soft overlong punishment: 0, then a linear ramp to -1 over the last `cache_length`."""
    if unit == "chars":
        length = len(completion)
    else:
        length = example.get("completion_tokens")
        if length is None:
            raise ValueError(
                "overlong with unit='tokens' needs 'completion_tokens' (the score stage adds it); or use unit='chars'"
            )
    free = max_length - cache_length
    if length <= free:
        return 0.0
    if length <= max_length:
        return (free - length) / cache_length
    return -1.0
