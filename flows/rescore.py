"""`grpo rescore`: the score and advantages stages again, over generations already on disk.

    grpo rescore runs/exp1 --rewards '{"math": 1.0, "format": 0.1}' --tag fixed-math
    grpo rescore runs/exp1/iter-0003/generations.parquet --tag v2

For every iteration (or the iteration of the generations file given) it writes, beside
the originals,

    rewards@<tag>.parquet      the score stage with the new rewards (and rewards-r<k>@<tag>
                               for the extra sampling rounds of dynamic sampling, if any)
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

from data.errors import UserError
from data.run_folder import iteration_numbers
from data.schemas import ADVANTAGES, GENERATIONS, REWARDS, check_schema
from data.store import Manifest, iter_aligned, iter_batches, read_rows_where, remove_stale_temp_files
from flows.config import GRPOConfig
from flows.observe.state import STATE_FILE
from flows.observe.tracking import log_rescoring
from flows.runner import StageRunner
from flows.settings import advantage_settings, score_settings
from flows.stopping import take_over_sigterm
from tasks.advantages import advantages_task
from tasks.score import score_task

TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
EXAMPLES = 5  # changed rows shown in the comparison
CHUNK_ROWS = 8192  # rows compared at a time; larger chunks only raise the memory high-water mark


class TagInUse(UserError):
    """rewards@TAG.parquet exists from another re-scoring: it is never overwritten."""


ROUND_FILE = re.compile(r"generations(-r\d+)?\.parquet")


@dataclass(frozen=True)
class Round:
    """One sampling round of an iteration: its generations and the prompts they answer."""

    generations: Path
    prompts: Path

    def rewards_name(self, tag: str | None = None) -> str:
        """rewards.parquet / rewards-r2.parquet, or with @tag before the suffix."""
        stem = self.generations.name.removesuffix(".parquet").replace("generations", "rewards", 1)
        return f"{stem}@{tag}.parquet" if tag else f"{stem}.parquet"


@dataclass(frozen=True)
class Target:
    folder: Path
    rounds: tuple[Round, ...]

    def outputs(self, tag: str) -> list[str]:
        return [r.rewards_name(tag) for r in self.rounds] + [f"advantages@{tag}.parquet"]


def iteration_rounds(folder: Path) -> list[Round]:
    """generations.parquet, then generations-r1.parquet... (dynamic sampling's refills)."""
    found = [f for f in folder.glob("generations*.parquet") if ROUND_FILE.fullmatch(f.name)]
    found.sort(
        key=lambda f: int(f.name.removeprefix("generations-r").removesuffix(".parquet")) if "-r" in f.name else 0
    )
    return [Round(f, folder / f.name.replace("generations", "prompts", 1)) for f in found]


def find_targets(path: str | Path) -> list[Target]:
    """Every iteration of a run folder, or the iteration of the generations file given
    (a file named otherwise is re-scored alone, with the prompts.parquet beside it)."""
    path = Path(path)
    if path.is_dir():
        targets = [
            Target(f, tuple(iteration_rounds(f))) for f in (path / f"iter-{it:04d}" for it in iteration_numbers(path))
        ]
        targets = [t for t in targets if t.rounds]
        if not targets:
            raise FileNotFoundError(f"{path}: no iter-*/generations.parquet to re-score")
    elif path.is_file():
        check_schema(pq.read_schema(path), GENERATIONS, path)  # a rewards file given by mistake fails here
        rounds = (
            iteration_rounds(path.parent)
            if ROUND_FILE.fullmatch(path.name)
            else [Round(path, path.parent / "prompts.parquet")]
        )
        targets = [Target(path.parent, tuple(rounds))]
    else:
        raise FileNotFoundError(f"{path}: no such run folder or generations file")
    for t in targets:
        for r in t.rounds:
            if not r.prompts.is_file():
                raise FileNotFoundError(
                    f"{r.prompts}: the prompts of {r.generations} (gold answers, tests) are needed to score it"
                )
    return targets


def run_config(folder: Path) -> GRPOConfig | None:
    """The config of the run `folder` belongs to (config.json in it or a parent), if any."""
    for candidate in (folder, *folder.parents):
        path = candidate / "config.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            return GRPOConfig.model_validate(saved.get("config", saved))
    return None


def rescoring_config(
    config: GRPOConfig | None,
    rewards: dict[str, float] | None,
    reward_options: dict | None,
    max_error_fraction: float | None,
) -> GRPOConfig:
    """The run's config with the new rewards: the run's options for the rewards it keeps,
    `reward_options` on top; validated like a config (unknown rewards or options fail)."""
    settings = config.model_dump() if config is not None else {}
    if rewards is not None:
        kept = {name: opts for name, opts in settings.get("reward_options", {}).items() if name in rewards}
        settings |= {"rewards": rewards, "reward_options": kept}
    elif config is None:
        raise UserError("not in a run folder with a config.json, so give the rewards to score with (--rewards)")
    if reward_options is not None:
        settings["reward_options"] = settings.get("reward_options", {}) | reward_options
    if max_error_fraction is not None:
        settings["max_reward_error_fraction"] = max_error_fraction
    return GRPOConfig.model_validate(settings)


def default_tag() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def check_tag(targets: list[Target], tag: str, rewards: dict[str, float]) -> None:
    """Fail before any work if the tag is malformed or names another re-scoring's files."""
    if not TAG.fullmatch(tag):
        raise UserError(f"tag '{tag}': use letters, digits, '.', '_' or '-' (at most 64, not starting with a symbol)")
    for t in targets:
        entries = Manifest(t.folder).entries()
        for name in t.outputs(tag):
            if not (t.folder / name).exists() and name not in entries:
                continue
            same = entries.get(name, {}).get("rescore", {}).get("rewards") == rewards
            if not same:
                raise TagInUse(f"{t.folder / name} already exists (re-scoring never overwrites): choose another --tag")


# --- the comparison ----------------------------------------------------------------------------
def compare_rewards(
    before: str | Path | None,
    after: str | Path,
    generations: str | Path,
    *,
    examples: int = EXAMPLES,
    chunk_rows: int = CHUNK_ROWS,
) -> dict[str, Any]:
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
                raise UserError(
                    f"{before} and {after}: rows {rows}..{rows + old.num_rows - 1} are not the same completions"
                )
            a = old["reward"].to_numpy(zero_copy_only=False)
            _accumulate(totals["before"], a)
            differs = ~((a == b) | (np.isnan(a) & np.isnan(b)))
            changed += int(differs.sum())
            for i in np.flatnonzero(differs)[: max(examples - len(shown), 0)]:
                shown.append(
                    {
                        "prompt_id": old["prompt_id"][i].as_py(),
                        "sample_index": old["sample_index"][i].as_py(),
                        "before": float(a[i]),
                        "after": float(b[i]),
                    }
                )
        rows += new.num_rows
    if shown:
        texts = read_rows_where(
            generations,
            GENERATIONS,
            "prompt_id",
            [s["prompt_id"] for s in shown],
            ["prompt_id", "sample_index", "completion"],
        ).to_pylist()
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
        "scored_before": totals["before"][1] if before is not None else None,
        "scored_after": totals["after"][1],
        "changed": changed if before is not None else None,
        "examples": shown,
    }


def merge_comparisons(parts: list[dict[str, Any]], examples: int = EXAMPLES) -> dict[str, Any]:
    """One comparison for an iteration whose completions are in several round files."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    has_before = all(p["before"] is not None for p in parts)

    def weighted(key: str, count: str) -> float | None:
        n = sum(p[count] for p in parts)
        return sum(p[key] * p[count] for p in parts if p[count]) / n if n else math.nan

    return {
        "before": first["before"] if has_before else None,
        "after": first["after"],
        "rows": sum(p["rows"] for p in parts),
        "mean_before": weighted("mean_before", "scored_before") if has_before else None,
        "mean_after": weighted("mean_after", "scored_after"),
        "scored_before": sum(p["scored_before"] for p in parts) if has_before else None,
        "scored_after": sum(p["scored_after"] for p in parts),
        "changed": sum(p["changed"] for p in parts) if has_before else None,
        "examples": [e for p in parts for e in p["examples"]][:examples],
    }


def _accumulate(total: list, values: np.ndarray) -> None:
    finite = values[~np.isnan(values)]
    total[0] += float(finite.sum())
    total[1] += int(finite.size)


def format_comparison(folder: Path, c: dict[str, Any]) -> str:
    """Lines a person reads: where, before -> after, how many changed, a few of them."""
    where = f"{folder.parent.name}/{folder.name}" if folder.name.startswith("iter-") else str(folder)
    if c["before"] is None:
        return (
            f"{where}: {c['after']}: mean reward {c['mean_after']:.4f} over {c['rows']} "
            "rows (no earlier rewards.parquet "
            "to compare with)"
        )
    lines = [
        f"{where}: mean reward {c['mean_before']:.4f} -> {c['mean_after']:.4f} ({c['after']}); "
        f"{c['changed']} of {c['rows']} rows changed"
    ]
    for e in c["examples"]:
        text = (e.get("completion") or "").replace("\n", " ")
        text = text if len(text) <= 70 else text[:69] + "…"
        lines.append(f"    {e['prompt_id']} #{e['sample_index']}: {e['before']:.3g} -> {e['after']:.3g}  {text!r}")
    return "\n".join(lines)


@task(name="compare-rewards", cache_policy=NO_CACHE)
def compare_task(before: str | None, after: str, generations: str) -> dict:
    return compare_rewards(before, after, generations)


# --- the flow ---------------------------------------------------------------------------------
@flow(name="grpo-rescore")
def grpo_rescore(
    target: str,
    tag: str,
    rewards: dict[str, float] | None = None,
    reward_options: dict[str, dict[str, Any]] | None = None,
    max_error_fraction: float | None = None,
) -> list[dict]:
    """Re-score `target` (a run folder or a generations file) as `tag`; return one
    comparison per iteration."""
    take_over_sigterm()  # SIGTERM stops `grpo rescore` as Ctrl-C does (flows/stopping.py)
    if not TAG.fullmatch(tag):
        raise UserError(f"tag '{tag}': use letters, digits, '.', '_' or '-' (at most 64, not starting with a symbol)")
    targets = find_targets(target)
    config = rescoring_config(run_config(targets[0].folder), rewards, reward_options, max_error_fraction)
    check_tag(targets, tag, dict(config.rewards))

    with StageRunner(get_run_logger()) as runner:  # leaving it publishes the stage views still being built
        results = rescore_targets(runner, targets, tag, config)
    run_dir = targets[0].folder.parent
    if (run_dir / STATE_FILE).is_file():
        log_rescoring(
            run_dir, tag, dict(config.rewards), results
        )  # a tracked folder's re-scoring goes to its experiment
    return results


def rescore_targets(runner: StageRunner, targets: list[Target], tag: str, config: GRPOConfig) -> list[dict]:
    """The body of `grpo_rescore`: score + advantages per iteration (the same settings training
    used, so a re-scoring's advantages are those training would have had), then the comparison."""
    log = runner.log
    results = []
    recorded = {"rescore": {"tag": tag, "rewards": dict(config.rewards)}}
    for t in targets:
        remove_stale_temp_files(t.folder)
        manifest = Manifest(t.folder)
        rewards_out = []
        for r in t.rounds:
            out = str(t.folder / r.rewards_name(tag))
            runner.run(
                manifest,
                r.rewards_name(tag),
                score_task,
                str(r.generations),
                str(r.prompts),
                out,
                settings=score_settings(config),
                schema_version=REWARDS.version,
                manifest_extra=recorded,
            )
            rewards_out.append(out)
        advantages_name = f"advantages@{tag}.parquet"
        runner.run(
            manifest,
            advantages_name,
            advantages_task,
            rewards_out,
            str(t.folder / advantages_name),
            settings=advantage_settings(config),
            schema_version=ADVANTAGES.version,
            manifest_extra=recorded,
        )
        parts = []
        for r, out in zip(t.rounds, rewards_out, strict=True):
            before = t.folder / r.rewards_name()
            parts.append(compare_task(str(before) if before.is_file() else None, out, str(r.generations)))
        comparison = merge_comparisons(parts)
        log.info(format_comparison(t.folder, comparison).splitlines()[0])
        results.append({"folder": str(t.folder), **comparison})
    return results
