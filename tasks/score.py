"""Score stage: generations.parquet + prompts.parquet -> rewards.parquet.

One ``reward/<fn>`` column per reward function, one ``error/<fn>`` column with the error
text of the rows it could not score (NaN reward there), and the weighted ``reward`` total
(NaN when any function failed on the row: the advantages stage leaves such rows out of
their group's baseline instead of pretending they scored 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa
from prefect import task

from data.schemas import GENERATIONS, PROMPTS, REWARDS
from data.store import read_table, write_table
from rewards import get_reward


class TooManyRewardErrors(RuntimeError):
    pass


def score_generations(
    generations_path: str | Path,
    prompts_path: str | Path,
    out_path: str | Path,
    rewards: Mapping[str, float],
    max_error_fraction: float = 0.05,
) -> dict[str, float]:
    """Score every completion with every reward in `rewards` (name -> weight)."""
    fns = {name: get_reward(name) for name in rewards}
    prompts = {row["prompt_id"]: row for row in read_table(prompts_path, PROMPTS).to_pylist()}
    gens = read_table(generations_path, GENERATIONS, columns=["prompt_id", "sample_index", "completion"])
    columns: dict[str, list] = {f"reward/{n}": [] for n in fns} | {f"error/{n}": [] for n in fns}
    totals = []
    for row in gens.to_pylist():
        example = prompts.get(row["prompt_id"])
        if example is None:
            raise KeyError(f"{generations_path}: prompt_id {row['prompt_id']} is not in {prompts_path}")
        total = 0.0
        for name, fn in fns.items():
            try:
                value, error = float(fn(row["completion"], example)), None
            except Exception as err:  # a reward bug must cost one row, not the whole stage
                value, error = math.nan, f"{type(err).__name__}: {err}"
            columns[f"reward/{name}"].append(value)
            columns[f"error/{name}"].append(error)
            total += rewards[name] * value
        totals.append(total)
    names = list(columns)
    table = pa.table(
        {"prompt_id": gens["prompt_id"], "sample_index": gens["sample_index"], "reward": pa.array(totals, pa.float64())}
        | {n: pa.array(columns[n], REWARDS._family_type(n)) for n in names},
        schema=REWARDS.with_family_columns(names),
    )
    errored = sum(math.isnan(t) for t in totals)
    if totals and errored / len(totals) > max_error_fraction:
        first = next(e for n in fns for e in columns[f"error/{n}"] if e)
        raise TooManyRewardErrors(
            f"{errored}/{len(totals)} rows could not be scored (limit {max_error_fraction:.0%}); first error: {first}"
        )
    write_table(table, out_path, REWARDS)
    finite = [t for t in totals if not math.isnan(t)]
    return {
        "rows": len(totals),
        "errored": errored,
        "reward_mean": sum(finite) / len(finite) if finite else math.nan,
    }


@task(name="score", retries=2, retry_delay_seconds=1)
def score_task(generations_path: str, prompts_path: str, out_path: str, rewards: dict[str, float], max_error_fraction: float) -> dict:
    return score_generations(generations_path, prompts_path, out_path, rewards, max_error_fraction)
