"""Advantages stage: rewards.parquet -> advantages.parquet (group-relative baselines).

The rewards are streamed in chunks of whole groups (`data.store.iter_groups`): a group's
statistics need only its own rows, so memory is one chunk whatever the file's size, and
re-scoring a million cached generations stays flat.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from data.schemas import ADVANTAGES, REWARDS
from data.store import ParquetStreamWriter, iter_groups
from tasks.objective import group_advantages

CHUNK_ROWS = 65_536  # rewards rows per chunk (rounded up to whole groups)


def compute_advantages(rewards_path: str | Path, out_path: str | Path, *, eps: float = 1e-4, chunk_rows: int = CHUNK_ROWS) -> dict:
    """One row per completion: its group's mean and std, its advantage and whether the
    update uses it. Groups are the completions sharing a prompt_id (adjacent rows)."""
    rows = groups = zero_std_groups = 0
    with ParquetStreamWriter(out_path, ADVANTAGES) as out:
        for table in iter_groups(rewards_path, REWARDS, ["prompt_id", "sample_index", "reward"], batch_rows=chunk_rows):
            prompt_ids = table["prompt_id"].to_pylist()
            group_of: dict[str, int] = {}
            group_ids = torch.tensor([group_of.setdefault(p, len(group_of)) for p in prompt_ids], dtype=torch.long)
            rewards = torch.tensor(table["reward"].to_numpy(zero_copy_only=False), dtype=torch.float64)
            result = group_advantages(rewards, group_ids, eps)
            out.write(
                pa.table(
                    {
                        "prompt_id": table["prompt_id"],
                        "sample_index": table["sample_index"],
                        "reward": table["reward"],
                        "group_mean": result.group_mean.numpy(),
                        "group_std": result.group_std.numpy(),
                        "advantage": result.advantage.float().numpy(),
                        "kept": [True] * table.num_rows,
                        "drop_reason": pa.nulls(table.num_rows, pa.string()),
                    },
                    schema=ADVANTAGES.schema,
                )
            )
            rows += table.num_rows
            groups += len(group_of)
            zero_std_groups += len(set(group_ids[result.group_std == 0].tolist()))
    return {
        "rows": rows,
        "groups": groups,
        "frac_reward_zero_std": zero_std_groups / max(groups, 1),
    }


@task(name="advantages", cache_policy=NO_CACHE)
def advantages_task(rewards_path: str, out_path: str, eps: float) -> dict:
    return compute_advantages(rewards_path, out_path, eps=eps)
