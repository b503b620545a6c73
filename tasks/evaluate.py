"""Held-out evaluation: greedy completions of problems never trained on, scored by the
run's rewards. Accuracy is the fraction of problems whose total reward is at least
`threshold` (1.0 for exact-answer rewards)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from data.schemas import PROMPTS
from data.store import read_table
from rewards import make_reward
from rewards.pool import shared_pool
from tasks.engines import SamplingSettings, engine_for
from tasks.generate import fit_prompts, render_prompt
from tasks.model import live_policy
from tasks.stage_settings import StageSettings


def evaluate_policy(
    prompts_path: str | Path,
    policy_path: str,
    *,
    rewards: dict[str, float],
    max_new_tokens: int,
    reward_options: dict[str, dict] | None = None,
    workers: int | None = None,
    batch_size: int = 256,
    threshold: float = 1.0,
    use_chat_template: bool = True,
    max_prompt_length: int | None = None,
    prompt_overflow: str = "truncate_left",
    stop: list[str] | tuple[str, ...] = (),
    engine: str = "hf",
    engine_options: dict | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """Greedy accuracy on the held-out prompts. A prompt left out by max_prompt_length
    (prompt_overflow skip) counts as not solved, so accuracies stay comparable over a run."""
    policy = live_policy(policy_path, device, dtype)
    all_rows = read_table(prompts_path, PROMPTS).to_pylist()
    texts = [render_prompt(r, policy.tokenizer, use_chat_template) for r in all_rows]
    prompt_ids = [policy.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    kept, prompt_ids, too_long = fit_prompts(prompt_ids, max_prompt_length, prompt_overflow)
    rows = [all_rows[i] for i in kept]
    greedy = SamplingSettings(
        max_new_tokens=max_new_tokens, greedy=True, batch_size=batch_size, with_logprobs=False, stop=tuple(stop)
    )
    samples = (
        engine_for(engine, policy_path, policy, engine_options).sample(prompt_ids, 1, greedy, desc="evaluate")
        if rows
        else []
    )
    completions = policy.tokenizer.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
    bound = [make_reward(name, (reward_options or {}).get(name)) for name in rewards]
    weights = [rewards[r.name] for r in bound]
    solved = errored = 0
    # The same killable worker pool as the score stage: a reward that hangs on a held-out
    # answer costs that answer, never the run.
    with shared_pool(bound, workers) as pool:  # workers kept for the next evaluation
        for outcomes in pool.imap(zip(completions, rows)):
            total = sum(w * o.value for w, o in zip(weights, outcomes))
            if math.isnan(total):  # unscorable is not solved; counted, never hidden
                errored += 1
            solved += not math.isnan(total) and total >= threshold
    summary = {"accuracy": solved / max(len(all_rows), 1), "problems": len(all_rows), "errored": errored}
    if too_long:
        summary["prompts/truncated" if prompt_overflow == "truncate_left" else "prompts/skipped"] = too_long
    return summary


@dataclass(frozen=True)
class EvaluateSettings(StageSettings):
    """`evaluate_policy`'s settings, the same for every evaluation of a run."""

    rewards: dict[str, float]
    max_new_tokens: int
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    use_chat_template: bool = True
    max_prompt_length: int | None = None
    prompt_overflow: str = "truncate_left"
    stop: tuple[str, ...] = ()
    engine: str = "hf"
    engine_options: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(prompts_path: str, policy_path: str, settings: EvaluateSettings) -> dict:
    return evaluate_policy(prompts_path, policy_path, **settings.keywords())
