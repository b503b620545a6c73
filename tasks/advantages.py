"""Advantages stage: rewards.parquet -> advantages.parquet (group-relative baselines)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from data.schemas import ADVANTAGES, REWARDS
from data.store import read_table, write_table
from tasks.objective import group_advantages


def compute_advantages(rewards_path: str | Path, out_path: str | Path, *, eps: float = 1e-4) -> dict:
    """One row per completion: its group's mean and std, its advantage and whether the
    update uses it. Groups are the completions sharing a prompt_id."""
    table = read_table(rewards_path, REWARDS, columns=["prompt_id", "sample_index", "reward"])
    prompt_ids = table["prompt_id"].to_pylist()
    group_of: dict[str, int] = {}
    group_ids = torch.tensor([group_of.setdefault(p, len(group_of)) for p in prompt_ids], dtype=torch.long)
    rewards = torch.tensor(table["reward"].to_numpy(zero_copy_only=False), dtype=torch.float64)
    result = group_advantages(rewards, group_ids, eps)
    out = pa.table(
        {
            "prompt_id": table["prompt_id"],
            "sample_index": table["sample_index"],
            "reward": table["reward"],
            "group_mean": result.group_mean.numpy(),
            "group_std": result.group_std.numpy(),
            "advantage": result.advantage.float().numpy(),
            "kept": [True] * table.num_rows,
            "drop_reason": [None] * table.num_rows,
        },
        schema=ADVANTAGES.schema,
    )
    write_table(out, out_path, ADVANTAGES)
    zero_std_groups = set(group_ids[result.group_std == 0].tolist())
    return {
        "rows": table.num_rows,
        "groups": len(group_of),
        "frac_reward_zero_std": len(zero_std_groups) / max(len(group_of), 1),
    }


@task(name="advantages", cache_policy=NO_CACHE)
def advantages_task(rewards_path: str, out_path: str, eps: float) -> dict:
    return compute_advantages(rewards_path, out_path, eps=eps)
