"""Update stage: generations.parquet (one per sampling round) + advantages.parquet + policy
-> new checkpoint.

Holds the policy and its optimiser only: the old-policy and reference log-probs come from
the generations artifact, so no second model is in memory here whatever beta is.

Schedule of one iteration (PPO-style, as GRPO's Algorithm 1 with mu inner updates)::

    for epoch in 1..mu:                              # mu passes over the same completions
        shuffle the kept completions
        split them into `mini_batches` equal parts   # one optimiser step each
        for each mini-batch:
            for each micro-batch of `micro_batch_size` completions:   # similar lengths (plan_micro_batches)
                loss share (tasks.objective.policy_loss) -> backward   # gradients accumulate
            clip the gradient norm, optimiser step

The ratio uses the *stored* old-policy log-probs, so epochs after the first (and
mini-batches after the first) see ratios away from 1 and the clip acts. When the schedule
is a single optimiser step (mu = 1, one mini-batch) the generate stage stores none: the
policy here is the one that sampled, so pi_old = pi numerically and the update uses its own
log-probs, detached (ratio exactly 1; the gradient is the same). Memory depends on the
micro-batch size only (and drops further with gradient checkpointing), not on the number of
prompts or the group size.

Work that cannot change the step is not done (`plan_micro_batches`): with beta = 0 a
completion whose advantage is 0 has no gradient, so it is never forwarded (its tokens still
count in the normalisers), and micro-batches hold completions of similar length, so little
of a forward is padding. Per micro-batch the host waits for the device only inside the
objective's statistics; the losses and entropies are summed on the device and read once per
optimiser step.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

import tasks.model as tasks_model
from data.schemas import ADVANTAGES, GENERATIONS
from data.store import DiskFull, check_free_space, read_table
from tasks.distributed import (
    clip_gradients,
    deal,
    full_optimizer_state,
    full_state_dict,
    gradient_sync,
    load_full_optimizer_state,
    max_over_ranks,
    pick_parallelism,
    rank_and_world,
    sum_over_ranks,
)
from tasks.logprobs import DEFAULT_CHUNK_TOKENS, completion_logprobs, pack
from tasks.lora import LoraSettings, add_adapter, is_adapted, trainable_parameters
from tasks.model import (
    CheckpointNotSaved,
    checkpoint_bytes,
    live_policy,
    move_live_policy,
    read_optimizer_state,
    save_checkpoint,
    save_in_background,
    wait_for_saves,
)
from tasks.objective import SPLIT_INVARIANT_AGGREGATIONS, BatchTotals, LossSettings, loss_mask, policy_loss
from tasks.progress import progress
from tasks.schedule import LRSchedule
from tasks.stage_settings import StageSettings


class ArtifactMismatch(ValueError):
    pass


_GEN_COLUMNS = [
    "prompt_id",
    "sample_index",
    "prompt_token_ids",
    "completion_token_ids",
    "old_logprobs",
    "ref_logprobs",
    "finish_reason",
    "sampler_logprobs",
]


def read_generations(generations_paths: str | Path | Sequence[str | Path]) -> list[dict]:
    """Every row of the iteration's generations files (its sampling rounds), in order."""
    paths = [generations_paths] if isinstance(generations_paths, (str, Path)) else list(generations_paths)
    return [row for p in paths for row in read_table(p, GENERATIONS, columns=_GEN_COLUMNS).to_pylist()]


def join_advantages(gens: list[dict], advantages_path: str | Path, where: str = "generations") -> list[dict]:
    """`gens` joined with their advantages, in generation order; only kept rows. Every
    generation must have exactly one advantages row and vice versa."""
    adv = read_table(
        advantages_path, ADVANTAGES, columns=["prompt_id", "sample_index", "advantage", "kept"]
    ).to_pylist()
    by_key = {(a["prompt_id"], a["sample_index"]): a for a in adv}
    rows = []
    for g in gens:
        a = by_key.pop((g["prompt_id"], g["sample_index"]), None)
        if a is None:
            raise ArtifactMismatch(
                f"{advantages_path}: no row for prompt_id {g['prompt_id']} sample {g['sample_index']} of {where}"
            )
        if a["kept"]:
            rows.append(g | {"advantage": a["advantage"]})
    if by_key:
        pid, idx = next(iter(by_key))
        raise ArtifactMismatch(f"{advantages_path}: row prompt_id {pid} sample {idx} is not in {where}")
    return rows


def load_training_rows(generations_paths: str | Path | Sequence[str | Path], advantages_path: str | Path) -> list[dict]:
    """Generations joined with their advantages, in generation order; only kept rows."""
    return join_advantages(read_generations(generations_paths), advantages_path, str(generations_paths))


def split_mini_batches(count: int, parts: int, rng: random.Random) -> list[list[int]]:
    """A random permutation of range(count) cut into `parts` near-equal mini-batches (sizes
    differ by at most one; empty ones left out)."""
    order = list(range(count))
    rng.shuffle(order)
    size, extra = divmod(count, parts)
    out, start = [], 0
    for k in range(parts):
        end = start + size + (k < extra)
        if end > start:
            out.append(order[start:end])
        start = end
    return out


def completion_metrics(gens: list[dict]) -> dict:
    """Length statistics of every sampled completion (kept or not), TRL's names."""
    lengths = [len(g["completion_token_ids"]) for g in gens]
    if not lengths:
        return {
            "completions/mean_length": 0.0,
            "completions/min_length": 0,
            "completions/max_length": 0,
            "completions/clipped_ratio": 0.0,
        }
    return {
        "completions/mean_length": sum(lengths) / len(lengths),
        "completions/min_length": min(lengths),
        "completions/max_length": max(lengths),
        "completions/clipped_ratio": sum(g["finish_reason"] == "length" for g in gens) / len(gens),
    }


def _pad(values: list[list[float]], width: int, device) -> torch.Tensor:
    out = torch.zeros((len(values), width), dtype=torch.float32)
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.as_tensor(v, dtype=torch.float32)
    return out.to(device)


class MismatchSums:
    """Running sums of `policy_loss`'s train/inference mismatch statistics over the micro-
    batches of an iteration; `metrics()` gives TRL's names (none when no micro-batch had the
    sampler's log-probs). Later passes (mu > 1) see the same tokens again, which leaves the
    means, minima and maxima unchanged."""

    def __init__(self) -> None:
        self.tokens = self.diff_sum = self.ratio_sum = 0.0
        self.diff_max, self.ratio_min, self.ratio_max = 0.0, math.inf, -math.inf

    def add(self, stats: dict) -> None:
        if "mismatch_tokens" not in stats:
            return
        self.tokens += stats["mismatch_tokens"]
        self.diff_sum += stats["logp_diff_sum"]
        self.ratio_sum += stats["is_ratio_sum"]
        self.diff_max = max(self.diff_max, stats["logp_diff_max"])
        self.ratio_min = min(self.ratio_min, stats["is_ratio_min"])
        self.ratio_max = max(self.ratio_max, stats["is_ratio_max"])

    def merge_ranks(self) -> None:
        """Every rank's sums summed and extremes taken (tasks/distributed.py); no-op on one rank."""
        self.tokens, self.diff_sum, self.ratio_sum = sum_over_ranks(
            {"a": self.tokens, "b": self.diff_sum, "c": self.ratio_sum}
        ).values()
        self.diff_max, self.ratio_max, low = max_over_ranks([self.diff_max, self.ratio_max, -self.ratio_min])
        self.ratio_min = -low

    def metrics(self) -> dict:
        if not self.tokens:
            return {}
        return {
            "sampling/sampling_logp_difference/mean": self.diff_sum / self.tokens,
            "sampling/sampling_logp_difference/max": self.diff_max,
            "sampling/importance_sampling_ratio/min": self.ratio_min,
            "sampling/importance_sampling_ratio/mean": self.ratio_sum / self.tokens,
            "sampling/importance_sampling_ratio/max": self.ratio_max,
        }


def needs_old_logprobs(mu: int, mini_batches: int) -> bool:
    """Whether the update needs the sampling policy's stored log-probs: only when it takes
    more than one optimiser step on the same completions (the generate stage asks this too)."""
    return mu > 1 or mini_batches > 1


def set_activation_checkpointing(model, on: bool) -> None:
    """Switch transformers' activation (gradient) checkpointing on or off. Non-reentrant, so
    no input needs to require grad. transformers 5.2x renamed gradient_checkpointing_* to
    activation_checkpointing_*; older releases (>= 4.51 is supported) have only the former."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _loss_tokens(row: dict, loss: LossSettings) -> int:
    if loss.mask_truncated_completions and row["finish_reason"] == "length":
        return 0
    return len(row["completion_token_ids"])


def zero_gradient(row: dict, loss: LossSettings) -> bool:
    """Whether a completion provably adds nothing to the gradient: it has no loss token (masked
    as truncated, or empty), or beta = 0 and its advantage is 0, when its per-token loss is
    -min(w A, clip(w) A) = 0 whatever the ratio w, and so is its derivative."""
    return _loss_tokens(row, loss) == 0 or (loss.beta == 0 and row["advantage"] == 0.0)


def plan_micro_batches(batch_rows: list[dict], size: int, loss: LossSettings) -> tuple[list[list[dict]], list[dict]]:
    """The micro-batches (at most `size` completions each) of one optimisation batch, and the
    completions left out of them because they carry no gradient.

    With an aggregation whose step does not depend on the split (SPLIT_INVARIANT_AGGREGATIONS)
    the `zero_gradient` completions are left out (the caller still counts their tokens in the
    batch's normalisers) and the others are sorted by length before being cut, so that each
    micro-batch pads little: the same step (tested) for fewer tokens through the model. With
    `bnpo`, whose normaliser is each micro-batch's own token count, the batch is cut in its
    shuffled order and nothing is left out.
    """
    if loss.aggregation not in SPLIT_INVARIANT_AGGREGATIONS:
        return [batch_rows[s : s + size] for s in range(0, len(batch_rows), size)], []
    idle = [r for r in batch_rows if zero_gradient(r, loss)]
    live = [r for r in batch_rows if not zero_gradient(r, loss)]
    if len(live) > size:  # one micro-batch pads the same in any order
        live.sort(
            key=lambda r: (len(r["prompt_token_ids"]) + len(r["completion_token_ids"]), len(r["prompt_token_ids"]))
        )
    return [live[s : s + size] for s in range(0, len(live), size)], idle


def _idle_units(rows: list[dict], loss: LossSettings) -> float:
    """What completions left out of the forward add to the clip statistics' denominator, as
    `policy_loss` counts it: their loss tokens (token-level ratios) or one each (sequence-level)."""
    return (
        float(len(rows)) if loss.importance_sampling == "sequence" else float(sum(_loss_tokens(r, loss) for r in rows))
    )


def _zero_gradients(model) -> None:
    """A step over completions that all carry no gradient: zeros, not None, so AdamW steps (its
    moments decay) exactly as after a backward pass that produced zeros."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)


def update_policy(
    generations_path: str | Path | Sequence[str | Path],
    advantages_path: str | Path,
    policy_path: str,
    out_checkpoint: str | Path,
    *,
    learning_rate: float,
    loss: LossSettings,
    lr_schedule: LRSchedule | None = None,
    first_step: int = 0,
    mu: int = 1,
    mini_batches: int = 1,
    micro_batch_size: int = 32,
    gradient_checkpointing: bool = False,
    logprob_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    lora: LoraSettings | None = None,
    max_grad_norm: float = 1.0,
    weight_decay: float = 0.0,
    save: bool = True,
    background_save: bool = False,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    parallelism: str = "ddp",
) -> dict:
    """mu x mini_batches optimiser steps of the GRPO objective over the kept completions;
    returns the iteration's training metrics (TRL's names).

    With `lr_schedule`, optimiser step k of this iteration (k = epoch x mini_batches + its
    mini-batch) uses ``lr_schedule.at(first_step + k)``; without, `learning_rate` throughout.

    Inside a torch.distributed process group of N > 1 ranks (every rank calls this with the
    same arguments) each step's micro-batches are dealt out over the ranks and the model is
    wrapped by `parallelism` ("ddp" or "fsdp2"): the step is the one-rank step (see
    tasks/distributed.py). Rank 0 writes the one consolidated checkpoint.

    `background_save` (one process only): a checkpoint of at least BACKGROUND_SAVE_MIN_BYTES is
    written on a background thread (tasks.model.save_in_background) and this returns before it
    is on disk; the next update waits for it before it changes a weight."""
    if mu < 1 or mini_batches < 1 or micro_batch_size < 1:
        raise ValueError(
            f"mu, mini_batches and micro_batch_size must be >= 1 (got {mu}, {mini_batches}, {micro_batch_size})"
        )
    started = time.perf_counter()
    wait_for_saves()  # the previous checkpoint, written in the background from these very weights
    rank, world = rank_and_world()
    par = pick_parallelism(parallelism)
    sharded = par.sharded and world > 1
    policy = live_policy(policy_path, device, dtype)
    if lora is not None and not is_adapted(policy.model):
        # The first LoRA update puts the adapter on the base (B = 0: the policy is unchanged).
        policy.model = add_adapter(policy.model, lora, policy_path, seed=seed)
    if world > 1 and policy.trainer is None:
        policy.trainer = par.wrap(policy.model)  # FSDP2 shards the model in place
    model = policy.model
    # The training forward: through the DDP/FSDP2 wrapper on N ranks, so their hooks run.
    forward = policy.trainer if policy.trainer is not None else functools.partial(completion_logprobs, model)
    if policy.optimizer is None:
        # AdamW as in DeepSeekMath, over the trainable weights (the adapters' alone with
        # LoRA); state restored when the checkpoint carries it, so a resumed run continues
        # exactly (on any number of ranks: one layout for all).
        policy.optimizer = torch.optim.AdamW(trainable_parameters(model), lr=learning_rate, weight_decay=weight_decay)
        state = read_optimizer_state(policy_path)
        if state is not None:
            load_full_optimizer_state(policy.trainer, policy.optimizer, state, sharded)
    for group in policy.optimizer.param_groups:
        group["lr"] = learning_rate
    if save and rank == 0:  # a checkpoint that cannot fit fails now, not after minutes of update
        check_free_space(out_checkpoint, checkpoint_bytes(policy))
    policy.optimizer.zero_grad(set_to_none=True)  # a retried stage must not add to stale gradients

    gens = read_generations(generations_path)
    rows = join_advantages(gens, advantages_path, str(generations_path))
    if loss.beta > 0 and any(r["ref_logprobs"] is None for r in rows):
        raise ArtifactMismatch(f"{generations_path}: beta > 0 but the generations carry no reference log-probs")
    if needs_old_logprobs(mu, mini_batches) and any(r["old_logprobs"] is None for r in rows):
        raise ArtifactMismatch(
            f"{generations_path}: mu={mu} x mini_batches={mini_batches} optimiser steps need the sampling policy's "
            "log-probs, but the generations carry none (generated for a single step); generate them again"
        )
    if loss.mismatch_correction != "none" and any(r["sampler_logprobs"] is None for r in rows):
        raise ArtifactMismatch(
            f"{generations_path}: mismatch correction '{loss.mismatch_correction}' needs the sampler's log-probs, "
            "but some generations carry none (written before schema version 3); generate them again"
        )
    rng = random.Random(seed)
    mismatch = MismatchSums()
    pad_id = policy.tokenizer.pad_token_id
    sums = {
        "tokens": 0.0,
        "kl_sum": 0.0,
        "clip_low": 0.0,
        "clip_high": 0.0,
        "clip_region": 0.0,
        "clip_units": 0.0,
        "seen_tokens": 0.0,
        "forwarded": 0.0,
        "forwarded_tokens": 0.0,
        "idle_completions": 0.0,
    }
    entropy_sum = torch.zeros((), device=model.device)  # summed on the device, read once at the end
    step_losses: list[float] = []
    grad_norms: list[float] = []
    skipped = 0
    if gradient_checkpointing:
        set_activation_checkpointing(model, True)
    model.train()
    with progress("update", total=len(rows) * mu) as bar:
        for epoch in range(mu):
            for position, mini in enumerate(split_mini_batches(len(rows), mini_batches, rng)):
                step_lr = (
                    learning_rate
                    if lr_schedule is None
                    else lr_schedule.at(first_step + epoch * mini_batches + position)
                )
                for group in policy.optimizer.param_groups:
                    group["lr"] = step_lr
                batch_rows = [rows[i] for i in mini]
                micro, idle = plan_micro_batches(batch_rows, micro_batch_size, loss)
                totals = BatchTotals(
                    sequences=len(batch_rows),
                    tokens=sum(_loss_tokens(r, loss) for r in batch_rows),
                    micro_batches=len(micro),
                )
                step_loss = torch.zeros((), device=model.device)
                share = deal(micro, rank, world, even=sharded) if micro else []
                for k, (chunk, counts) in enumerate(share):
                    with gradient_sync(policy.trainer, last=k == len(share) - 1):
                        batch = pack(
                            [r["prompt_token_ids"] for r in chunk],
                            [r["completion_token_ids"] for r in chunk],
                            pad_id,
                            model.device,
                        )
                        width = batch.completion_ids.shape[1]
                        logp, entropy = forward(
                            batch, loss.temperature, with_entropy=True, chunk_tokens=logprob_chunk_tokens or None
                        )  # (b, C)
                        stored = [r["old_logprobs"] for r in chunk]
                        old = logp.detach() if None in stored else _pad(stored, width, model.device)  # (b, C)
                        ref = _pad([r["ref_logprobs"] for r in chunk], width, model.device) if loss.beta > 0 else None
                        adv = torch.tensor(
                            [r["advantage"] for r in chunk], dtype=torch.float32, device=model.device
                        )  # (b,)
                        truncated = torch.tensor(
                            [r["finish_reason"] == "length" for r in chunk], device=model.device
                        )  # (b,)
                        mask = loss_mask(batch.completion_mask, truncated, loss)  # (b, C)
                        sampled = [r["sampler_logprobs"] for r in chunk]
                        sampler = None if None in sampled else _pad(sampled, width, model.device)  # (b, C)
                        mb_loss, mb = policy_loss(logp, old, adv, mask, ref, loss, totals, sampler)
                        # x world: DDP/FSDP2 average the ranks' gradients, the step needs their sum.
                        (mb_loss * (world if counts else 0.0)).backward()
                        if not counts:  # a rank without a micro-batch of its own: synchronisation only
                            continue
                        mismatch.add(mb)
                        step_loss += mb_loss.detach()
                        for key in ("tokens", "kl_sum", "clip_low", "clip_high", "clip_region", "clip_units"):
                            sums[key] += mb[key]
                        entropy_sum += (entropy * mask).sum()
                        sums["forwarded"] += len(chunk)
                        sums["forwarded_tokens"] += mb["tokens"]
                        sums["seen_tokens"] += sum(
                            len(r["prompt_token_ids"]) + len(r["completion_token_ids"]) for r in chunk
                        )
                        bar.advance(len(chunk))
                if (
                    idle and rank == 0
                ):  # their statistics as policy_loss would count them: their tokens, never clipped (A = 0 or no token)
                    sums["tokens"] += sum(_loss_tokens(r, loss) for r in idle)
                    sums["clip_units"] += _idle_units(idle, loss)
                    sums["idle_completions"] += len(idle)
                    bar.advance(len(idle))
                if not micro:
                    _zero_gradients(model)
                grad_norm = clip_gradients(model, max_grad_norm)
                if math.isfinite(grad_norm):
                    policy.optimizer.step()
                else:  # one bad batch must not turn every weight into NaN
                    skipped += 1
                policy.optimizer.zero_grad(set_to_none=True)
                step_losses.append(step_loss.item())
                grad_norms.append(grad_norm)
    model.eval()
    if gradient_checkpointing:
        set_activation_checkpointing(model, False)  # the live policy goes on to generate

    move_live_policy(policy_path, out_checkpoint)
    if save:
        weights = (
            full_state_dict(model, policy.trainer, sharded) if sharded else None
        )  # FSDP2: every rank takes part in the gather
        optimizer_state = full_optimizer_state(policy.trainer, policy.optimizer, sharded) if sharded else None
        if (
            rank == 0
            and background_save
            and world == 1
            and checkpoint_bytes(policy) >= tasks_model.BACKGROUND_SAVE_MIN_BYTES
        ):
            save_in_background(policy, out_checkpoint)
        elif rank == 0:
            save_checkpoint(policy, out_checkpoint, state_dict=weights, optimizer_state=optimizer_state)
    if world > 1:  # every rank's share of the sums (the idle completions' were counted on rank 0 only)
        sums = sum_over_ranks(sums | {"entropy_sum": entropy_sum.item()})
        entropy_sum = torch.tensor(sums.pop("entropy_sum"))
        losses = sum_over_ranks({f"{i:06d}": v for i, v in enumerate(step_losses)})
        step_losses = [losses[k] for k in sorted(losses)]
        mismatch.merge_ranks()
    seconds = time.perf_counter() - started
    tokens = max(sums["tokens"], 1.0)
    units = max(sums["clip_units"], 1.0)
    metrics = {
        "policy_loss": sum(step_losses) / len(step_losses) if step_losses else 0.0,
        # Over the completions that went through the model (with beta = 0, not those of zero
        # advantage); NaN when none did.
        "entropy": entropy_sum.item() / max(sums["forwarded_tokens"], 1.0) if sums["forwarded"] else math.nan,
        "clip_ratio/low_mean": sums["clip_low"] / units,
        "clip_ratio/high_mean": sums["clip_high"] / units,
        "clip_ratio/region_mean": sums["clip_region"] / units,
        "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else 0.0,
        "learning_rate": policy.optimizer.param_groups[0]["lr"],  # of the iteration's last step, as TRL logs it
    }
    if loss.beta > 0:
        metrics["kl"] = sums["kl_sum"] / tokens
    metrics |= mismatch.metrics()
    metrics |= completion_metrics(gens)
    metrics |= {
        "iteration_tokens": sum(len(g["prompt_token_ids"]) + len(g["completion_token_ids"]) for g in gens),
        "update/trained_completions": len(rows),
        "update/zero_gradient_completions": int(sums["idle_completions"]) // mu,  # never forwarded (plan_micro_batches)
        "update/optimizer_steps": len(step_losses),
        "update/skipped_steps": skipped,
        "update/tokens_per_second": sums["seen_tokens"] / seconds if seconds > 0 else 0.0,
        "update_seconds": seconds,
    }
    return metrics


def _worth_retrying(task_obj, task_run, state) -> bool:
    """A full disk fails the same way again (and a retry would redo the whole update); a failed
    background write of the previous checkpoint is reported, not hidden by a retry."""
    return not isinstance(state.result(raise_on_failure=False), (DiskFull, CheckpointNotSaved))


@dataclass(frozen=True)
class UpdateSettings(StageSettings):
    """`update_policy`'s settings that stay the same for every iteration of a run."""

    loss: LossSettings
    lr_schedule: LRSchedule | None = None
    mu: int = 1
    mini_batches: int = 1
    micro_batch_size: int = 32
    gradient_checkpointing: bool = False
    logprob_chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    lora: LoraSettings | None = None
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    background_save: bool = False
    device: str = "auto"
    dtype: str = "auto"


@dataclass(frozen=True)
class UpdateStep:
    """What changes from one iteration's update to the next."""

    learning_rate: float  # the base rate this update runs with (a replayed update keeps its own)
    first_step: int  # optimiser steps taken before this update: where the LR schedule stands
    save: bool  # write the checkpoint (save_every), or leave the weights in memory only
    seed: int  # the shuffling of micro-batches

    def keywords(self, settings: UpdateSettings) -> dict[str, Any]:
        """`update_policy`'s keyword arguments: the run's settings with this step's values."""
        schedule = None if settings.lr_schedule is None else replace(settings.lr_schedule, base=self.learning_rate)
        return settings.keywords() | {
            "learning_rate": self.learning_rate,
            "lr_schedule": schedule,
            "first_step": self.first_step,
            "save": self.save,
            "seed": self.seed,
        }


@task(name="update", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE, retry_condition_fn=_worth_retrying)
def update_task(
    generations_path: str | list[str],
    advantages_path: str,
    policy_path: str,
    out_checkpoint: str,
    settings: UpdateSettings,
    step: UpdateStep,
) -> dict:
    return update_policy(generations_path, advantages_path, policy_path, out_checkpoint, **step.keywords(settings))
