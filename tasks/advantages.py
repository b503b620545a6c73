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

The rewards are streamed in chunks of whole groups (`data.store.iter_groups`: a group's
rows are adjacent, as generation writes them), and every metric is accumulated chunk by
chunk, so memory is one chunk whatever the file's size: re-scoring a million cached
generations stays flat. Only batch-level scaling keeps one float per row, for the one std
it divides every advantage by.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from data.schemas import ADVANTAGES, PROMPTS, REWARDS
from data.store import ParquetStreamWriter, RepeatedGroup, iter_groups, read_table, write_table
from tasks.objective import group_advantages, group_stats, resolve_scale
from tasks.stage_settings import StageSettings

ZERO_STD = "zero_std"  # every valid reward of the group is equal: all advantages are 0
BATCH_FULL = "batch_full"  # dynamic sampling already has enough groups with signal
CHUNK_ROWS = 8192  # rewards rows per chunk (rounded up to whole groups); larger chunks only cost memory


class DuplicateCompletion(ValueError):
    pass


def _as_list(paths: str | Path | Sequence[str | Path]) -> list[str | Path]:
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def reward_columns(rewards_paths: Sequence[str | Path]) -> list[str]:
    """The ``reward/<fn>`` columns, which every sampling round must share."""
    names = None
    for path in rewards_paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: rewards artifact not found")
        found = [n for n in pq.read_schema(path).names if n.startswith("reward/")]
        if names is not None and found != names:
            raise ValueError(f"{path}: reward columns {found} differ from the first round's {names}")
        names = found
    return names or []


def reward_groups(
    rewards_paths: str | Path | Sequence[str | Path], columns: list[str], chunk_rows: int = CHUNK_ROWS
) -> Iterator[pa.Table]:
    """The rewards of an iteration's sampling rounds, in round order, in chunks of whole
    groups. A completion in two rounds (its group twice) is a `DuplicateCompletion`."""
    paths = _as_list(rewards_paths)
    try:
        yield from iter_groups(paths, REWARDS, ["prompt_id", "sample_index", "reward", *columns], batch_rows=chunk_rows)
    except RepeatedGroup as err:
        if err.path == err.first_path:
            raise
        raise DuplicateCompletion(
            f"prompt_id {err.value} sample {err.sample} appears twice in {', '.join(map(str, paths))}"
        ) from None


def _group_ids(prompt_ids: list[str]) -> tuple[torch.Tensor, int]:
    group_of: dict[str, int] = {}
    ids = torch.tensor([group_of.setdefault(p, len(group_of)) for p in prompt_ids], dtype=torch.long)
    return ids, len(group_of)


def _rewards_tensor(table: pa.Table) -> torch.Tensor:
    return torch.tensor(table["reward"].to_numpy(zero_copy_only=False), dtype=torch.float64)  # (N,)


def informative_groups(rewards_paths: str | Path | Sequence[str | Path]) -> int:
    """Groups whose valid rewards are not all equal: those dynamic sampling keeps."""
    count = 0
    for table in reward_groups(rewards_paths, []):
        group_ids, num_groups = _group_ids(table["prompt_id"].to_pylist())
        stats = group_stats(_rewards_tensor(table), group_ids)
        zero = torch.zeros(num_groups, dtype=torch.bool).index_fill(0, group_ids[stats.zero_std], True)
        count += int((~zero).sum())
    return count


@dataclass
class _Moments:
    """Count, mean and sum of squared deviations of a stream of numbers (NaN left out),
    merged chunk by chunk (Chan et al.), for a mean and Bessel std without keeping them."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, values: np.ndarray) -> None:
        values = values[~np.isnan(values)]
        if values.size == 0:
            return
        mean = float(values.mean())
        m2 = float(((values - mean) ** 2).sum())
        total = self.n + values.size
        delta = mean - self.mean
        self.mean += delta * values.size / total
        self.m2 += m2 + delta * delta * self.n * values.size / total
        self.n = total

    def mean_std(self) -> tuple[float, float]:
        if self.n == 0:
            return math.nan, math.nan
        return self.mean, math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0


@dataclass
class _Totals:
    rows: int = 0
    groups: int = 0
    zero_std_groups: int = 0
    dropped_groups: int = 0
    kept_completions: int = 0
    nan_rows: int = 0
    shown_std_sum: float = 0.0  # over rows: the std each row's advantage was divided by (TRL's reward_std)
    abs_advantage_sum: float = 0.0
    reward: _Moments = field(default_factory=_Moments)
    per_function: dict[str, _Moments] = field(default_factory=dict)


def _batch_std(rewards_paths, chunk_rows: int) -> float:
    """One std (Bessel) over every valid reward of the iteration, as `tasks.objective.
    scale_batch` computes it (the same torch call, so the numbers are the same)."""
    valid = [t["reward"].to_numpy(zero_copy_only=False) for t in reward_groups(rewards_paths, [], chunk_rows)]
    r = torch.tensor(np.concatenate(valid) if valid else np.zeros(0), dtype=torch.float64)
    r = r[~torch.isnan(r)]
    return float(r.std()) if r.numel() > 1 else 0.0


def compute_advantages(
    rewards_paths: str | Path | Sequence[str | Path],
    out_path: str | Path,
    *,
    estimator: str = "grpo",
    scale_rewards: str | None = None,
    eps: float = 1e-4,
    dynamic_sampling: bool = False,
    target_groups: int | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> dict:
    """Write the advantages artifact for the rewards of one iteration (all its sampling
    rounds); return the iteration's reward and advantage metrics (names as TRL logs them).

    `target_groups` (with `dynamic_sampling`): keep at most this many groups with signal.
    """
    scale = resolve_scale(estimator, scale_rewards)
    paths = _as_list(rewards_paths)
    functions = reward_columns(paths)
    # Batch scaling divides by one std over the whole iteration: known only after a first
    # pass. Every other scaling is per group, so one pass over group chunks does it all.
    batch_std = _batch_std(paths, chunk_rows) if scale == "batch" else None
    totals = _Totals(per_function={c: _Moments() for c in functions})
    informative = 0  # groups with signal kept so far, in sampling order (dynamic sampling)
    with ParquetStreamWriter(out_path, ADVANTAGES) as out:
        for table in reward_groups(paths, functions, chunk_rows):
            group_ids, num_groups = _group_ids(table["prompt_id"].to_pylist())
            rewards = _rewards_tensor(table)
            if batch_std is None:
                result = group_advantages(rewards, group_ids, estimator, scale, eps)
                shown_std = result.group_std
            else:
                # The group-centred advantage (zero where the group has no signal) over the
                # iteration's std: scale_batch's arithmetic with the std of every chunk.
                result = group_advantages(rewards, group_ids, estimator, "none", eps)
                result = dataclasses.replace(result, advantage=result.advantage / (batch_std + eps))
                shown_std = torch.full_like(result.group_std, batch_std)

            group_zero = torch.zeros(num_groups, dtype=torch.bool).index_fill(
                0, group_ids[result.zero_std], True
            )  # (G,)
            group_reason: list[str | None] = [None] * num_groups
            if dynamic_sampling:
                for g in range(num_groups):  # groups are numbered in sampling order
                    if group_zero[g]:
                        group_reason[g] = ZERO_STD
                    elif target_groups is not None and informative >= target_groups:
                        group_reason[g] = BATCH_FULL
                    else:
                        informative += 1
            reasons = [group_reason[g] for g in group_ids.tolist()]
            kept = [r is None for r in reasons]
            out.write(
                pa.table(
                    {
                        "prompt_id": table["prompt_id"],
                        "sample_index": table["sample_index"],
                        "reward": table["reward"],
                        "group_mean": result.group_mean.numpy(),
                        "group_std": result.group_std.numpy(),
                        "advantage": result.advantage.float().numpy(),
                        "kept": kept,
                        "drop_reason": pa.array(reasons, pa.string()),
                    },
                    schema=ADVANTAGES.schema,
                )
            )
            totals.rows += table.num_rows
            totals.groups += num_groups
            totals.zero_std_groups += int(group_zero.sum())
            totals.dropped_groups += sum(r is not None for r in group_reason)
            totals.kept_completions += sum(kept)
            totals.nan_rows += int((~result.valid).sum())
            totals.shown_std_sum += float(shown_std.sum())
            totals.abs_advantage_sum += float(result.advantage.abs().sum())
            totals.reward.add(rewards.numpy())
            for column, moments in totals.per_function.items():
                moments.add(table[column].to_numpy(zero_copy_only=False).astype(np.float64))

    n, groups = totals.rows, totals.groups
    metrics: dict = {
        "reward": totals.reward.mean_std()[0],
        "reward_std": totals.shown_std_sum / n if n else math.nan,
        "frac_reward_zero_std": totals.zero_std_groups / groups if groups else 0.0,
        "rewards/nan_count": totals.nan_rows,
    }
    for column, moments in totals.per_function.items():
        mean, std = moments.mean_std()
        metrics[f"rewards/{column.removeprefix('reward/')}/mean"] = mean
        metrics[f"rewards/{column.removeprefix('reward/')}/std"] = std
    metrics |= {
        "advantages/abs_mean": totals.abs_advantage_sum / n if n else 0.0,
        "dynamic_sampling/groups": groups,
        "dynamic_sampling/kept_groups": groups - totals.dropped_groups,
        "dynamic_sampling/frac_dropped": totals.dropped_groups / groups if groups else 0.0,
        "dynamic_sampling/kept_completions": totals.kept_completions,
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
    used = {
        pid for p in exclude_paths for pid in read_table(p, PROMPTS, columns=["prompt_id"])["prompt_id"].to_pylist()
    }
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


@dataclass(frozen=True)
class AdvantageSettings(StageSettings):
    """`compute_advantages`' settings, the same for every iteration of a run."""

    estimator: str = "grpo"
    scale_rewards: str | None = None
    eps: float = 1e-4
    dynamic_sampling: bool = False
    target_groups: int | None = None


@task(name="advantages", cache_policy=NO_CACHE)
def advantages_task(rewards_paths: str | list[str], out_path: str, settings: AdvantageSettings) -> dict:
    return compute_advantages(rewards_paths, out_path, **settings.keywords())


@task(name="refill-prompts", cache_policy=NO_CACHE)
def refill_prompts_task(dataset_path: str, out_path: str, exclude_paths: list[str], count: int, seed: str) -> dict:
    return refill_prompts(dataset_path, out_path, exclude_paths=exclude_paths, count=count, seed=seed)
