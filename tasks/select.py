"""Choose the prompts of one iteration from the ingested dataset.

Iterations walk through the dataset in seeded epochs: each epoch is a fresh permutation, and
iteration k takes the next `n` prompts of it, so every prompt is used once per epoch and a
run is reproducible from its seed.
"""

from __future__ import annotations

import random
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from data.schemas import PROMPTS
from data.store import read_table, write_table


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    order = list(range(size))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def select_prompts(dataset_path: str | Path, out_path: str | Path, *, iteration: int, per_iteration: int, seed: int) -> dict:
    """Write the `per_iteration` prompts of `iteration` (1-based) to `out_path`."""
    table = read_table(dataset_path, PROMPTS)
    size = table.num_rows
    if size == 0:
        raise ValueError(f"{dataset_path}: the dataset has no prompts")
    first = (iteration - 1) * per_iteration
    orders: dict[int, list[int]] = {}
    picks = []
    for position in range(first, first + per_iteration):
        epoch, offset = divmod(position, size)
        if epoch not in orders:
            orders[epoch] = epoch_order(size, seed, epoch)
        picks.append(orders[epoch][offset])
    write_table(table.take(picks), out_path, PROMPTS)
    return {"prompts": len(picks), "epoch": first // size}


@task(name="select-prompts", cache_policy=NO_CACHE)
def select_prompts_task(dataset_path: str, out_path: str, **settings) -> dict:
    return select_prompts(dataset_path, out_path, **settings)
