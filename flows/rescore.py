"""`grpo rescore`: the score and advantages stages again, over generations already on disk.

    grpo rescore runs/exp1 --rewards '{"math": 1.0, "format": 0.1}' --tag fixed-math
    grpo rescore runs/exp1/iter-0003/generations.parquet --tag v2

For every iteration (or the one generations file given) it writes, beside the originals,

    rewards@<tag>.parquet      the score stage with the new rewards
    advantages@<tag>.parquet   the advantages stage on them (the run's advantage settings)

and compares them with the original ``rewards.parquet``: mean reward before and after, how
many rows changed, and a few of them. No model is loaded: scoring needs only the
completions' text and the prompts' gold fields.

An existing tag is never overwritten: re-using one fails, unless its manifest entry says it
was made with the same rewards (then the re-scoring was interrupted and simply goes on,
done stages skipped, like a training run). Every file is streamed in chunks, so memory
stays flat however many generations there are.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data.schemas import ADVANTAGES, GENERATIONS, REWARDS, check_schema
from data.store import Manifest, iter_aligned, iter_batches, remove_stale_temp_files
from flows.config import GRPOConfig
from flows.resume import iteration_numbers
from flows.train import run_stage
from rewards import get_reward
from tasks.advantages import advantages_task
from tasks.score import score_task

TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
EXAMPLES = 5  # changed rows shown in the comparison
CHUNK_ROWS = 65_536


class TagInUse(ValueError):
    """rewards@TAG.parquet exists from another re-scoring: it is never overwritten."""


@dataclass(frozen=True)
class Target:
    folder: Path
    generations: Path
    prompts: Path

    def outputs(self, tag: str) -> tuple[str, str]:
        return f"rewards@{tag}.parquet", f"advantages@{tag}.parquet"


def find_targets(path: str | Path) -> list[Target]:
    """Every iteration's generations in a run folder, or the one generations file given
    (its prompts are the prompts.parquet beside it)."""
    path = Path(path)
    if path.is_dir():
        files = [path / f"iter-{it:04d}" / "generations.parquet" for it in iteration_numbers(path)]
        files = [f for f in files if f.is_file()]
        if not files:
            raise FileNotFoundError(f"{path}: no iter-*/generations.parquet to re-score")
    elif path.is_file():
        check_schema(pq.read_schema(path), GENERATIONS, path)  # a rewards file given by mistake fails here
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such run folder or generations file")
    targets = []
    for f in files:
        prompts = f.parent / "prompts.parquet"
        if not prompts.is_file():
            raise FileNotFoundError(f"{prompts}: the prompts of {f} (gold answers, tests) are needed to score it")
        targets.append(Target(f.parent, f, prompts))
    return targets


def run_config(folder: Path) -> GRPOConfig | None:
    """The config of the run `folder` belongs to (config.json in it or a parent), if any."""
    for candidate in (folder, *folder.parents):
        path = candidate / "config.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            return GRPOConfig.model_validate(saved.get("config", saved))
    return None


def default_tag() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def check_tag(targets: list[Target], tag: str, rewards: dict[str, float]) -> None:
    """Fail before any work if the tag is malformed or names another re-scoring's files."""
    if not TAG.fullmatch(tag):
        raise ValueError(f"tag '{tag}': use letters, digits, '.', '_' or '-' (at most 64, not starting with a symbol)")
    for t in targets:
        entries = Manifest(t.folder).entries()
        for name in t.outputs(tag):
            if not (t.folder / name).exists() and name not in entries:
                continue
            same = entries.get(name, {}).get("rescore", {}).get("rewards") == rewards
            if not same:
                raise TagInUse(f"{t.folder / name} already exists (re-scoring never overwrites): choose another --tag")


# --- the comparison ----------------------------------------------------------------------------
def compare_rewards(before: str | Path | None, after: str | Path, generations: str | Path, *, examples: int = EXAMPLES,
                    chunk_rows: int = CHUNK_ROWS) -> dict[str, Any]:
    """Mean reward before and after, the number of rows whose total reward changed (NaN to
    NaN is no change), and the first `examples` of them with their completions. The files
    are read side by side in chunks; their rows must be the same completions in the same
    order (both were scored from `generations`)."""
    after = Path(after)
    keys = ["prompt_id", "sample_index", "reward"]
    streams = [iter_batches(after, REWARDS, batch_size=chunk_rows, columns=keys)]
    if before is not None:
        streams.insert(0, iter_batches(before, REWARDS, batch_size=chunk_rows, columns=keys))
    totals = {"before": [0.0, 0], "after": [0.0, 0]}
    rows = changed = 0
    shown: list[dict[str, Any]] = []
    for chunk in iter_aligned(*streams):
        new = chunk[-1]
        b = new["reward"].to_numpy(zero_copy_only=False)
        _accumulate(totals["after"], b)
        if before is not None:
            old = chunk[0]
            if not (old["prompt_id"].equals(new["prompt_id"]) and old["sample_index"].equals(new["sample_index"])):
                raise ValueError(f"{before} and {after}: rows {rows}..{rows + old.num_rows - 1} are not the same completions")
            a = old["reward"].to_numpy(zero_copy_only=False)
            _accumulate(totals["before"], a)
            differs = ~((a == b) | (np.isnan(a) & np.isnan(b)))
            changed += int(differs.sum())
            for i in np.flatnonzero(differs)[: max(examples - len(shown), 0)]:
                shown.append({"prompt_id": old["prompt_id"][i].as_py(), "sample_index": old["sample_index"][i].as_py(),
                              "before": float(a[i]), "after": float(b[i])})
        rows += new.num_rows
    if shown:
        texts = pq.read_table(generations, columns=["prompt_id", "sample_index", "completion"],
                              filters=[("prompt_id", "in", sorted({s["prompt_id"] for s in shown}))]).to_pylist()
        completion = {(r["prompt_id"], r["sample_index"]): r["completion"] for r in texts}
        for s in shown:
            s["completion"] = completion.get((s["prompt_id"], s["sample_index"]))
    mean = {k: (s / n if n else math.nan) for k, (s, n) in totals.items()}
    return {
        "before": None if before is None else Path(before).name,
        "after": after.name,
        "rows": rows,
        "mean_before": mean["before"] if before is not None else None,
        "mean_after": mean["after"],
        "changed": changed if before is not None else None,
        "examples": shown,
    }


def _accumulate(total: list, values: np.ndarray) -> None:
    finite = values[~np.isnan(values)]
    total[0] += float(finite.sum())
    total[1] += int(finite.size)


def format_comparison(folder: Path, c: dict[str, Any]) -> str:
    """Lines a person reads: where, before -> after, how many changed, a few of them."""
    where = f"{folder.parent.name}/{folder.name}" if folder.name.startswith("iter-") else str(folder)
    if c["before"] is None:
        return f"{where}: {c['after']}: mean reward {c['mean_after']:.4f} over {c['rows']} rows (no earlier rewards.parquet to compare with)"
    lines = [f"{where}: mean reward {c['mean_before']:.4f} -> {c['mean_after']:.4f} ({c['after']}); "
             f"{c['changed']} of {c['rows']} rows changed"]
    for e in c["examples"]:
        text = (e.get("completion") or "").replace("\n", " ")
        text = text if len(text) <= 70 else text[:69] + "…"
        lines.append(f"    {e['prompt_id']} #{e['sample_index']}: {e['before']:.3g} -> {e['after']:.3g}  {text!r}")
    return "\n".join(lines)


@task(name="compare-rewards", cache_policy=NO_CACHE)
def compare_task(before: str | None, after: str, generations: str) -> dict:
    return compare_rewards(before, after, generations)


# --- the flow ---------------------------------------------------------------------------------
def advantages_arguments(config: GRPOConfig | None, rewards_path: str, out_path: str) -> tuple[tuple, dict]:
    """The advantages stage's arguments, with the run's own settings: the same call as in
    flows/train.py, so a re-scoring's advantages are what training would have used."""
    eps = config.advantage_eps if config is not None else GRPOConfig.model_fields["advantage_eps"].default
    return (rewards_path, out_path, eps), {}


@flow(name="grpo-rescore")
def grpo_rescore(target: str, tag: str, rewards: dict[str, float] | None = None, max_error_fraction: float | None = None) -> list[dict]:
    """Re-score `target` (a run folder or a generations file) as `tag`; return one
    comparison per generations file."""
    log = get_run_logger()
    targets = find_targets(target)
    config = run_config(targets[0].folder)
    if rewards is None:
        if config is None:
            raise ValueError(f"{target}: not in a run folder with a config.json, so give the rewards to score with (--rewards)")
        rewards = dict(config.rewards)
    for name in rewards:
        get_reward(name)  # an unknown reward fails here, before any file is touched
    if max_error_fraction is None:
        max_error_fraction = config.max_reward_error_fraction if config is not None else GRPOConfig.model_fields["max_reward_error_fraction"].default
    check_tag(targets, tag, rewards)

    results = []
    for t in targets:
        remove_stale_temp_files(t.folder)
        manifest = Manifest(t.folder)
        rewards_name, advantages_name = t.outputs(tag)
        rewards_out, advantages_out = str(t.folder / rewards_name), str(t.folder / advantages_name)
        recorded = {"rescore": {"tag": tag, "rewards": rewards}}
        run_stage(manifest, rewards_name, score_task, str(t.generations), str(t.prompts), rewards_out, rewards, max_error_fraction,
                  schema_version=REWARDS.version, manifest_extra=recorded)
        args, kwargs = advantages_arguments(config, rewards_out, advantages_out)
        run_stage(manifest, advantages_name, advantages_task, *args, **kwargs, schema_version=ADVANTAGES.version, manifest_extra=recorded)
        before = t.folder / "rewards.parquet"
        comparison = compare_task(str(before) if before.is_file() else None, rewards_out, str(t.generations))
        log.info(format_comparison(t.folder, comparison).splitlines()[0])
        results.append({"folder": str(t.folder), **comparison})
    return results
