"""Each stage's settings, built once per run from the config.

The flow hands these typed objects to its stages instead of dictionaries of keyword
arguments, so Prefect shows every task run's parameters, and each config field is read in
one place. The variants that depend on the engine are picked from `ENGINE_OPTIONS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flows.config import GRPOConfig
from tasks.advantages import AdvantageSettings
from tasks.evaluate import EvaluateSettings
from tasks.generate import GenerateSettings
from tasks.objective import LossSettings
from tasks.schedule import LRSchedule
from tasks.score import ScoreSettings
from tasks.update import UpdateSettings, needs_old_logprobs

# The options each generation engine is built with (tasks/engines), from the config.
ENGINE_OPTIONS: dict[str, Callable[[GRPOConfig], dict[str, Any]]] = {
    "hf": lambda config: {},
    "vllm": lambda config: {
        "gpu_memory_utilization": config.vllm_gpu_memory_utilization,
        "cpu_kv_cache_gb": config.vllm_cpu_kv_cache_gb,
    },
}


def loss_settings(config: GRPOConfig) -> LossSettings:
    """The objective's settings of a run (also what benchmarks/bench_update.py replays)."""
    return LossSettings(
        epsilon_low=config.epsilon,
        epsilon_high=config.epsilon if config.epsilon_high is None else config.epsilon_high,
        beta=config.beta,
        temperature=config.temperature,
        importance_sampling=config.importance_sampling_level,
        aggregation=config.loss_aggregation,
        max_completion_length=config.max_new_tokens,
        mask_truncated_completions=config.mask_truncated_completions,
        mismatch_correction=config.mismatch_correction,
        mismatch_cap=config.mismatch_cap,
    )


def score_settings(config: GRPOConfig) -> ScoreSettings:
    return ScoreSettings(
        rewards=dict(config.rewards),
        max_error_fraction=config.max_reward_error_fraction,
        reward_options=config.bound_reward_options(),
        workers=config.score_workers,
        chunk_rows=config.score_chunk_rows,
        worker_memory_mb=config.score_worker_memory_mb,
    )


def advantage_settings(config: GRPOConfig) -> AdvantageSettings:
    return AdvantageSettings(
        estimator=config.advantage_estimator,
        scale_rewards=config.scale_rewards,
        eps=config.advantage_eps,
        dynamic_sampling=config.dynamic_sampling,
        target_groups=config.prompts_per_iteration,
    )


@dataclass(frozen=True)
class StagePlan:
    """The settings of every stage of a training run."""

    generate: GenerateSettings
    score: ScoreSettings
    advantages: AdvantageSettings
    update: UpdateSettings
    evaluate: EvaluateSettings
    steps_per_iteration: int  # optimiser steps of one update: where the LR schedule of iteration k starts

    @classmethod
    def from_config(cls, config: GRPOConfig, base_model: str, background_save: bool) -> StagePlan:
        """`base_model` is the policy's starting checkpoint (the KL reference); `background_save`
        whether the update may leave its checkpoint to a writer thread (the cluster decides)."""
        machine = {"device": config.device, "dtype": config.dtype}
        prompt_limit = {
            "max_prompt_length": config.max_prompt_length,
            "prompt_overflow": config.prompt_overflow,
            "stop": tuple(config.stop),
        }
        eval_engine = config.eval_engine or config.generation_engine
        steps = config.mu * config.mini_batches
        return cls(
            generate=GenerateSettings(
                group_size=config.group_size,
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                top_p=config.top_p,
                batch_size=config.generation_batch_size,
                # LoRA: the reference is the policy's frozen base, adapter disabled; nothing to load
                reference_path=base_model if config.beta > 0 and not config.lora_rank else None,
                reference_from_base=config.beta > 0 and bool(config.lora_rank),
                use_chat_template=config.use_chat_template,
                with_old_logprobs=config.store_old_logprobs or needs_old_logprobs(config.mu, config.mini_batches),
                logprob_chunk_tokens=config.logprob_chunk_tokens,
                top_k=config.top_k,
                min_p=config.min_p,
                repetition_penalty=config.repetition_penalty,
                engine=config.generation_engine,
                engine_options=ENGINE_OPTIONS[config.generation_engine](config),
                **prompt_limit,
                **machine,
            ),
            score=score_settings(config),
            advantages=advantage_settings(config),
            update=UpdateSettings(
                loss=loss_settings(config),
                lr_schedule=LRSchedule(
                    config.learning_rate, config.lr_scheduler, config.iterations * steps, config.warmup_ratio
                ),
                mu=config.mu,
                mini_batches=config.mini_batches,
                micro_batch_size=config.micro_batch_size,
                gradient_checkpointing=config.gradient_checkpointing,
                logprob_chunk_tokens=config.logprob_chunk_tokens,
                lora=config.lora_settings(),
                max_grad_norm=config.max_grad_norm,
                weight_decay=config.weight_decay,
                background_save=background_save,
                **machine,
            ),
            evaluate=EvaluateSettings(
                rewards=dict(config.rewards),
                reward_options=config.bound_reward_options(),
                max_new_tokens=config.max_new_tokens,
                use_chat_template=config.use_chat_template,
                engine=eval_engine,
                engine_options=ENGINE_OPTIONS[eval_engine](config),
                **prompt_limit,
                **machine,
            ),
            steps_per_iteration=steps,
        )
