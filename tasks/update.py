"""Update stage: generations.parquet + advantages.parquet + policy -> new checkpoint.

Holds the policy and its optimiser only: the old-policy and reference log-probs come from
the generations artifact, so no second model is in memory here whatever beta is. The batch
is processed in micro-batches with gradient accumulation, so memory depends on the
micro-batch size, not on the number of prompts or the group size.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from data.schemas import ADVANTAGES, GENERATIONS
from data.store import read_table
from tasks.logprobs import completion_logprobs, pack
from tasks.model import live_policy, load_optimizer_state, move_live_policy, save_checkpoint
from tasks.objective import LossSettings, policy_loss
from tasks.progress import progress


class ArtifactMismatch(ValueError):
    pass


def load_training_rows(generations_path: str | Path, advantages_path: str | Path) -> list[dict]:
    """Generations joined with their advantages, in generation order; only kept rows."""
    gens = read_table(
        generations_path,
        GENERATIONS,
        columns=["prompt_id", "sample_index", "prompt_token_ids", "completion_token_ids", "old_logprobs", "ref_logprobs"],
    ).to_pylist()
    adv = read_table(advantages_path, ADVANTAGES, columns=["prompt_id", "sample_index", "advantage", "kept"]).to_pylist()
    by_key = {(a["prompt_id"], a["sample_index"]): a for a in adv}
    rows = []
    for g in gens:
        a = by_key.pop((g["prompt_id"], g["sample_index"]), None)
        if a is None:
            raise ArtifactMismatch(f"{advantages_path}: no row for prompt_id {g['prompt_id']} sample {g['sample_index']} of {generations_path}")
        if a["kept"]:
            rows.append(g | {"advantage": a["advantage"]})
    if by_key:
        pid, idx = next(iter(by_key))
        raise ArtifactMismatch(f"{advantages_path}: row prompt_id {pid} sample {idx} is not in {generations_path}")
    return rows


def _pad(values: list[list[float]], width: int, device) -> torch.Tensor:
    out = torch.zeros((len(values), width), dtype=torch.float32)
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.as_tensor(v, dtype=torch.float32)
    return out.to(device)


def update_policy(
    generations_path: str | Path,
    advantages_path: str | Path,
    policy_path: str,
    out_checkpoint: str | Path,
    *,
    learning_rate: float,
    loss: LossSettings,
    micro_batch_size: int = 32,
    max_grad_norm: float = 1.0,
    weight_decay: float = 0.0,
    save: bool = True,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """One optimiser step of the clipped GRPO objective over every kept completion."""
    started = time.perf_counter()
    policy = live_policy(policy_path, device, dtype)
    model = policy.model
    if policy.optimizer is None:
        # AdamW as in DeepSeekMath; state restored when the checkpoint carries it, so a
        # resumed run continues exactly.
        policy.optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
        load_optimizer_state(policy.optimizer, policy_path)
    for group in policy.optimizer.param_groups:
        group["lr"] = learning_rate
    policy.optimizer.zero_grad(set_to_none=True)  # a retried stage must not add to stale gradients

    rows = load_training_rows(generations_path, advantages_path)
    random.Random(seed).shuffle(rows)
    pad_id = policy.tokenizer.pad_token_id
    stats = {"loss": 0.0, "kl": 0.0, "clip_ratio": 0.0, "entropy": 0.0, "tokens": 0.0}
    model.train()
    with progress("update", total=len(rows)) as bar:
        for start in range(0, len(rows), micro_batch_size):
            chunk = rows[start : start + micro_batch_size]
            batch = pack([r["prompt_token_ids"] for r in chunk], [r["completion_token_ids"] for r in chunk], pad_id, model.device)
            width = batch.completion_ids.shape[1]
            logp, entropy = completion_logprobs(model, batch, loss.temperature, with_entropy=True)  # (b, C)
            old = _pad([r["old_logprobs"] for r in chunk], width, model.device)
            ref = None
            if loss.beta > 0:
                if chunk[0]["ref_logprobs"] is None:
                    raise ArtifactMismatch(f"{generations_path}: beta > 0 but the generations carry no reference log-probs")
                ref = _pad([r["ref_logprobs"] for r in chunk], width, model.device)
            adv = torch.tensor([r["advantage"] for r in chunk], dtype=torch.float32, device=model.device)
            mb_loss, mb = policy_loss(logp, old, adv, batch.completion_mask, ref, loss, num_sequences=len(rows))
            mb_loss.backward()
            mask = batch.completion_mask
            stats["loss"] += mb_loss.item()
            stats["tokens"] += mask.sum().item()
            stats["clip_ratio"] += (mb["clipped"] * mask).sum().item()
            stats["entropy"] += (entropy * mask).sum().item()
            if "kl" in mb:
                stats["kl"] += (mb["kl"] * mask).sum().item()
            bar.advance(len(chunk))
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm).item()
    policy.optimizer.step()
    policy.optimizer.zero_grad(set_to_none=True)
    model.eval()

    move_live_policy(policy_path, out_checkpoint)
    if save:
        save_checkpoint(policy, out_checkpoint)
    tokens = max(stats.pop("tokens"), 1.0)
    return {
        "policy_loss": stats["loss"],
        "kl": stats["kl"] / tokens,
        "clip_ratio": stats["clip_ratio"] / tokens,
        "entropy": stats["entropy"] / tokens,
        "grad_norm": grad_norm,
        "trained_completions": len(rows),
        "update_seconds": time.perf_counter() - started,
    }


@task(name="update", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def update_task(generations_path: str, advantages_path: str, policy_path: str, out_checkpoint: str, **settings) -> dict:
    return update_policy(generations_path, advantages_path, policy_path, out_checkpoint, **settings)
