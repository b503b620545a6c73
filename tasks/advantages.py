"""Advantages stage: rewards.parquet (one file per sampling round) -> advantages.parquet.

One row per completion, every completion kept in the file: its group's mean and std, its
advantage (see `tasks.objective.group_advantages` and docs/objective.md), and whether the
update uses it (`kept`, with `drop_reason` when not). Groups are the completions sharing a
prompt_id.

Dynamic sampling (DAPO, arXiv:2503.14476 sec. 3.2): with `dynamic_sampling` the groups
whose valid rewards are all equal (no learning signal: every advantage is 0) are dropped
(`drop_reason` "zero_std"). The flow may then sample extra rounds of prompts
(`refill_prompts`, `informative_groups`) until `target_groups` groups with signal are
available; groups beyond the target are dropped ("batch_full"), in sampling order, so the
update always sees at most the configured batch, as in DAPO.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from data.schemas import ADVANTAGES, PROMPTS, REWARDS
from data.store import read_table, write_table
from tasks.objective import group_advantages, group_stats, resolve_scale

ZERO_STD = "zero_std"  # every valid reward of the group is equal: all advantages are 0
BATCH_FULL = "batch_full"  # dynamic sampling already has enough groups with signal


class DuplicateCompletion(ValueError):
    pass


def _as_list(paths: str | Path | Sequence[str | Path]) -> list[str | Path]:
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def read_rewards(rewards_paths: str | Path | Sequence[str | Path]) -> pa.Table:
    """The rewards files of an iteration's sampling rounds, concatenated in round order."""
    tables = [read_table(p, REWARDS) for p in _as_list(rewards_paths)]
    names = tables[0].column_names
    for t, p in zip(tables[1:], _as_list(rewards_paths)[1:]):
        if t.column_names != names:
            raise ValueError(f"{p}: reward columns {t.column_names} differ from the first round's {names}")
    table = pa.concat_tables(tables)
    keys = list(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist()))
    if len(set(keys)) != len(keys):
        seen: set = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise DuplicateCompletion(f"prompt_id {dup[0]} sample {dup[1]} appears twice in {', '.join(map(str, _as_list(rewards_paths)))}")
    return table


def _group_ids(prompt_ids: list[str]) -> tuple[torch.Tensor, int]:
    group_of: dict[str, int] = {}
    ids = torch.tensor([group_of.setdefault(p, len(group_of)) for p in prompt_ids], dtype=torch.long)
    return ids, len(group_of)


def informative_groups(rewards_paths: str | Path | Sequence[str | Path]) -> int:
    """Groups whose valid rewards are not all equal: those dynamic sampling keeps."""
    table = read_rewards(rewards_paths)
    if table.num_rows == 0:
        return 0
    group_ids, num_groups = _group_ids(table["prompt_id"].to_pylist())
    stats = group_stats(torch.tensor(table["reward"].to_numpy(zero_copy_only=False), dtype=torch.float64), group_ids)
    zero = torch.zeros(num_groups, dtype=torch.bool).index_fill(0, group_ids[stats.zero_std], True)
    return int((~zero).sum())


def _nan_mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else 0.0
    return mean, std


def compute_advantages(
    rewards_paths: str | Path | Sequence[str | Path],
    out_path: str | Path,
    *,
    estimator: str = "grpo",
    scale_rewards: str | None = None,
    eps: float = 1e-4,
    dynamic_sampling: bool = False,
    target_groups: int | None = None,
) -> dict:
    """Write the advantages artifact for the rewards of one iteration (all its sampling
    rounds); return the iteration's reward and advantage metrics (names as TRL logs them).

    `target_groups` (with `dynamic_sampling`): keep at most this many groups with signal.
    """
    scale = resolve_scale(estimator, scale_rewards)
    table = read_rewards(rewards_paths)
    n = table.num_rows
    prompt_ids = table["prompt_id"].to_pylist()
    group_ids, num_groups = _group_ids(prompt_ids)
    rewards = torch.tensor(table["reward"].to_numpy(zero_copy_only=False), dtype=torch.float64)  # (N,)
    result = group_advantages(rewards, group_ids, estimator, scale, eps)

    group_zero = torch.zeros(num_groups, dtype=torch.bool).index_fill(0, group_ids[result.zero_std], True)  # (G,)
    group_reason: list[str | None] = [None] * num_groups
    if dynamic_sampling:
        informative = 0
        for g in range(num_groups):  # groups are numbered in sampling order
            if group_zero[g]:
                group_reason[g] = ZERO_STD
            elif target_groups is not None and informative >= target_groups:
                group_reason[g] = BATCH_FULL
            else:
                informative += 1
    reasons = [group_reason[g] for g in group_ids.tolist()]

    out = pa.table(
        {
            "prompt_id": table["prompt_id"],
            "sample_index": table["sample_index"],
            "reward": table["reward"],
            "group_mean": result.group_mean.numpy(),
            "group_std": result.group_std.numpy(),
            "advantage": result.advantage.float().numpy(),
            "kept": [r is None for r in reasons],
            "drop_reason": reasons,
        },
        schema=ADVANTAGES.schema,
    )
    write_table(out, out_path, ADVANTAGES)

    valid = result.valid
    shown_std = result.group_std if scale != "batch" else torch.full_like(result.group_std, float(rewards[valid].std()) if int(valid.sum()) > 1 else 0.0)
    dropped = sum(r is not None for r in group_reason)
    metrics: dict = {
        "reward": float(rewards[valid].mean()) if bool(valid.any()) else math.nan,
        "reward_std": float(shown_std.mean()) if n else math.nan,
        "frac_reward_zero_std": float(group_zero.double().mean()) if num_groups else 0.0,
        "rewards/nan_count": int((~valid).sum()),
    }
    for column in table.column_names:
        if column.startswith("reward/"):
            mean, std = _nan_mean_std(table[column].to_pylist())
            metrics[f"rewards/{column.removeprefix('reward/')}/mean"] = mean
            metrics[f"rewards/{column.removeprefix('reward/')}/std"] = std
    metrics |= {
        "advantages/abs_mean": float(result.advantage.abs().mean()) if n else 0.0,
        "dynamic_sampling/groups": num_groups,
        "dynamic_sampling/kept_groups": num_groups - dropped,
        "dynamic_sampling/frac_dropped": dropped / num_groups if num_groups else 0.0,
        "dynamic_sampling/kept_completions": int(pc.sum(out["kept"].cast(pa.int64())).as_py() or 0),
    }
    return metrics


def refill_prompts(
    dataset_path: str | Path,
    out_path: str | Path,
    *,
    exclude_paths: Sequence[str | Path],
    count: int,
    seed: int | str,
) -> dict:
    """Dynamic sampling's next round: up to `count` dataset prompts not among the prompts of
    `exclude_paths` (the iteration's earlier rounds), in a permutation fixed by `seed`.

    Excluding earlier rounds keeps (prompt_id, sample_index) unique within an iteration, so
    a group is never split across rounds. Fewer than `count` when the dataset runs out.
    """
    table = read_table(dataset_path, PROMPTS)
    used = {pid for p in exclude_paths for pid in read_table(p, PROMPTS, columns=["prompt_id"])["prompt_id"].to_pylist()}
    order = list(range(table.num_rows))
    random.Random(f"refill:{seed}").shuffle(order)
    ids = table["prompt_id"].to_pylist()
    picks, seen = [], set(used)
    for i in order:
        if len(picks) == count:
            break
        if ids[i] not in seen:  # a dataset may hold the same problem twice
            seen.add(ids[i])
            picks.append(i)
    write_table(table.take(pa.array(picks, type=pa.int64())), out_path, PROMPTS)
    return {"prompts": len(picks)}


@task(name="advantages", cache_policy=NO_CACHE)
def advantages_task(rewards_paths: str | list[str], out_path: str, **settings) -> dict:
    return compute_advantages(rewards_paths, out_path, **settings)


@task(name="refill-prompts", cache_policy=NO_CACHE)
def refill_prompts_task(dataset_path: str, out_path: str, **settings) -> dict:
    return refill_prompts(dataset_path, out_path, **settings)
