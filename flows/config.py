"""The one config model of a GRPO run. Each field's description is its only help text:
`grpo run --help` prints it, and so does the configuration reference (docs/configuration.md).

Defaults are those of the embedded demo (a ~1M-parameter model on 2-digit addition, 2 CPU
cores, about 5 minutes end to end); the reason for each sits beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from data.errors import UserError
from rewards import known_rewards, make_reward
from tasks.lora import LoraSettings

# --- which settings a resumed run folder may change -----------------------------
# The artifacts of a run folder mean what its config.json says: a resume that changed the
# model, the data, the rewards or the objective would mix two runs in one folder. Only the
# fields below may differ from the stored ones when a folder is resumed (each with why); the
# change is logged, appended to config.json's "changes" and recorded in every later
# iteration's metrics.json ("settings"), so `grpo inspect` shows where it happened. Every
# other field -- including any field added later that is not listed here -- is
# meaning-changing: a different value is refused before anything is written.
MID_RUN_SAFE: dict[str, str] = {
    "iterations": "how many in total: iterations already done stay as they are",
    "eval_every": "when the held-out set is scored, not what is scored",
    "save_every": "when weights are written; unsaved updates are replayed exactly on resume",
    "save_total_limit": "how many checkpoints are kept on disk",
    "learning_rate": "the step size of the updates still to come (done updates replay with their own)",
    "micro_batch_size": "memory only: gradients accumulate to the same step (float rounding aside)",
    "gradient_checkpointing": "memory only: activations recomputed, same gradients",
    "logprob_chunk_tokens": "memory only: the same log-probs computed in other chunks",
    "generation_batch_size": "memory only: how many sequences one generate() call holds",
    "score_workers": "how many processes score, not how",
    "score_chunk_rows": "memory only: rows per chunk of the score stage",
    "score_worker_memory_mb": "a safety cap of the scoring workers",
    "max_reward_error_fraction": "when a score stage fails, not what it writes",
    "vllm_gpu_memory_utilization": "memory only: the vLLM engine's share of the GPU",
    "vllm_cpu_kv_cache_gb": "memory only: the vLLM engine's KV cache on CPU",
    "device": "where it computes (another device rounds differently, the run's math is the same)",
}
# --- defaults for a real model ----------------------------------------------------
# The field defaults suit the built-in 1M-parameter demo. When --model is given, these apply
# instead to every field not set explicitly (flags and config files always win); the reason
# for each is in the field's description. Measured on SmolLM2-135M, benchmarks/RESULTS.md.
REAL_MODEL_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 256,
    "learning_rate": 1e-6,
    "micro_batch_size": 8,
    "gradient_checkpointing": True,
    "save_total_limit": 3,
}

NOT_COMPARED = ("run_dir",)  # the folder itself, never a setting of what is in it


def may_change_mid_run(field: str) -> bool:
    """Whether a resumed run folder may take another value of `field` (MID_RUN_SAFE); every
    field not listed there is meaning-changing, so a new field is refused until listed."""
    return field in MID_RUN_SAFE or field in NOT_COMPARED


# The reward that checks each task kind, used when --task is given without --rewards.
TASK_REWARDS = {"math": "math", "code": "code", "countdown": "countdown", "arithmetic": "exact_answer"}


class GRPOConfig(BaseModel):
    """The settings of one run, stored in its folder's config.json.

    Resuming a run folder: every field is meaning-changing (a different value is refused)
    unless it is listed in MID_RUN_SAFE above with the reason it may change mid-run. A field
    you add is therefore refused on resume by default; list it there only when artifacts
    written before and after a change still mean the same thing.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- where ---------------------------------------------------------------------------
    run_dir: Path | None = Field(
        None,
        description=(
            "Run folder (artifacts, checkpoints, config.json). Re-using one resumes it. Default: runs/<timestamp>."
        ),
    )
    model: str | None = Field(
        None,
        description=(
            "Policy to train: a local Hugging Face model folder or a hub name. Default: the built-in tiny arithmetic "
            "model, built once and cached."
        ),
    )
    dataset: str | None = Field(
        None,
        description=(
            "Training prompts: a .jsonl/.json/.parquet/.csv file, a local dataset folder, or a `datasets.load_dataset` "
            "name. Default: the built-in arithmetic task."
        ),
    )
    dataset_split: str = Field("train", description="Split to read when the dataset has several.")
    eval_dataset: str | None = Field(
        None,
        description=(
            "Held-out prompts scored greedily after every iteration (same formats as --dataset). Default: the "
            "built-in task's 500 held-out problems when training on it, else none."
        ),
    )
    task: str | None = Field(
        None, description="Task kind for every prompt (math, code, arithmetic...) when the dataset does not say."
    )
    skip_invalid: bool = Field(
        False,
        description=(
            "Put invalid dataset rows in rejected.parquet with the reason instead of stopping at the first one."
        ),
    )

    # --- how long --------------------------------------------------------------------------
    iterations: int = Field(
        100,
        ge=1,
        description=(
            "GRPO iterations (generate, score, advantages, update) to run in total. 100 takes the demo from about "
            "60 to about 80-85 percent held-out accuracy in a few minutes (benchmarks/RESULTS.md)."
        ),
    )
    prompts_per_iteration: int = Field(
        16, ge=1, description="Prompts sampled per iteration; each gets group_size completions."
    )
    group_size: int = Field(
        8, ge=2, description="Completions per prompt (G): the group whose mean and std are the baseline."
    )

    # --- sampling ---------------------------------------------------------------------------
    max_new_tokens: int = Field(
        8,
        ge=1,
        description=(
            "Completion length limit in tokens; longer completions are cut (finish_reason 'length'). 8 fits the "
            "demo's 2-digit sums; with --model the default is 256 (TRL's max_completion_length): a worked math "
            "answer needs room, and 8 tokens cut every completion of a real model."
        ),
    )
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature; log-probs everywhere are of softmax(logits / temperature)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1.0 = off).")
    generation_batch_size: int = Field(
        256, ge=1, description="Sequences per generate() call; bounds generation memory."
    )
    use_chat_template: bool = Field(
        True, description="Wrap plain-text prompts in the tokenizer's chat template when it has one."
    )

    # --- generation engine ------------------------------------------------------------------
    generation_engine: Literal["hf", "vllm"] = Field(
        "hf",
        description=(
            "Who samples the completions: hf (transformers generate on the live policy, exactly reproducible) "
            "or vllm (a colocated vLLM engine kept for the whole run, weights synced in place after every update; "
            "needs make install-vllm). Reference and old-policy log-probs always come from a transformers forward."
        ),
    )
    eval_engine: Literal["hf", "vllm"] | None = Field(
        None, description="Engine of the greedy held-out evaluation. Default: generation_engine."
    )
    vllm_gpu_memory_utilization: float = Field(
        0.3,
        gt=0,
        le=1,
        description=(
            "vllm on a GPU: fraction of GPU memory vLLM may take (weights + KV cache). 0.3 leaves the rest to "
            "the update (policy, gradients, AdamW state) in the same process."
        ),
    )
    vllm_cpu_kv_cache_gb: float = Field(
        1.0,
        gt=0,
        description=(
            "vllm on CPU: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE). 1 GiB holds ~23k tokens of SmolLM2-135M in "
            "fp32 (46 KiB per token), plenty for 64 x 256 completions in flight."
        ),
    )
    mismatch_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = Field(
        "none",
        description=(
            "Train/inference mismatch correction (docs/objective.md): re-weight each token's policy loss by the "
            "ratio of the trainer's to the sampler's probability, truncated at mismatch_cap (token_truncate: "
            "truncated importance sampling, TIS) or zeroed above it (token_mask); sequence_*: "
            "one ratio per completion, "
            "the product of its token ratios. none: only measured (metrics sampling/*)."
        ),
    )
    mismatch_cap: float = Field(
        3.0,
        ge=1,
        description=(
            "C of the mismatch correction: ratios are capped at (truncate) or dropped above (mask) this value. "
            "3 is TRL's default."
        ),
    )

    @model_validator(mode="after")
    def _correction_needs_full_distribution(self) -> GRPOConfig:
        # The ratio pi_old / pi_sampler is an unbiased importance weight only if the sampler
        # can draw every token pi_old can: truncation (top_p < 1) zeroes some, and the stored
        # sampler log-probs are of the untruncated distribution, so the weight would be wrong.
        if self.mismatch_correction != "none" and (self.top_p < 1 or self.top_k or self.min_p):
            raise ValueError(
                f"mismatch_correction '{self.mismatch_correction}' needs the untruncated sampling distribution: "
                f"top_p must be 1 (got {self.top_p})"
            )
        return self

    # --- rewards ----------------------------------------------------------------------------
    rewards: dict[str, float] = Field(
        default_factory=lambda: {"exact_answer": 1.0},
        description=(
            "Reward functions and their weights (JSON object); the reward is the weighted sum. Names are registered "
            "rewards or 'package.module:function'."
        ),
    )
    reward_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description=(
            'Options of each reward (JSON object of objects), e.g. {"code": {"mode": '
            '"fraction"}, "math": {"time_limit_s": '
            "5}}. Unknown options are an error that lists the valid ones. overlong's max_length defaults to "
            "max_new_tokens."
        ),
    )
    max_reward_error_fraction: float = Field(
        0.05, ge=0, le=1, description="Fail the score stage when more than this fraction of rows could not be scored."
    )
    score_workers: int | None = Field(
        None,
        ge=1,
        description=(
            "Scoring worker processes (rewards run there, killed and replaced when they overrun). Default: one "
            "per CPU core."
        ),
    )
    score_chunk_rows: int = Field(
        4096,
        ge=1,
        description=(
            "Generation rows read and written per chunk by the score stage; bounds its memory whatever the file size."
        ),
    )
    score_worker_memory_mb: int | None = Field(
        4096,
        ge=64,
        description=(
            "Address-space cap of each scoring worker in MiB, so a reward that blows up cannot take the machine "
            "down (None: no cap)."
        ),
    )

    # --- objective --------------------------------------------------------------------------
    learning_rate: float = Field(
        5e-5,
        gt=0,
        description=(
            "AdamW learning rate. 5e-5 suits the 1M-parameter demo model (1e-4 peaks then drifts, 3e-4 collapses "
            "it; benchmarks/RESULTS.md); with --model the default is 1e-6 (TRL's default; DeepSeekMath used 1e-6): "
            "full fine-tuning of a pretrained model at 5e-5 drifts away from it within a few iterations."
        ),
    )
    beta: float = Field(
        0.04,
        ge=0,
        description="Weight of the k3 KL penalty to the reference (initial) model; 0 loads no reference model at all.",
    )
    epsilon: float = Field(
        0.2,
        gt=0,
        lt=1,
        description=(
            "Lower clip range: the ratio pi/pi_old is clipped below at 1 - epsilon (PPO and DeepSeekMath use 0.2)."
        ),
    )
    epsilon_high: float | None = Field(
        None,
        gt=0,
        description=(
            "Upper clip range: the ratio is clipped above at 1 + epsilon_high. Default: epsilon (symmetric, as "
            "DeepSeekMath); DAPO's clip-higher uses 0.28, GSPO ~4e-4 with sequence-level ratios."
        ),
    )
    advantage_estimator: Literal["grpo", "dr_grpo", "rloo"] = Field(
        "grpo",
        description=(
            "Advantage of a completion: grpo (r - group mean) / (std + advantage_eps), DeepSeekMath; dr_grpo "
            "r - group mean, no std (Dr. GRPO); rloo r - mean of the other rewards of the group (RLOO)."
        ),
    )
    scale_rewards: Literal["group", "batch", "none"] | None = Field(
        None,
        description=(
            "Std that divides the advantages: group (each group's std), batch (one std over the iteration's rewards), "
            "none. Default: the estimator's own (grpo: group; dr_grpo, rloo: none); dr_grpo admits only none."
        ),
    )
    advantage_eps: float = Field(
        1e-4,
        gt=0,
        description=(
            "Added to the std before dividing, so a group of near-equal rewards does not get huge advantages "
            "(TRL's value, for comparable runs)."
        ),
    )
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token",
        description=(
            "Ratio pi/pi_old per token (GRPO) or per completion as the geometric mean of its token ratios (GSPO)."
        ),
    )
    loss_aggregation: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = Field(
        "grpo",
        description=(
            "How per-token losses become the batch loss: grpo mean per completion then "
            "over completions (DeepSeekMath); "
            "bnpo token mean per micro-batch; dapo token mean over the optimiser step's batch (DAPO); dr_grpo "
            "sum / (completions x max_new_tokens) (Dr. GRPO). TRL's loss_type."
        ),
    )
    mask_truncated_completions: bool = Field(
        False,
        description=(
            "Completions cut by max_new_tokens add no loss (DAPO's overlong filtering). Off by default: with "
            "the short demo limit most early completions are cut."
        ),
    )
    dynamic_sampling: bool = Field(
        False,
        description=(
            "DAPO dynamic sampling: leave out of the update the groups whose rewards are all equal (they have "
            "zero advantage); the advantages artifact keeps them with kept=false."
        ),
    )
    max_refill_rounds: int = Field(
        0,
        ge=0,
        description=(
            "With dynamic_sampling: at most this many extra rounds of prompts_per_iteration new prompts (generate "
            "+ score) per iteration until prompts_per_iteration groups have reward spread; 0 = never refill."
        ),
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient norm clip.")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay (0: the KL term already keeps the policy near the reference)."
    )
    micro_batch_size: int = Field(
        64,
        ge=1,
        description=(
            "Completions per forward/backward in the update; bounds update memory (gradients accumulate: the "
            "step is the same). 64 suits the 1M-parameter demo; SmolLM2-135M on CPU ran out of memory at 64 (20 "
            "GiB) and peaked at 5.6 GiB with 8, so with --model the default is 8."
        ),
    )
    mini_batches: int = Field(
        1,
        ge=1,
        description=(
            "Optimiser steps per pass over an iteration's completions: they are split "
            "into this many equal mini-batches "
            "(TRL steps_per_generation). 1 = one step, the on-policy GRPO of DeepSeekMath."
        ),
    )
    mu: int = Field(
        1,
        ge=1,
        description=(
            "Passes (GRPO's mu, TRL num_iterations, verl ppo_epochs) over the same completions per iteration; "
            "the ratio uses the stored sampling log-probs. 1 = on-policy, DeepSeekMath's default."
        ),
    )
    store_old_logprobs: bool = Field(
        False,
        description=(
            "Compute and store the sampling policy's per-token log-probs (generations' old_logprobs) even when "
            "the update does not need them. They are needed, and always stored, when mu > 1 or mini_batches > "
            "1; with one optimiser step per iteration the policy being updated is the one that sampled, so the "
            "ratio is 1 by construction and the update uses its own detached log-probs, as TRL does, saving one "
            "forward pass per iteration."
        ),
    )
    gradient_checkpointing: bool = Field(
        False,
        description=(
            "Recompute activations during the backward pass instead of keeping them "
            "(transformers' gradient checkpointing): "
            "update memory drops from ~layers x tokens x hidden activations to about one hidden state per token "
            "per layer, for ~30 percent more update compute. Off suits the tiny demo model; with --model the "
            "default is on (as TRL's): SmolLM2-135M's update peaked at 3.3 GiB with it against 5.6 GiB without "
            "(micro-batch 8, benchmarks/RESULTS.md)."
        ),
    )

    # --- log-prob chunks -----------------------------------------------------------------
    logprob_chunk_tokens: int = Field(
        256,
        ge=0,
        description=(
            "Completion positions whose vocabulary logits exist at once when computing log-probs and entropy "
            "(update, reference and old-policy forwards): the output head and log-softmax run on chunks of this "
            "many positions from the final hidden states, recomputed chunk by chunk in the backward pass, so "
            "memory grows with the chunk instead of with batch x completion length x vocabulary. 0 = the whole-logits "
            "path (one (batch, tokens, vocabulary) tensor). Models with soft-capped or scaled logits always take "
            "the whole-logits path."
        ),
    )

    # --- LoRA -----------------------------------------------------------------------------
    lora_rank: int = Field(
        0,
        ge=0,
        description=(
            "LoRA rank R (peft; make install-lora): train low-rank adapters on the frozen model instead of every "
            "weight, so the update holds gradients and AdamW state for the adapters only; the KL reference is "
            "the same weights with the adapter disabled (no second copy); checkpoints hold the adapter; final/ "
            "holds the merged model. 0 = full fine-tuning. Adapters learn more slowly per step than full weights: "
            "raise learning_rate (the tiny demo used 10x, benchmarks/RESULTS.md)."
        ),
    )
    lora_alpha: float | None = Field(
        None, gt=0, description="LoRA scale numerator: the adapter adds (alpha / R) B A x. Default: 2 x lora_rank."
    )
    lora_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=(
            "Dropout on the adapters' input during the update. 0 keeps the update's log-probs equal to the sampler's "
            "(ratio 1 at the first step)."
        ),
    )
    lora_target_modules: str | None = Field(
        None,
        description=(
            "Comma-separated names of the modules that get adapters (e.g. q_proj,v_proj). Default: every linear "
            "layer of the transformer blocks, not the output head (peft's all-linear)."
        ),
    )

    # --- evaluation, checkpoints, machine ---------------------------------------------------
    eval_every: int = Field(
        10,
        ge=0,
        description=(
            "Evaluate on the held-out prompts every this many iterations (and at the start and end); 0 = only "
            "start and end."
        ),
    )
    eval_size: int = Field(
        500, ge=1, description="Held-out problems scored per evaluation (at most the held-out set's size)."
    )
    save_every: int = Field(1, ge=1, description="Write a checkpoint every this many iterations (and after the last).")
    # --- run folder: checkpoint rotation --------------------------------------------
    save_total_limit: int | None = Field(
        None,
        ge=1,
        description=(
            "Keep only the newest this many iteration checkpoints (the one a resume starts from is always kept); "
            "None keeps all. Only that resumable one keeps its optimiser state (two thirds of a checkpoint), "
            "so older ones hold the weights alone. The run's final/ folder is not counted. With --model the default "
            "is 3: a checkpoint of a 135M-parameter model is 0.54 GB of weights (1.6 GB with AdamW state), so "
            "keeping every iteration's fills a disk in a day."
        ),
    )
    seed: int = Field(
        0,
        description=(
            "Seed of prompt sampling, generation and update; a run is reproducible given the same seed and machine."
        ),
    )
    device: str = Field("auto", description="torch device: auto (CUDA when present, else CPU), cpu, cuda, cuda:1...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Model dtype: auto = bfloat16 on a GPU that has it, else float32."
    )
    tiny_model_sft_steps: int = Field(
        250,
        ge=0,
        description=(
            "Supervised (SFT) steps that build the built-in tiny model, once, before any GRPO (only when no --model "
            "is given); 250 leaves it at about 60 percent held-out accuracy, with headroom "
            "for GRPO. Not a learning-rate "
            "warm-up: that is warmup_ratio. Called warmup_steps before; config files with that name still load."
        ),
    )

    # --- learning-rate schedule (TRL and verl names) ----------------------------------------
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description=(
            "Learning rate over the run's optimiser steps (iterations x mu x mini_batches), after the warm-up: "
            "constant, linear decay to 0, or cosine decay to 0; transformers' formulas (TRL lr_scheduler_type, "
            "verl warmup_style). The step is derived from the iteration number, so a resumed run continues the "
            "schedule exactly; changing iterations mid-run stretches it from then on."
        ),
    )
    warmup_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=(
            "Fraction of the optimiser steps (rounded up) over which the learning rate rises linearly from 0 "
            "to learning_rate (TRL warmup_ratio, verl lr_warmup_steps_ratio); 0 = no warm-up."
        ),
    )

    # --- prompts: length limit, several datasets, task -----------------------------------------
    max_prompt_length: int | None = Field(
        None,
        ge=1,
        description=(
            "Longest prompt in tokens, chat template included; longer ones are handled as prompt_overflow says, "
            "counted (prompts/truncated, prompts/skipped in metrics) and warned about. "
            "None = no limit (TRL max_prompt_length, "
            "verl data.max_prompt_length)."
        ),
    )
    prompt_overflow: Literal["truncate_left", "skip"] = Field(
        "truncate_left",
        description=(
            "A prompt longer than max_prompt_length: truncate_left keeps its last max_prompt_length tokens (TRL's "
            "way: the end of the question and the generation prompt survive); skip leaves it out of the iteration "
            "and the evaluation (verl's filter_overlong_prompts)."
        ),
    )
    datasets: dict[str, float] | None = Field(
        None,
        description=(
            "Several training datasets mixed with weights (JSON object of source -> "
            "weight, same formats as --dataset): "
            "every iteration draws its prompts_per_iteration prompts from them in these proportions (largest "
            "remainder, exact over the run), each walking its own seeded epochs. Instead of --dataset."
        ),
    )

    # --- sampling, more (TRL and vLLM names) --------------------------------------------------
    top_k: int = Field(
        0,
        ge=0,
        description=(
            "Sample among the k most likely tokens only; 0 = off. Like top_p, min_p and repetition_penalty, it "
            "changes the distribution sampled from, so it is refused with mu > 1, mini_batches "
            "> 1 or store_old_logprobs: "
            "the stored log-probs would not be those of the sampled distribution."
        ),
    )
    min_p: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=(
            "Drop tokens whose probability is below min_p x that of the most likely token; 0 = off (same restriction "
            "as top_k)."
        ),
    )
    repetition_penalty: float = Field(
        1.0,
        gt=0,
        description=(
            "Divide the logits of tokens already in the prompt or completion by this (CTRL's penalty, as transformers "
            "and vLLM apply it); 1 = off (same restriction as top_k)."
        ),
    )
    stop: list[str] = Field(
        default_factory=list,
        description=(
            "Stop strings (JSON list): a completion ends with the token that completes one of them (finish_reason "
            "'stop'; the string is kept in the completion). They do not change any token's probability."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_and_task_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "warmup_steps" in data:  # config.json of runs made before the rename
            if "tiny_model_sft_steps" in data:
                raise ValueError("warmup_steps is the old name of tiny_model_sft_steps; give only tiny_model_sft_steps")
            data["tiny_model_sft_steps"] = data.pop("warmup_steps")
        if data.get("rewards") is None and data.get("task") in TASK_REWARDS:
            # --task math without --rewards: the reward that checks math, not exact string equality
            data["rewards"] = {TASK_REWARDS[data["task"]]: 1.0}
        return data

    @model_validator(mode="after")
    def _sampling_matches_logprobs(self) -> GRPOConfig:
        changed = [
            f"{name}={getattr(self, name)}"
            for name, off in (("top_p", 1.0), ("top_k", 0), ("min_p", 0.0), ("repetition_penalty", 1.0))
            if getattr(self, name) != off
        ]
        stored = [
            s
            for s, on in (
                ("mu > 1", self.mu > 1),
                ("mini_batches > 1", self.mini_batches > 1),
                ("store_old_logprobs", self.store_old_logprobs),
            )
            if on
        ]
        if changed and stored:
            raise ValueError(
                f"{', '.join(changed)} change the distribution sampled from, but with {' and '.join(stored)} "
                "the update's "
                "ratio uses "
                "stored log-probs of softmax(logits / temperature), which are not that distribution's; use mu=1 and "
                "mini_batches=1 (one on-policy step, ratio 1) or leave them off"
            )
        return self

    @model_validator(mode="after")
    def _one_kind_of_dataset(self) -> GRPOConfig:
        if self.datasets is not None:
            if self.dataset is not None:
                raise ValueError("give --dataset or --datasets (several, with weights), not both")
            if not self.datasets or any(w <= 0 or w != w for w in self.datasets.values()):
                raise ValueError(f"datasets needs at least one source and every weight > 0 (got {self.datasets})")
        return self

    # --- cluster ---------------------------------------------------------------------------
    cluster: str = Field(
        "local",
        description=(
            "Where the stages run: local (this process, the default), auto (the Ray cluster this machine belongs "
            "to, e.g. after `ray start --head`) or ray://host:port (a Ray cluster's client address). A Ray cluster "
            "needs `make install-cluster` and a run folder on storage every node can see."
        ),
    )
    training_ranks: int = Field(
        1,
        ge=1,
        description=(
            "With a Ray cluster: ranks (Ray actors in one torch.distributed process group: gloo on CPU, NCCL "
            "on GPUs) that run the update; each optimiser step's micro-batches are dealt over them and the step "
            "is the same as on one rank."
        ),
    )
    parallelism: Literal["ddp", "fsdp2"] = Field(
        "ddp",
        description=(
            "With training_ranks > 1: ddp (every rank holds the whole model; for models that fit one device) "
            "or fsdp2 (torch fully_shard: parameters, gradients and optimiser state sharded over the ranks)."
        ),
    )
    generation_workers: int = Field(
        1,
        ge=1,
        description=(
            "With a Ray cluster: long-lived generation workers (Ray actors, each holding the policy) over which "
            "an iteration's prompt shards are dealt."
        ),
    )
    generation_shard_prompts: int = Field(
        8,
        ge=1,
        description=(
            "With a Ray cluster: prompts per generation shard, the unit dealt to workers; each shard has a seed "
            "of its own, so the generations are the same whatever the number of workers."
        ),
    )
    cpus_per_worker: float = Field(
        1,
        gt=0,
        description=(
            "With a Ray cluster: CPUs Ray reserves for each training rank and each generation worker (also its "
            "torch thread count)."
        ),
    )
    gpus_per_worker: float = Field(
        0,
        ge=0,
        description=(
            "With a Ray cluster: GPUs Ray reserves for each training rank and each generation worker (0 on CPU-only "
            "clusters)."
        ),
    )

    @field_validator("cluster")
    @classmethod
    def _cluster_address(cls, value: str) -> str:
        if value in ("local", "auto") or (value.startswith("ray://") and ":" in value.removeprefix("ray://")):
            return value
        raise ValueError(f"cluster must be local, auto or ray://host:port (got '{value}')")

    @model_validator(mode="after")
    def _workers_need_a_cluster(self) -> GRPOConfig:
        if self.cluster == "local" and (self.training_ranks > 1 or self.generation_workers > 1):
            raise ValueError(
                "training_ranks > 1 or generation_workers > 1 need a Ray cluster: --cluster auto or ray://host:port"
            )
        if self.cluster != "local" and self.lora_rank:
            # The workers' weights come from rank 0's state dict, which with peft carries adapter names: not built yet.
            raise ValueError(
                "lora_rank > 0 runs with --cluster local only (LoRA on a Ray cluster is not supported yet)"
            )
        return self

    # --- tracking --------------------------------------------------------------------------
    tracking_uri: str | None = Field(
        None,
        description=(
            "MLflow tracking store and model registry (needs `make install-tracking`): a .db/.sqlite file (SQLite), "
            "or a folder (a SQLite store inside it, mlflow.db) when given as a path, else an MLflow URI or server "
            "URL (http://host:5000). One MLflow run per flow run with every setting as a param and every metric "
            "of every iteration (step = iteration); a resumed run continues its MLflow run. Default: off."
        ),
    )
    experiment: str | None = Field(
        None, description="MLflow experiment the runs go to. Default: the run folder's name."
    )
    tensorboard: Path | None = Field(
        None,
        description=(
            "Write the same per-iteration metrics as TensorBoard event files into this "
            "folder (needs `make install-tracking`). "
            "Default: off."
        ),
    )
    register_as: str | None = Field(
        None,
        description=(
            "At the end of a run, register its final model as a new version of this MLflow registered model (needs "
            "tracking_uri). It gets the `champion` alias only when its promote_on metric is at least the current "
            "champion's, measured on the same held-out set."
        ),
    )
    promote_on: str = Field(
        "held_out_accuracy",
        description=(
            "The final iteration's metric (a metrics.parquet name, higher is better) that decides promotion to "
            "champion; it must be measured on the held-out set to be comparable across runs."
        ),
    )
    train_from: Literal["champion", "latest"] = Field(
        "champion",
        description=(
            "Where a scheduled run (grpo serve) with register_as starts: the registered champion's weights, or "
            "the run folder's latest checkpoint even when it was not promoted."
        ),
    )

    @model_validator(mode="after")
    def _registry_needs_a_store(self) -> GRPOConfig:
        if self.register_as is not None and self.tracking_uri is None:
            raise ValueError(
                "register_as needs tracking_uri: the model registry lives in an MLflow store (a folder, a .db file "
                "or a server URL)"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _real_model_defaults(cls, data: Any) -> Any:
        # Only fields the caller did not set; a stored config.json sets every field.
        if isinstance(data, dict) and data.get("model") is not None:
            return REAL_MODEL_DEFAULTS | data
        return data

    @model_validator(mode="after")
    def _estimator_scaling(self) -> GRPOConfig:
        if self.advantage_estimator == "dr_grpo" and self.scale_rewards not in (None, "none"):
            raise ValueError(
                "advantage_estimator 'dr_grpo' divides by no std, so scale_rewards must "
                f"be 'none' (got '{self.scale_rewards}'); "
                "use 'grpo' to scale"
            )
        return self

    @model_validator(mode="after")
    def _lora_needs_rank(self) -> GRPOConfig:
        stray = [name for name in ("lora_alpha", "lora_target_modules") if getattr(self, name) is not None] + (
            ["lora_dropout"] if self.lora_dropout else []
        )
        if stray and not self.lora_rank:
            raise ValueError(
                f"{', '.join(stray)} set but lora_rank is 0 (full fine-tuning); set lora_rank to train adapters"
            )
        return self

    @field_validator("rewards")
    @classmethod
    def _known_rewards(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError("at least one reward is needed")
        known = set(known_rewards())
        for name in value:
            if ":" not in name and name not in known:
                raise ValueError(f"unknown reward '{name}'; known rewards: {', '.join(sorted(known))}")
        return value

    def bound_reward_options(self) -> dict[str, dict[str, Any]]:
        """`reward_options` with the defaults that follow from other settings filled in."""
        options = {name: dict(opts) for name, opts in self.reward_options.items()}
        if "overlong" in self.rewards and "max_length" not in options.get("overlong", {}):
            # DAPO punishes the last 20% of the length budget (4096 of 20480 tokens).
            options.setdefault("overlong", {}).update(
                max_length=self.max_new_tokens, cache_length=max(1, self.max_new_tokens // 5)
            )
        return options

    @model_validator(mode="after")
    def _reward_options_bind(self) -> GRPOConfig:
        stray = sorted(set(self.reward_options) - set(self.rewards))
        if stray:
            raise ValueError(
                f"reward_options names {', '.join(stray)}, which is not among the rewards ({', '.join(self.rewards)})"
            )
        for name, options in self.bound_reward_options().items():
            make_reward(name, options)  # unknown option or wrong type: fail now, naming the valid ones
        return self

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> GRPOConfig:
        """Load YAML or JSON, then apply `overrides` (flags given on the command line)."""
        return cls(**(cls.settings_file(path) | overrides))

    @staticmethod
    def settings_file(path: str | Path) -> dict[str, Any]:
        """The settings in a YAML or JSON file, not yet validated."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file '{path}' does not exist")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            detail = " ".join(str(err).split())  # YAML errors span several lines; keep one
            raise UserError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {detail}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
        return data

    def lora_settings(self):
        """The LoRA settings of the update, or None for full fine-tuning."""
        if not self.lora_rank:
            return None
        targets = (
            tuple(t.strip() for t in self.lora_target_modules.split(",") if t.strip())
            if self.lora_target_modules
            else None
        )
        return LoraSettings(
            rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout, target_modules=targets
        )

    def uses_builtin_data(self) -> bool:
        return self.dataset is None and self.datasets is None

    def training_sources(self) -> dict[str, float]:
        """Every training dataset with its weight (one source: weight 1)."""
        return dict(self.datasets) if self.datasets is not None else {self.dataset: 1.0}


# The sections of `grpo run --help` and of the configuration reference (docs/), in order.
# Every field is in exactly one (checked when this module is imported).
SECTIONS: dict[str, tuple[str, ...]] = {
    "run": ("run_dir", "iterations", "prompts_per_iteration", "group_size", "seed"),
    "model and machine": ("model", "device", "dtype", "tiny_model_sft_steps"),
    "data": (
        "dataset",
        "datasets",
        "dataset_split",
        "task",
        "skip_invalid",
        "max_prompt_length",
        "prompt_overflow",
    ),
    "sampling": (
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "stop",
        "use_chat_template",
        "generation_batch_size",
    ),
    "generation engine": (
        "generation_engine",
        "eval_engine",
        "vllm_gpu_memory_utilization",
        "vllm_cpu_kv_cache_gb",
        "mismatch_correction",
        "mismatch_cap",
    ),
    "rewards and scoring": (
        "rewards",
        "reward_options",
        "max_reward_error_fraction",
        "score_workers",
        "score_chunk_rows",
        "score_worker_memory_mb",
    ),
    "objective": (
        "beta",
        "epsilon",
        "epsilon_high",
        "advantage_estimator",
        "scale_rewards",
        "advantage_eps",
        "importance_sampling_level",
        "loss_aggregation",
        "mask_truncated_completions",
        "dynamic_sampling",
        "max_refill_rounds",
    ),
    "optimiser and update": (
        "learning_rate",
        "lr_scheduler",
        "warmup_ratio",
        "max_grad_norm",
        "weight_decay",
        "micro_batch_size",
        "mini_batches",
        "mu",
        "store_old_logprobs",
        "gradient_checkpointing",
        "logprob_chunk_tokens",
    ),
    "LoRA": ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules"),
    "evaluation": ("eval_dataset", "eval_every", "eval_size"),
    "checkpoints": ("save_every", "save_total_limit"),
    "cluster": (
        "cluster",
        "training_ranks",
        "parallelism",
        "generation_workers",
        "generation_shard_prompts",
        "cpus_per_worker",
        "gpus_per_worker",
    ),
    "tracking": ("tracking_uri", "experiment", "tensorboard", "register_as", "promote_on", "train_from"),
}


# What `grpo run --help` lists; `grpo run --help-all` lists every field. The settings a first
# run and most later ones touch: what to train on what, how long, and the objective's knobs.
ESSENTIAL: tuple[str, ...] = (
    "run_dir",
    "iterations",
    "prompts_per_iteration",
    "group_size",
    "seed",
    "model",
    "device",
    "dtype",
    "dataset",
    "task",
    "eval_dataset",
    "rewards",
    "max_new_tokens",
    "temperature",
    "generation_engine",
    "learning_rate",
    "beta",
    "lora_rank",
    "save_every",
    "tracking_uri",
)


def _check_sections() -> None:
    placed = [name for names in SECTIONS.values() for name in names]
    missing = sorted(set(GRPOConfig.model_fields) - set(placed))
    twice = sorted({name for name in placed if placed.count(name) > 1})
    unknown = sorted(set(placed) - set(GRPOConfig.model_fields))
    unknown += sorted(set(ESSENTIAL) - set(GRPOConfig.model_fields))
    if missing or twice or unknown:
        raise RuntimeError(f"flows.config.SECTIONS: missing {missing}, listed twice {twice}, not fields {unknown}")


_check_sections()


def field_sections() -> list[tuple[str, list[str]]]:
    """The config's fields grouped by section, in order, for `grpo run --help` and the docs."""
    return [(title, list(names)) for title, names in SECTIONS.items()]
