"""Choose the prompts of one iteration from the ingested dataset.

Iterations walk through the dataset in seeded epochs: each epoch is a fresh permutation, and
iteration k takes the next `n` prompts of it, so every prompt is used once per epoch and a
run is reproducible from its seed.

Several datasets mixed with weights (`mix`, by ``data_source``): the run's prompt slots are
dealt out one by one to the source furthest below its weighted share (`mix_counts`), so after
any number of iterations each source has given its share to within one prompt, and each
source walks its own seeded epochs. Both depend on the iteration number only, so a resumed
run picks the same prompts.
"""

from __future__ import annotations

import functools
import random
from array import array
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from data.errors import UserError
from data.schemas import PROMPTS
from data.store import read_table, write_table


@functools.lru_cache(maxsize=4)
def epoch_order(size: int, seed: int | str, epoch: int) -> array:
    """The seeded permutation of one epoch. Cached: each iteration takes a few prompts of it,
    and shuffling the whole dataset again for each one cost 28 ms per iteration at 7,600
    prompts (a third of the tiny benchmark's select stage), O(dataset) in general. An array,
    not a list: 8 bytes per prompt held."""
    order = list(range(size))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return array("q", order)


def _walk(size: int, first: int, count: int, seed) -> list[int]:
    """Positions first..first+count of the seeded epochs over `size` rows."""
    orders: dict[int, list[int]] = {}
    picks = []
    for position in range(first, first + count):
        epoch, offset = divmod(position, size)
        if epoch not in orders:
            orders[epoch] = epoch_order(size, seed, epoch)
        picks.append(orders[epoch][offset])
    return picks


def mix_counts(weights: list[float], slots: int) -> list[int]:
    """How many of the first `slots` prompt slots each source gets: slot by slot, to the
    source with the largest deficit against its share (ties: the first). Each count stays
    within one of slots x weight / sum(weights), and a count never decreases as slots grow."""
    total = sum(weights)
    shares = [w / total for w in weights]
    given = [0] * len(weights)
    for slot in range(slots):
        deficits = [(slot + 1) * share - g for share, g in zip(shares, given, strict=True)]
        given[deficits.index(max(deficits))] += 1
    return given


def select_prompts(
    dataset_path: str | Path,
    out_path: str | Path,
    *,
    iteration: int,
    per_iteration: int,
    seed: int,
    mix: list[tuple[str, float]] | None = None,
) -> dict:
    """Write the `per_iteration` prompts of `iteration` (1-based) to `out_path`; with `mix`
    ((data_source, weight) pairs) drawn from each source in proportion to its weight."""
    table = read_table(dataset_path, PROMPTS)
    size = table.num_rows
    if size == 0:
        raise UserError(f"{dataset_path}: the dataset has no prompts")
    first = (iteration - 1) * per_iteration
    if not mix:
        write_table(table.take(_walk(size, first, per_iteration, seed)), out_path, PROMPTS)
        return {"prompts": per_iteration, "epoch": first // size}
    sources = table.column("data_source").to_pylist()
    before, after = mix_counts([w for _, w in mix], first), mix_counts([w for _, w in mix], first + per_iteration)
    picks, summary = [], {"prompts": per_iteration}
    for k, (label, _) in enumerate(mix):
        rows = [i for i, s in enumerate(sources) if s == label]
        if not rows:
            raise UserError(
                f"{dataset_path}: no prompts from '{label}', one of the mixed datasets "
                f"(found: {', '.join(sorted(set(sources)))})"
            )
        picks += [rows[i] for i in _walk(len(rows), before[k], after[k] - before[k], f"{seed}:{label}")]
        summary[f"mix/{k}"] = after[k] - before[k]
    write_table(table.take(picks), out_path, PROMPTS)
    return summary


@task(name="select-prompts", cache_policy=NO_CACHE)
def select_prompts_task(
    dataset_path: str, out_path: str, iteration: int, per_iteration: int, seed: int, mix: list[tuple[str, float]] | None
) -> dict:
    return select_prompts(dataset_path, out_path, iteration=iteration, per_iteration=per_iteration, seed=seed, mix=mix)
