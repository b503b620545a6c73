"""The GRPO training flow: the flow body *is* the pipeline.

    prepare model, ingest -> [select -> generate -> score -> advantages -> update -> evaluate] x iterations -> export

Every stage is a Prefect task that reads and writes files in the run folder, run through the
flow's `StageRunner` (flows/runner.py): a stage already recorded in its folder's manifest is
skipped, so re-running a run folder continues it from its last checkpoint, replaying the
updates that were done but not saved. Where generate, score and update run (this process or
a Ray cluster) is decided once, by `stages_for` (flows/cluster/); what each stage is given is
built once, by `StagePlan` (flows/settings.py).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.logging.loggers import flow_run_logger

from data import builtin
from data.metrics import saved_metrics, write_metrics
from data.run_folder import (
    CHECKPOINT,
    FINAL,
    hold_run_folder,
    iteration_dir,
    prompt_pool,
    prune_checkpoints,
    resume_point,
    start_policy,
)
from data.schemas import ADVANTAGES, GENERATIONS, PROMPTS, REWARDS
from data.sources import normalise_row, prompts_table, source_label
from data.store import Manifest, remove_stale_temp_files, write_table
from flows.cluster import Stages, stages_for
from flows.config import MID_RUN_SAFE, GRPOConfig
from flows.observe.registry import register
from flows.observe.tracking import Tracking
from flows.runner import Logger, StageRunner
from flows.settings import StagePlan
from flows.start import check_prompts_task, print_start_block, tokenization_warning, write_config_record
from flows.stopping import take_over_sigterm
from tasks.advantages import advantages_task, informative_groups, refill_prompts_task
from tasks.evaluate import evaluate_task
from tasks.ingest import ingest_task, merge_prompts_task
from tasks.model import after_save, export_final_model, live_policy, wait_for_saves
from tasks.progress import stage_label
from tasks.select import select_prompts_task
from tasks.tiny_model import ensure_tiny_model
from tasks.update import UpdateStep


@flow(name="grpo-train")
def grpo_train(config: GRPOConfig) -> dict[str, Any]:
    """Run GRPO for `config.iterations` iterations; return the final metrics."""
    take_over_sigterm()  # SIGTERM stops `grpo run` as Ctrl-C does (flows/stopping.py)
    run_dir = Path(config.run_dir or ".")
    run_dir.mkdir(parents=True, exist_ok=True)
    # Left in reverse order: the tracker closes its run, background checkpoint writes land,
    # the cluster's workers end, the stage views are published, the folder's lock goes last.
    with (
        hold_run_folder(run_dir),  # before touching anything: another process may be writing here
        StageRunner(get_run_logger()) as runner,
        stages_for(config) as stages,
        settled_background_saves(),
        Tracking(config, runner.views) as tracking,
    ):
        log = runner.log
        remove_stale_temp_files(run_dir)  # leftovers of a killed writer are never artifacts
        write_config_record(run_dir, config, log)

        base_model = prepare_model_task(config)
        data = ingest_data(config, runner)
        plan = StagePlan.from_config(config, base_model, background_save=stages.saves_in_background)
        print_start_block(config, base_model, data.manifest, data.eval)
        runner.warnings.say(
            log,
            "tokenizer",
            tokenization_warning(check_prompts_task(data.train, base_model, config.use_chat_template), base_model),
        )
        before = evaluate_start(config, runner, data, plan, base_model)
        if before:
            tracking.iteration_done()

        first, policy, metrics = starting_point(config, base_model, log)
        overflow = PromptOverflow()
        for it in range(first, config.iterations + 1):
            started = time.perf_counter()
            files = IterationFiles(iteration_dir(run_dir, it))
            m = files.manifest
            pool, before_pool = prompt_pool(data.manifest, data.train, it)  # scheduled runs add unseen prompts
            runner.run(
                m,
                "prompts.parquet",
                select_prompts_task,
                pool,
                files.prompts,
                iteration=it - before_pool,
                per_iteration=config.prompts_per_iteration,
                seed=config.seed,
                mix=data.mix,
                schema_version=PROMPTS.version,
            )
            gen = runner.run(
                m,
                "generations.parquet",
                stages.generate,
                files.prompts,
                files.generations,
                policy,
                settings=plan.generate,
                seed=sampling_seed(config, it),
                schema_version=GENERATIONS.version,
            )
            score = runner.run(
                m,
                "rewards.parquet",
                stages.score,
                files.generations,
                files.prompts,
                files.rewards,
                settings=plan.score,
                schema_version=REWARDS.version,
            )
            all_gens, all_rewards, rounds = refill_rounds(config, runner, stages, plan, files, it, data.train, policy)
            adv = runner.run(
                m,
                "advantages.parquet",
                advantages_task,
                all_rewards,
                files.advantages,
                settings=plan.advantages,
                schema_version=ADVANTAGES.version,
            )
            step = update_step(config, m, it, plan)
            upd = runner.update(
                m,
                stages.update,
                all_gens,
                files.advantages,
                policy,
                files.checkpoint,
                settings=plan.update,
                step=step,
                manifest_extra={"learning_rate": step.learning_rate},
            )
            policy = files.checkpoint
            held_out = (
                runner.run(m, "eval", evaluate_task, data.eval, policy, settings=plan.evaluate)
                if data.eval is not None and evaluation_due(config, it)
                else None
            )

            metrics = iteration_metrics(config, it, started, gen, score, adv, upd, rounds, step, held_out)
            warn_about_iteration(config, runner, files.folder, gen, adv, overflow)
            write_metrics(run_dir, it, metrics)
            if step.save:  # after metrics.json: the new checkpoint is the resumable one once it has landed
                rotate = functools.partial(rotate_checkpoints, run_dir, config.save_total_limit, log)
                if not after_save(files.checkpoint, rotate):  # on the writer's thread, after a background write
                    rotate()
            tracking.iteration_done()
            runner.views.refresh_learning_curve(run_dir, force=held_out is not None or it == config.iterations)
            log.info(iteration_line(config, metrics))

        if before and "held_out_accuracy" in metrics:
            metrics["held_out_accuracy_before"] = before["accuracy"]
            log.info(held_out_change_line(before, metrics["held_out_accuracy"]))
        wait_for_saves()  # the last checkpoint is on disk (and recorded) before the run says it is done
        if first <= config.iterations:  # the rotation the last checkpoint, written in the background, has not had
            rotate_checkpoints(run_dir, config.save_total_limit, log)
        overflow.summarise(config, log, first)
        metrics["final_model"] = export_final(config, runner, policy)
        return metrics | register(tracking, config, metrics)


# --- before the first iteration ------------------------------------------------------------
@task(name="prepare-model", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def prepare_model_task(config: GRPOConfig) -> str:
    """The policy's starting checkpoint: the given model, or the built-in tiny one."""
    if config.model is not None:
        return config.model
    # Said with the flow run's logger: a cold build takes minutes, and the task runs' logger is
    # kept at WARNING on the console (flows/cli.py), so its line never reached a user.
    return str(ensure_tiny_model(steps=config.tiny_model_sft_steps, seed=config.seed, say=flow_run_log().info))


def flow_run_log() -> Logger:
    """The logger of the flow run this task belongs to (its lines reach the console at INFO),
    or the task's own outside a flow run."""
    context = FlowRunContext.get()
    return flow_run_logger(context.flow_run, context.flow) if context is not None else get_run_logger()


@task(name="builtin-prompts", cache_policy=NO_CACHE)
def write_builtin_prompts_task(out_path: str, held_out: bool, size: int) -> dict[str, Any]:
    rows = builtin.held_out_problems(min(size, builtin.HELD_OUT_SIZE)) if held_out else builtin.all_train_problems()
    source = f"builtin:{builtin.TASK}:{'held_out' if held_out else 'train'}"
    table = prompts_table([normalise_row(r, data_source=source, row=i) for i, r in enumerate(rows)])
    write_table(table, out_path, PROMPTS)
    return {"rows": table.num_rows, "source": source}


@dataclass(frozen=True)
class DataFiles:
    """The run's prompt files in `dataset/`: what iterations draw from, and the held-out set."""

    manifest: Manifest
    train: str
    eval: str | None  # None: no held-out set, so no evaluation
    mix: list[tuple[str, float]] | None  # several training datasets: (label, weight) each


def ingest_data(config: GRPOConfig, runner: StageRunner) -> DataFiles:
    """`dataset/prompts.parquet` (and `eval.parquet`): the built-in task, one dataset, or
    several ingested one by one and merged into one file drawn from by weight."""
    data_dir = Path(config.run_dir or ".") / "dataset"
    manifest = Manifest(data_dir)
    train, eval_path = str(data_dir / "prompts.parquet"), str(data_dir / "eval.parquet")
    if config.uses_builtin_data():
        runner.run(manifest, "prompts.parquet", write_builtin_prompts_task, train, held_out=False, size=0)
        runner.run(
            manifest, "eval.parquet", write_builtin_prompts_task, eval_path, held_out=True, size=config.eval_size
        )
        return DataFiles(manifest, train, eval_path, mix=None)
    ingest = {"split": config.dataset_split, "task": config.task, "skip_invalid": config.skip_invalid}
    if config.datasets is None:
        rejected = str(data_dir / "rejected.parquet")
        runner.run(manifest, "prompts.parquet", ingest_task, config.dataset, train, rejected_path=rejected, **ingest)
    else:
        parts = [str(data_dir / f"source-{k}.parquet") for k in range(len(config.datasets))]
        for k, (source, part) in enumerate(zip(config.datasets, parts, strict=True)):
            rejected = str(data_dir / f"rejected-{k}.parquet")
            runner.run(manifest, Path(part).name, ingest_task, source, part, rejected_path=rejected, **ingest)
        runner.run(manifest, "prompts.parquet", merge_prompts_task, parts, train)
    if config.eval_dataset is not None:
        runner.run(
            manifest, "eval.parquet", ingest_task, config.eval_dataset, eval_path, limit=config.eval_size, **ingest
        )
    mix = (
        None
        if config.datasets is None
        else [(source_label(s, split=config.dataset_split), w) for s, w in config.datasets.items()]
    )
    return DataFiles(manifest, train, eval_path if config.eval_dataset is not None else None, mix)


def evaluate_start(
    config: GRPOConfig, runner: StageRunner, data: DataFiles, plan: StagePlan, base_model: str
) -> dict[str, Any]:
    """Iteration 0: the held-out accuracy before any update ({} without a held-out set)."""
    if data.eval is None:
        return {}
    run_dir = Path(config.run_dir or ".")
    start = runner.run(
        Manifest(iteration_dir(run_dir, 0)), "eval", evaluate_task, data.eval, base_model, settings=plan.evaluate
    )
    write_metrics(run_dir, 0, {"iteration": 0, "held_out_accuracy": start["accuracy"]})
    runner.log.info(
        f"iteration 0: held-out accuracy {start['accuracy']:.1%} (before GRPO, {start['problems']} problems)"
    )
    return start


def starting_point(config: GRPOConfig, base_model: str, log: Logger) -> tuple[int, str, dict[str, Any]]:
    """The first iteration to run, the policy it starts from, and the metrics of the one before."""
    run_dir = Path(config.run_dir or ".")
    first, policy, metrics = 1, base_model, {}
    resumed = resume_point(run_dir, config.iterations)
    if resumed is not None:
        first, policy, metrics = resumed.iteration + 1, resumed.checkpoint, saved_metrics(run_dir, resumed.iteration)
        log.info(
            f"resuming after iteration {resumed.iteration}: policy and optimiser state from "
            f"{Path(resumed.checkpoint).parent.name}/{CHECKPOINT}"
        )
    if first <= config.iterations and (chosen := start_policy(run_dir, first)) is not None:
        policy = chosen  # a scheduled run told to start from the registered champion (flows/serve.py)
        log.info(f"iteration {first} starts from {policy}")
    return first, policy, metrics


# --- one iteration -----------------------------------------------------------------------------
@dataclass(frozen=True)
class IterationFiles:
    """The artifacts of one iteration, in its folder."""

    folder: Path

    @property
    def manifest(self) -> Manifest:
        return Manifest(self.folder)

    def path(self, name: str) -> str:
        return str(self.folder / name)

    @property
    def prompts(self) -> str:
        return self.path("prompts.parquet")

    @property
    def generations(self) -> str:
        return self.path("generations.parquet")

    @property
    def rewards(self) -> str:
        return self.path("rewards.parquet")

    @property
    def advantages(self) -> str:
        return self.path("advantages.parquet")

    @property
    def checkpoint(self) -> str:
        return self.path(CHECKPOINT)


def sampling_seed(config: GRPOConfig, iteration: int, refill_round: int = 0) -> int:
    """The seed of an iteration's generation (and of its refill rounds): a function of the
    run's seed and the iteration alone, so a resumed run samples the same completions."""
    seed = config.seed * 100_003 + iteration
    return seed * 1_000 + refill_round if refill_round else seed


def refill_rounds(
    config: GRPOConfig,
    runner: StageRunner,
    stages: Stages,
    plan: StagePlan,
    files: IterationFiles,
    it: int,
    train_path: str,
    policy: str,
) -> tuple[list[str], list[str], int]:
    """DAPO dynamic sampling: extra rounds of prompts + generate + score (`prompts-r<k>.parquet`,
    `generations-r<k>.parquet`, `rewards-r<k>.parquet`) while fewer than prompts_per_iteration
    groups have reward spread, at most max_refill_rounds. Returns every round's generations
    and rewards paths (round 0 first) and the number of extra rounds."""
    prompts, gens, rewards = [files.prompts], [files.generations], [files.rewards]
    m = files.manifest
    rounds = 0
    while (
        config.dynamic_sampling
        and rounds < config.max_refill_rounds
        and informative_groups(rewards) < config.prompts_per_iteration
    ):
        rounds += 1
        p, g, r = (files.path(f"{name}-r{rounds}.parquet") for name in ("prompts", "generations", "rewards"))
        picked = runner.run(
            m,
            Path(p).name,
            refill_prompts_task,
            train_path,
            p,
            exclude_paths=prompts,
            count=config.prompts_per_iteration,
            seed=f"{config.seed}:{it}:{rounds}",
            schema_version=PROMPTS.version,
        )
        if picked["prompts"] == 0:  # the dataset has no unused prompt left
            break
        seed = sampling_seed(config, it, rounds)
        runner.run(
            m,
            Path(g).name,
            stages.generate,
            p,
            g,
            policy,
            settings=plan.generate,
            seed=seed,
            schema_version=GENERATIONS.version,
        )
        runner.run(m, Path(r).name, stages.score, g, p, r, settings=plan.score, schema_version=REWARDS.version)
        prompts.append(p)
        gens.append(g)
        rewards.append(r)
    return gens, rewards, rounds


def update_step(config: GRPOConfig, manifest: Manifest, it: int, plan: StagePlan) -> UpdateStep:
    """What this iteration's update is given besides the run's settings. A done update
    (replayed when its weights were not saved) keeps the learning rate it ran with, whatever
    a resume changed since: the replay must give the same weights."""
    lr = config.learning_rate
    if manifest.is_done(CHECKPOINT):
        lr = manifest.entries().get(CHECKPOINT, {}).get("learning_rate", lr)
    return UpdateStep(
        learning_rate=lr,
        first_step=(it - 1) * plan.steps_per_iteration,
        save=it % config.save_every == 0 or it == config.iterations,
        seed=config.seed * 100_003 + it,
    )


def evaluation_due(config: GRPOConfig, it: int) -> bool:
    return it == config.iterations or bool(config.eval_every and it % config.eval_every == 0)


def iteration_metrics(
    config: GRPOConfig,
    it: int,
    started: float,
    gen: dict[str, Any],
    score: dict[str, Any],
    adv: dict[str, Any],
    upd: dict[str, Any],
    rounds: int,
    step: UpdateStep,
    held_out: dict[str, Any] | None,
) -> dict[str, Any]:
    """metrics.json of one iteration: every stage's summary, with the time it took."""
    metrics = {
        "iteration": it,
        "reward": score["reward_mean"],
        **gen,
        **adv,
        **upd,
        "dynamic_sampling/rounds": rounds,
        "step_time": time.perf_counter() - started,
        # The settings that may change on resume, as they were for this iteration (grpo inspect shows changes).
        "settings": {k: getattr(config, k) for k in MID_RUN_SAFE} | {"learning_rate": step.learning_rate},
    }
    metrics["tokens_per_second"] = upd.get("iteration_tokens", math.nan) / metrics["step_time"]
    if held_out is not None:
        metrics["held_out_accuracy"] = held_out["accuracy"]
    return metrics


def iteration_line(config: GRPOConfig, metrics: dict[str, Any]) -> str:
    acc = f", held-out accuracy {metrics['held_out_accuracy']:.1%}" if "held_out_accuracy" in metrics else ""
    return (
        f"iteration {metrics['iteration']}/{config.iterations}: reward {metrics['reward']:.3f}, "
        f"kl {metrics.get('kl', 0.0):.4f}, {metrics['completions']} completions, {metrics['step_time']:.1f}s{acc}"
    )


def held_out_change_line(before: dict[str, Any], after: float) -> str:
    start = before["accuracy"]
    return (
        f"held-out accuracy {start:.1%} -> {after:.1%} ({(after - start) * 100:+.1f} points) "
        f"on {before['problems']} problems"
    )


def no_signal_warning(adv: dict[str, Any]) -> str | None:
    """One line when no group of the iteration has reward spread: every advantage is 0."""
    groups = adv.get("dynamic_sampling/groups", 0)
    flat = round(adv.get("frac_reward_zero_std", 0.0) * groups)
    if not groups or flat < groups:
        return None
    return (
        f"no learning signal: {flat} of {groups} groups have zero reward spread "
        f"(mean reward {adv.get('reward', math.nan):.3g})"
    )


@dataclass
class PromptOverflow:
    """Prompts over max_prompt_length this run, counted over its iterations."""

    truncated: int = 0
    skipped: int = 0

    def add(self, gen: dict[str, Any]) -> int:
        self.truncated += gen.get("prompts/truncated", 0)
        self.skipped += gen.get("prompts/skipped", 0)
        return int(gen.get("prompts/truncated", 0) or gen.get("prompts/skipped", 0))

    def summarise(self, config: GRPOConfig, log: Logger, first: int) -> None:
        if self.truncated or self.skipped:
            log.info(
                f"prompts over max_prompt_length={config.max_prompt_length}: {self.truncated} truncated, "
                f"{self.skipped} skipped, over iterations {first}-{config.iterations}"
            )


def warn_about_iteration(
    config: GRPOConfig,
    runner: StageRunner,
    folder: Path,
    gen: dict[str, Any],
    adv: dict[str, Any],
    overflow: PromptOverflow,
) -> None:
    """The warnings an iteration can raise: no learning signal, prompts cut or left out."""
    log = runner.log
    runner.warnings.say(log, "no-signal", None if (w := no_signal_warning(adv)) is None else f"{folder.name}: {w}")
    if over := overflow.add(gen):
        done = "truncated from the left" if config.prompt_overflow == "truncate_left" else "skipped"
        runner.warnings.say(
            log,
            "prompt-length",
            f"{folder.name}: {over} prompts longer than max_prompt_length={config.max_prompt_length} tokens were "
            f"{done} (counted in prompts/{done.split()[0]})",
        )


# --- after the last iteration ----------------------------------------------------------------
def rotate_checkpoints(run_dir: Path, keep: int | None, log: Logger) -> None:
    """Remove checkpoints beyond `keep`. A failure only warns: the checkpoints are all still
    there and the next save tries again. Raised on the background writer's thread it would
    read, at the next update, as if the new checkpoint had not been written."""
    try:
        pruned = prune_checkpoints(run_dir, keep)
    except OSError as err:
        log.warning(f"{run_dir}: old checkpoints could not be removed ({err}); the next save tries again")
        return
    if pruned["checkpoints"]:
        removed = ", ".join(map(str, pruned["checkpoints"]))
        log.info(f"removed checkpoints of iterations {removed} (save_total_limit {keep})")


@contextmanager
def settled_background_saves() -> Iterator[None]:
    """No checkpoint writer of this run outlives it: when the flow fails, a checkpoint still
    being written is waited for, and its own failure logged, never raised over the error
    that stopped the flow."""
    try:
        yield
    finally:
        try:
            wait_for_saves()
        except Exception as err:
            logging.getLogger("grpoflow").error(str(err))


@task(name="export-final-model", cache_policy=NO_CACHE)
def export_final_task(policy_path: str, run_dir: str, device: str = "auto", dtype: str = "auto") -> dict[str, str]:
    """<run_dir>/final/: the last iteration's weights and tokenizer, no optimiser state."""
    return {"path": str(export_final_model(live_policy(policy_path, device, dtype), run_dir))}


def export_final(config: GRPOConfig, runner: StageRunner, policy: str) -> str:
    """Write <run_dir>/final/ from the last iteration's policy, unless it already holds it
    (a re-run of a finished folder); recorded in the run folder's manifest by iteration."""
    run_dir = Path(config.run_dir or ".")
    manifest = Manifest(run_dir)
    entry = manifest.entries().get(FINAL, {})
    if manifest.is_done(FINAL) and entry.get("iteration") == config.iterations and entry.get("policy") == str(policy):
        return str(run_dir / FINAL)
    manifest.forget(FINAL)  # a newer policy: the old final/ is no longer the run's result
    runner.catch_up(policy)
    with stage_label(FINAL):
        export_final_task(str(policy), str(run_dir), device=config.device, dtype=config.dtype)
    manifest.record(FINAL, iteration=config.iterations, policy=str(policy))
    runner.log.info(f"final model (weights and tokenizer, no optimiser state): {run_dir / FINAL}")
    return str(run_dir / FINAL)
