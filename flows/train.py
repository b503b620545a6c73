"""The GRPO training flow: the flow body *is* the pipeline.

    ingest -> [select -> generate -> score -> advantages -> update -> evaluate] x iterations

Every stage is a Prefect task that reads and writes files in the run folder. A stage whose
output is already recorded in its folder's manifest (with a matching checksum) is skipped,
so re-running a run folder continues it: from its last checkpoint, replaying the updates
that were done but not saved (flows/resume.py). Each stage that runs logs one line and
publishes a Prefect artifact; each iteration refreshes the run's learning-curve PNG
(flows/report.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data import builtin
from data.schemas import ADVANTAGES, GENERATIONS, METRICS, PROMPTS, REWARDS, SchemaError
from data.sources import hub_offline, normalise_row, prompts_table, read_source, source_label
from data.store import (
    TMP_PREFIX,
    Manifest,
    atomic_write_json,
    iteration_dir,
    read_table,
    remove_stale_temp_files,
    write_table,
)
from flows.cluster import Stages, stages_for
from flows.config import MID_RUN_SAFE, GRPOConfig
from flows.report import VIEWS
from flows.resume import (
    CHECKPOINT,
    PendingUpdates,
    completed_iterations,
    describe_changes,
    hold_run_folder,
    prompt_pool,
    prune_checkpoints,
    release_run_folder,
    resume_point,
    saved_metrics,
    setting_changes,
    start_policy,
)
from flows.stopping import take_over_sigterm
from flows.tracking import Tracking, check_installed
from tasks.advantages import advantages_task, informative_groups, refill_prompts_task
from tasks.engines import check_available
from tasks.evaluate import evaluate_task
from tasks.footprint import gib, lora_trained_parameters, machine_memory_bytes, model_shape, update_peak_bytes
from tasks.generate import render_prompt, tokenization_loss
from tasks.ingest import ingest_task, merge_prompts_task
from tasks.model import (
    FINAL,
    after_save,
    check_model_source,
    export_final_model,
    live_policy,
    load_tokenizer,
    wait_for_saves,
)
from tasks.objective import LossSettings
from tasks.progress import stage_label
from tasks.schedule import LRSchedule
from tasks.select import select_prompts_task
from tasks.tiny_model import ensure_tiny_model
from tasks.update import needs_old_logprobs

# Updates of this flow run that were done before a restart and whose weights must be
# re-created before a stage reads them (flows/resume.py).
PENDING_UPDATES = PendingUpdates()


def run_stage(
    manifest: Manifest,
    output: str,
    stage: Callable[..., dict],
    *args: Any,
    schema_version: int | None = None,
    manifest_extra: dict | None = None,
    **kwargs: Any,
) -> dict:
    """Run `stage` unless `output` is already recorded as done in `manifest`; record it after.

    The stage's summary dict is kept in the manifest (with its duration, the paths it read
    and `manifest_extra`) so a skipped stage still reports it. A skipped update whose
    weights were not saved is remembered, and replayed before a later stage reads them.
    """
    log = get_run_logger()
    where = f"{manifest.folder.name}/{output}"
    if manifest.is_done(output):
        entry = manifest.entries()[output]
        if output == CHECKPOINT and entry.get("kind") != "folder":
            PENDING_UPDATES.defer(
                manifest.folder / output,
                where,
                lambda: (stage(*args, **kwargs), record_when_saved(manifest, output, log)),
            )
        log.info(f"{where}: done already, skipped")
        return entry.get("summary", {})
    PENDING_UPDATES.catch_up([*args, *kwargs.values()], log)
    started = time.perf_counter()
    with stage_label(where):
        summary = stage(*args, **kwargs)
    seconds = time.perf_counter() - started
    inputs = [str(a) for a in args if isinstance(a, (str, Path))]
    manifest.record(
        output,
        schema_version=schema_version,
        summary=summary,
        seconds=round(seconds, 3),
        inputs=inputs,
        **(manifest_extra or {}),
    )
    if output == CHECKPOINT:
        record_when_saved(manifest, output, log)
    VIEWS.publish_stage_report(manifest.folder, output, summary)
    log.info(stage_line(where, summary, seconds))
    return summary


def record_when_saved(manifest: Manifest, output: str, log) -> None:
    """A checkpoint that the update left to the background writer (tasks.model.save_in_background)
    is recorded as a folder once it is on disk. Until then its entry is a "result", as for an
    iteration that save_every does not save: a process killed before the write lands resumes
    by replaying that update from its stored artifacts (flows/resume.py), and saves it again."""
    where = f"{manifest.folder.name}/{output}"

    def landed() -> None:
        try:
            manifest.refresh(output, saved_in_background=True)
        except OSError as err:  # the entry stays a "result": a resume replays the update; nothing is lost
            log.warning(f"{where}: written, but its manifest entry could not be updated ({err})")

    after_save(manifest.folder / output, landed)


STAGE_LINE_LIMIT = 120  # characters of a stage's log line; the rest of its summary is in metrics.json and the manifest


def stage_line(where: str, summary: dict, seconds: float, limit: int = STAGE_LINE_LIMIT) -> str:
    """`where: k v, k v, ... (1.2s)` with as many of the summary's scalars, in order, as fit
    in `limit` characters; the count of the others is named, never silently dropped."""
    items = [
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in summary.items()
        if not isinstance(v, (list, dict))
    ]
    tail = f" ({seconds:.1f}s)"
    shown: list[str] = []
    for k, item in enumerate(items):
        more = len(items) - k - 1
        rest = f", +{more} more" if more else ""
        line = f"{where}: {', '.join([*shown, item])}{rest}{tail}"
        if len(line) > limit and shown:
            return f"{where}: {', '.join(shown)}, +{len(items) - k} more{tail}"
        shown.append(item)
    return f"{where}: {', '.join(shown)}{tail}"


@task(name="prepare-model", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def prepare_model_task(config: GRPOConfig) -> str:
    """The policy's starting checkpoint: the given model, or the built-in tiny one."""
    if config.model is not None:
        return config.model
    # Said with the flow run's logger: a cold build takes minutes, and the task runs' logger is
    # kept at WARNING on the console (flows/cli.py), so its line never reached a user.
    return str(ensure_tiny_model(steps=config.tiny_model_sft_steps, seed=config.seed, say=flow_run_log().info))


def flow_run_log():
    """The logger of the flow run this task belongs to (its lines reach the console at INFO),
    or the task's own outside a flow run."""
    from prefect.context import FlowRunContext
    from prefect.logging.loggers import flow_run_logger

    context = FlowRunContext.get()
    return flow_run_logger(context.flow_run, context.flow) if context is not None else get_run_logger()


@task(name="export-final-model", cache_policy=NO_CACHE)
def export_final_task(policy_path: str, run_dir: str, device: str = "auto", dtype: str = "auto") -> dict:
    """<run_dir>/final/: the last iteration's weights and tokenizer, no optimiser state."""
    return {"path": str(export_final_model(live_policy(policy_path, device, dtype), run_dir))}


@task(name="builtin-prompts", cache_policy=NO_CACHE)
def write_builtin_prompts_task(out_path: str, held_out: bool, size: int) -> dict:
    rows = builtin.held_out_problems(min(size, builtin.HELD_OUT_SIZE)) if held_out else builtin.all_train_problems()
    source = f"builtin:{builtin.TASK}:{'held_out' if held_out else 'train'}"
    table = prompts_table([normalise_row(r, data_source=source, row=i) for i, r in enumerate(rows)])
    write_table(table, out_path, PROMPTS)
    return {"rows": table.num_rows, "source": source}


TOKENIZATION_SAMPLE = 256  # prompts checked for characters the tokenizer loses


@task(name="check-prompts", cache_policy=NO_CACHE)
def check_prompts_task(
    prompts_path: str, model: str, use_chat_template: bool, sample: int = TOKENIZATION_SAMPLE
) -> dict:
    return check_prompts(prompts_path, model, use_chat_template, sample)


def check_prompts(
    prompts_path: str | Path, model: str, use_chat_template: bool, sample: int = TOKENIZATION_SAMPLE
) -> dict:
    """Whether the policy's tokenizer keeps the training prompts' text: the first `sample`
    prompts rendered as the generate stage renders them, encoded and decoded back."""
    tokenizer = load_tokenizer(model)
    rows = read_table(prompts_path, PROMPTS).slice(0, sample).to_pylist()
    return tokenization_loss(tokenizer, [render_prompt(r, tokenizer, use_chat_template) for r in rows])


def tokenization_warning(check: dict, model: str) -> str | None:
    """One line when the tokenizer loses characters of the prompts, with the counts."""
    if not check["lossy"]:
        return None
    k, text, back = check["example"]
    return (
        f"the tokenizer of {model} loses characters of {check['lossy']} of {check['prompts']} prompts checked "
        f"({check['unknown_tokens']} unknown tokens), e.g. {text[:40]!r} -> {back[:40]!r}: the model never sees that text"
    )


def no_signal_warning(adv: dict) -> str | None:
    """One line when no group of the iteration has reward spread: every advantage is 0."""
    groups = adv.get("dynamic_sampling/groups", 0)
    flat = round(adv.get("frac_reward_zero_std", 0.0) * groups)
    if not groups or flat < groups:
        return None
    return f"no learning signal: {flat} of {groups} groups have zero reward spread (mean reward {adv.get('reward', math.nan):.3g})"


class RunWarnings:
    """Warnings that save hours, each said the first 3 times it applies and every 10th after,
    with the count, so a run that never learns says so without drowning its log."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def say(self, log, key: str, message: str | None) -> bool:
        if message is None:
            return False
        count = self.counts[key] = self.counts.get(key, 0) + 1
        if count <= 3 or count % 10 == 0:
            log.warning(message + (f" ({count} iterations so far)" if count > 1 else ""))
            return True
        return False


def preflight(config: GRPOConfig) -> None:
    """The checks that need no Prefect and no model: a missing model folder or dataset file,
    a hub dataset that is not cached while the hub is offline, a run folder that cannot be
    written: each reported in one line before the flow starts."""
    if config.model is not None:
        check_model_source(config.model)
    for engine in {config.generation_engine, config.eval_engine or config.generation_engine}:
        check_available(engine)
    for source in (*(config.datasets or {}), config.dataset, config.eval_dataset):
        local = source is not None and (Path(source).expanduser().exists() or source.startswith(("/", ".", "~")))
        if local or (source is not None and hub_offline()):  # offline, a hub name reads the local cache only
            next(read_source(source, split=config.dataset_split), None)  # parses the first row
    check_installed(config)  # --tracking-uri / --tensorboard without `make install-tracking`
    check_writable(Path(config.run_dir))


def check_writable(run_dir: Path) -> None:
    """Create `run_dir` (and its parents) and a probe file in it, removed at once, so that a
    read-only disk or folder is an error now, not after the first stage. Raises the OSError
    (with its file name) that the command line reports in one line."""
    run_dir.mkdir(parents=True, exist_ok=True)
    probe = run_dir / f"{TMP_PREFIX}probe-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def versions() -> dict[str, str]:
    """What produced a run, for config.json: results are only comparable at equal versions."""
    import importlib.metadata

    return {pkg: importlib.metadata.version(pkg) for pkg in ("grpoflow", "torch", "transformers", "prefect", "pyarrow")}


def write_metrics(run_dir: Path, iteration: int, metrics: dict) -> None:
    """The iteration's metrics.json, and the run's metrics.parquet rebuilt from all of them.

    An iteration that already has one (a resumed run that skipped every stage) keeps it: its
    numbers, timings included, are those of the run that did the work, and the table stays
    byte for byte the same."""
    path = iteration_dir(run_dir, iteration) / "metrics.json"
    if not path.exists():
        atomic_write_json(path, metrics)
    write_metrics_table(run_dir, added=iteration)


def _metric_rows(path: Path) -> list[tuple[int, str, float]]:
    saved = json.loads(path.read_text())
    it = int(saved.get("iteration", int(path.parent.name.removeprefix("iter-"))))
    return [(it, k, float(v)) for k, v in saved.items() if k != "iteration" and isinstance(v, (int, float))]


def write_metrics_table(run_dir: Path, added: int | None = None) -> Path:
    """metrics.parquet: every number of every iteration's metrics.json, one row per
    (iteration, name). When the table already holds exactly the iterations before `added`
    (the usual case), `added`'s rows are appended to it; otherwise (a resumed or repaired
    run) it is rebuilt from every metrics.json, so it is always whole. Re-reading every JSON
    cost 0.14 s per iteration at 1,000 iterations."""
    out = run_dir / "metrics.parquet"
    files = sorted(run_dir.glob("iter-*/metrics.json"))
    iterations = [int(p.parent.name.removeprefix("iter-")) for p in files]
    table = None
    if added is not None and out.is_file() and iterations and iterations[-1] == added:
        try:
            table = read_table(out, METRICS)
        except (SchemaError, pa.ArrowException):
            table = None  # unreadable: rebuilt below
        if table is not None and set(pc.unique(table.column("iteration")).to_pylist()) != set(iterations[:-1]):
            table = None  # not exactly the earlier iterations: rebuilt below
    rows = [r for p in (files[-1:] if table is not None else files) for r in _metric_rows(p)]
    new = pa.table(
        {"iteration": [r[0] for r in rows], "name": [r[1] for r in rows], "value": [r[2] for r in rows]},
        schema=METRICS.schema,
    )
    return write_table(pa.concat_tables([table, new]) if table is not None else new, out, METRICS)


# The settings each generation engine is built with (tasks/engines), from the config.
ENGINE_OPTIONS: dict[str, Callable[[GRPOConfig], dict]] = {
    "hf": lambda config: {},
    "vllm": lambda config: {
        "gpu_memory_utilization": config.vllm_gpu_memory_utilization,
        "cpu_kv_cache_gb": config.vllm_cpu_kv_cache_gb,
    },
}


def engine_settings(config: GRPOConfig, name: str) -> dict:
    return {"engine": name, "engine_options": ENGINE_OPTIONS[name](config)}


def score_settings(config: GRPOConfig) -> dict:
    return dict(
        rewards=config.rewards,
        max_error_fraction=config.max_reward_error_fraction,
        reward_options=config.bound_reward_options(),
        workers=config.score_workers,
        chunk_rows=config.score_chunk_rows,
        worker_memory_mb=config.score_worker_memory_mb,
    )


def refill_rounds(
    config: GRPOConfig,
    stages: Stages,
    manifest: Manifest,
    it: int,
    train_path: str,
    policy: str,
    generate_settings: dict,
) -> tuple[list[str], list[str], int]:
    """DAPO dynamic sampling: extra rounds of prompts + generate + score (`prompts-r<k>.parquet`,
    `generations-r<k>.parquet`, `rewards-r<k>.parquet`) while fewer than prompts_per_iteration
    groups have reward spread, at most max_refill_rounds. Returns every round's generations
    and rewards paths (round 0 first) and the number of extra rounds."""
    folder = manifest.folder
    prompts, gens, rewards = (
        [str(folder / "prompts.parquet")],
        [str(folder / "generations.parquet")],
        [str(folder / "rewards.parquet")],
    )
    rounds = 0
    while (
        config.dynamic_sampling
        and rounds < config.max_refill_rounds
        and informative_groups(rewards) < config.prompts_per_iteration
    ):
        rounds += 1
        p, g, r = (str(folder / f"{name}-r{rounds}.parquet") for name in ("prompts", "generations", "rewards"))
        picked = run_stage(
            manifest,
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
        run_stage(
            manifest,
            Path(g).name,
            stages.generate,
            p,
            g,
            policy,
            **generate_settings | {"seed": (config.seed * 100_003 + it) * 1_000 + rounds},
            schema_version=GENERATIONS.version,
        )
        run_stage(
            manifest, Path(r).name, stages.score, g, p, r, **score_settings(config), schema_version=REWARDS.version
        )
        prompts.append(p)
        gens.append(g)
        rewards.append(r)
    return gens, rewards, rounds


@flow(name="grpo-train")
def grpo_train(config: GRPOConfig) -> dict:
    """Run GRPO for `config.iterations` iterations; return the final metrics."""
    take_over_sigterm()  # SIGTERM stops `grpo run` as Ctrl-C does (flows/stopping.py)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    hold_run_folder(run_dir)  # before touching anything: another process may be writing here
    PENDING_UPDATES.clear()
    stages = None
    try:
        stages = stages_for(config)  # where each stage runs (flows/cluster.py): this process, or a Ray cluster
        # The one place the flow talks to MLflow / TensorBoard (flows/tracking.py): they read
        # the metrics files this flow writes, after each iteration and at the end.
        with Tracking(config) as tracking:
            metrics = train_iterations(config, stages, tracking.iteration_done)
            return metrics | tracking.register(metrics)
    finally:
        settle_background_saves()  # no writer of this run outlives it either (the folder's lock is released below)
        if stages is not None:
            stages.close()  # no worker of this run outlives it
        VIEWS.drain()  # the stage artifacts and learning curve of the last iteration too
        release_run_folder(run_dir)


def rotate_checkpoints(run_dir: Path, keep: int | None, log) -> None:
    """Remove checkpoints beyond `keep`. A failure only warns: the checkpoints are all still
    there and the next save tries again. Raised on the background writer's thread it would
    read, at the next update, as if the new checkpoint had not been written."""
    try:
        pruned = prune_checkpoints(run_dir, keep)
    except OSError as err:
        log.warning(f"{run_dir}: old checkpoints could not be removed ({err}); the next save tries again")
        return
    if pruned["checkpoints"]:
        log.info(
            f"removed checkpoints of iterations {', '.join(map(str, pruned['checkpoints']))} (save_total_limit {keep})"
        )


def settle_background_saves() -> None:
    """Wait for a checkpoint still being written when the flow fails; its own failure is
    logged, never raised over the error that stopped the flow."""
    try:
        wait_for_saves()
    except Exception as err:  # noqa: BLE001 - already failing: say it, keep the first error
        logging.getLogger("grpoflow").error(str(err))


def longest_prompt_tokens(prompts_path: str, tokenizer, use_chat_template: bool, candidates: int = 16) -> int:
    """Tokens of the longest prompt, as the model sees it (chat template included): the
    `candidates` longest by characters are tokenized, not the whole file."""
    table = read_table(prompts_path, PROMPTS, columns=["prompt_id", "prompt", "messages"]).to_pylist()
    rows = sorted(table, key=lambda r: len(r["prompt"] or json.dumps(r["messages"])), reverse=True)[:candidates]
    return max(
        (
            len(tokenizer(render_prompt(r, tokenizer, use_chat_template), add_special_tokens=False)["input_ids"])
            for r in rows
        ),
        default=0,
    )


def print_start_block(config: GRPOConfig, base_model: str, data_manifest: Manifest, eval_path: str | None) -> None:
    """The few lines a run prints before its first stage: what is trained on what, the key
    settings, and the update's estimated peak memory against the machine's (a warning when
    it does not fit)."""
    from tasks.model import load_tokenizer, pick_device, pick_dtype

    entries = data_manifest.entries()
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    shape = model_shape(base_model)
    prompt_tokens = longest_prompt_tokens(
        str(data_manifest.folder / "prompts.parquet"), load_tokenizer(base_model), config.use_chat_template
    )
    trained = lora_trained_parameters(shape, config.lora_rank) if config.lora_rank else None
    peak = update_peak_bytes(
        shape,
        micro_batch=config.micro_batch_size,
        sequence=prompt_tokens + config.max_new_tokens,
        completion=config.max_new_tokens,
        dtype_bytes=dtype.itemsize,
        checkpointing=config.gradient_checkpointing,
        logprob_chunk_tokens=config.logprob_chunk_tokens,
        trained_parameters=trained,
    )
    have, what = machine_memory_bytes(str(device))
    held_out = (
        f", {entries['eval.parquet']['rows']:,} held-out"
        if eval_path is not None and "eval.parquet" in entries
        else ", no held-out set"
    )
    keep = "all kept" if config.save_total_limit is None else f"newest {config.save_total_limit} kept"
    lines = [
        f"model     {config.model or 'built-in tiny model'} ({shape.parameters / 1e6:,.1f}M parameters{', LoRA rank ' + str(config.lora_rank) if config.lora_rank else ''}, "
        f"{str(dtype).removeprefix('torch.')} on {device})",
        f"data      {entries.get('prompts.parquet', {}).get('rows', 0):,} training prompts{held_out}; longest prompt {prompt_tokens} tokens",
        f"rewards   {', '.join(f'{name} x{weight:g}' for name, weight in config.rewards.items())}",
        f"settings  {config.iterations} iterations x {config.prompts_per_iteration} prompts x {config.group_size} completions, "
        f"{config.max_new_tokens} new tokens, lr {config.learning_rate:g}, micro-batch {config.micro_batch_size}, "
        f"gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}, checkpoint every {config.save_every} ({keep})",
        f"memory    update peak ~{gib(peak)} (estimated) of {gib(have)} {what}",
    ]
    print("\n".join(f"grpo: {line}" for line in lines), file=sys.stderr)
    if peak > have:
        print(
            f"grpo: warning: the update's estimated peak ({gib(peak)}) exceeds this machine's {what} ({gib(have)}): lower "
            "--micro-batch-size, turn on --gradient-checkpointing or shorten --max-new-tokens",
            file=sys.stderr,
        )


def write_config_record(run_dir: Path, config: GRPOConfig, log) -> None:
    """config.json: the settings in force, what produced the run, and every mid-run change
    of a setting (flows.config.MID_RUN_SAFE) with the first iteration it applies to. A
    meaning-changing difference from the stored settings is refused here too (for callers
    of the flow that bypass the command line), before config.json is touched."""
    changes = setting_changes(run_dir, config)
    path = run_dir / "config.json"
    history = json.loads(path.read_text()).get("changes", []) if path.is_file() else []
    if changes:
        first = completed_iterations(run_dir) + 1
        history.append(
            {
                "from_iteration": first,
                "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "changed": {k: {"stored": old, "given": new} for k, (old, new) in sorted(changes.items())},
            }
        )
        log.info(f"settings changed on resume, from iteration {first}: {describe_changes(changes)}")
    atomic_write_json(
        path,
        {
            "config": config.model_dump(mode="json"),
            "versions": versions(),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "changes": history,
        },
    )


def loss_settings(config: GRPOConfig) -> LossSettings:
    """The objective's settings of a run (also what benchmarks/bench_update.py replays)."""
    return LossSettings(
        epsilon_low=config.epsilon,
        epsilon_high=config.epsilon if config.epsilon_high is None else config.epsilon_high,
        beta=config.beta,
        temperature=config.temperature,
        importance_sampling=config.importance_sampling_level,
        aggregation=config.loss_aggregation,
        max_completion_length=config.max_new_tokens,
        mask_truncated_completions=config.mask_truncated_completions,
        mismatch_correction=config.mismatch_correction,
        mismatch_cap=config.mismatch_cap,
    )


def train_iterations(config: GRPOConfig, stages: Stages, iteration_done: Callable[[], None] = lambda: None) -> dict:
    """The body of `grpo_train` (which holds the run folder's lock around it).
    `iteration_done` is called after each iteration's metrics are written."""
    log = get_run_logger()
    run_dir = Path(config.run_dir)
    remove_stale_temp_files(run_dir)  # leftovers of a killed writer are never artifacts
    write_config_record(run_dir, config, log)
    data_dir = run_dir / "dataset"
    data_manifest = Manifest(data_dir)

    base_model = prepare_model_task(config)
    train_path, eval_path = str(data_dir / "prompts.parquet"), str(data_dir / "eval.parquet")
    if config.uses_builtin_data():
        run_stage(data_manifest, "prompts.parquet", write_builtin_prompts_task, train_path, held_out=False, size=0)
        run_stage(
            data_manifest, "eval.parquet", write_builtin_prompts_task, eval_path, held_out=True, size=config.eval_size
        )
    elif config.datasets is None:
        run_stage(
            data_manifest,
            "prompts.parquet",
            ingest_task,
            config.dataset,
            train_path,
            split=config.dataset_split,
            task=config.task,
            skip_invalid=config.skip_invalid,
            rejected_path=str(data_dir / "rejected.parquet"),
        )
    else:  # several datasets: each ingested on its own, then one prompts file drawn from by weight
        parts = [str(data_dir / f"source-{k}.parquet") for k in range(len(config.datasets))]
        for k, (source, part) in enumerate(zip(config.datasets, parts)):
            run_stage(
                data_manifest,
                Path(part).name,
                ingest_task,
                source,
                part,
                split=config.dataset_split,
                task=config.task,
                skip_invalid=config.skip_invalid,
                rejected_path=str(data_dir / f"rejected-{k}.parquet"),
            )
        run_stage(data_manifest, "prompts.parquet", merge_prompts_task, parts, train_path)
    if not config.uses_builtin_data():
        if config.eval_dataset is None:
            eval_path = None
        else:
            run_stage(
                data_manifest,
                "eval.parquet",
                ingest_task,
                config.eval_dataset,
                eval_path,
                split=config.dataset_split,
                task=config.task,
                skip_invalid=config.skip_invalid,
                limit=config.eval_size,
            )

    print_start_block(config, base_model, data_manifest, eval_path)
    machine = {"device": config.device, "dtype": config.dtype}
    prompt_limit = dict(
        max_prompt_length=config.max_prompt_length, prompt_overflow=config.prompt_overflow, stop=config.stop
    )
    evaluate = dict(
        rewards=config.rewards,
        reward_options=config.bound_reward_options(),
        max_new_tokens=config.max_new_tokens,
        use_chat_template=config.use_chat_template,
        **prompt_limit,
        **engine_settings(config, config.eval_engine or config.generation_engine),
        **machine,
    )
    loss = loss_settings(config)
    generate_settings = dict(
        group_size=config.group_size,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        batch_size=config.generation_batch_size,
        # LoRA: the reference is the policy's frozen base, adapter disabled; nothing to load
        reference_path=base_model if config.beta > 0 and not config.lora_rank else None,
        reference_from_base=config.beta > 0 and bool(config.lora_rank),
        use_chat_template=config.use_chat_template,
        top_k=config.top_k,
        min_p=config.min_p,
        repetition_penalty=config.repetition_penalty,
        **prompt_limit,
        with_old_logprobs=config.store_old_logprobs or needs_old_logprobs(config.mu, config.mini_batches),
        logprob_chunk_tokens=config.logprob_chunk_tokens,
        **engine_settings(config, config.generation_engine),
        **machine,
    )
    steps_per_iteration = config.mu * config.mini_batches
    lr_schedule = LRSchedule(
        config.learning_rate, config.lr_scheduler, config.iterations * steps_per_iteration, config.warmup_ratio
    )
    warnings = RunWarnings()
    mix = (
        None
        if config.datasets is None
        else [(source_label(s, split=config.dataset_split), w) for s, w in config.datasets.items()]
    )
    warnings.say(
        log,
        "tokenizer",
        tokenization_warning(check_prompts_task(train_path, base_model, config.use_chat_template), base_model),
    )
    too_long = {"prompts/truncated": 0, "prompts/skipped": 0}

    policy = base_model
    metrics: dict = {}
    start: dict = {}
    if eval_path is not None:
        start = run_stage(Manifest(iteration_dir(run_dir, 0)), "eval", evaluate_task, eval_path, policy, **evaluate)
        write_metrics(run_dir, 0, {"iteration": 0, "held_out_accuracy": start["accuracy"]})
        iteration_done()
        log.info(f"iteration 0: held-out accuracy {start['accuracy']:.1%} (before GRPO, {start['problems']} problems)")

    first = 1
    resumed = resume_point(run_dir, config.iterations)
    if resumed is not None:
        first, policy, metrics = resumed.iteration + 1, resumed.checkpoint, saved_metrics(run_dir, resumed.iteration)
        log.info(
            f"resuming after iteration {resumed.iteration}: policy and optimiser state from iter-{resumed.iteration:04d}/{CHECKPOINT}"
        )
    if first <= config.iterations and (chosen := start_policy(run_dir, first)) is not None:
        policy = chosen  # a scheduled run told to start from the registered champion (flows/serve.py)
        log.info(f"iteration {first} starts from {policy}")
    for it in range(first, config.iterations + 1):
        started = time.perf_counter()
        folder = iteration_dir(run_dir, it)
        manifest = Manifest(folder)
        prompts, gens, rewards, advs = (
            str(folder / f) for f in ("prompts.parquet", "generations.parquet", "rewards.parquet", "advantages.parquet")
        )
        checkpoint = str(folder / CHECKPOINT)
        save = it % config.save_every == 0 or it == config.iterations

        pool, before_pool = prompt_pool(data_manifest, train_path, it)  # scheduled runs add pools of unseen prompts
        run_stage(
            manifest,
            "prompts.parquet",
            select_prompts_task,
            pool,
            prompts,
            iteration=it - before_pool,
            per_iteration=config.prompts_per_iteration,
            seed=config.seed,
            mix=mix,
            schema_version=PROMPTS.version,
        )
        gen = run_stage(
            manifest,
            "generations.parquet",
            stages.generate,
            prompts,
            gens,
            policy,
            **generate_settings,
            seed=config.seed * 100_003 + it,
            schema_version=GENERATIONS.version,
        )
        score = run_stage(
            manifest,
            "rewards.parquet",
            stages.score,
            gens,
            prompts,
            rewards,
            **score_settings(config),
            schema_version=REWARDS.version,
        )
        all_gens, all_rewards, rounds = refill_rounds(
            config, stages, manifest, it, train_path, policy, generate_settings
        )
        adv = run_stage(
            manifest,
            "advantages.parquet",
            advantages_task,
            all_rewards,
            advs,
            estimator=config.advantage_estimator,
            scale_rewards=config.scale_rewards,
            eps=config.advantage_eps,
            dynamic_sampling=config.dynamic_sampling,
            target_groups=config.prompts_per_iteration,
            schema_version=ADVANTAGES.version,
        )
        warnings.say(log, "no-signal", None if (w := no_signal_warning(adv)) is None else f"{folder.name}: {w}")
        for key in too_long:
            too_long[key] += gen.get(key, 0)
        if gen.get("prompts/truncated") or gen.get("prompts/skipped"):
            done = "truncated from the left" if config.prompt_overflow == "truncate_left" else "skipped"
            warnings.say(
                log,
                "prompt-length",
                f"{folder.name}: {gen.get('prompts/truncated') or gen.get('prompts/skipped')} prompts longer than "
                f"max_prompt_length={config.max_prompt_length} tokens were {done} (counted in prompts/{done.split()[0]})",
            )
        # A done update (replayed when its weights were not saved) keeps the learning rate it
        # ran with, whatever a resume changed since: the replay must give the same weights.
        lr = (
            manifest.entries().get(CHECKPOINT, {}).get("learning_rate", config.learning_rate)
            if manifest.is_done(CHECKPOINT)
            else config.learning_rate
        )
        upd = run_stage(
            manifest,
            CHECKPOINT,
            stages.update,
            all_gens,
            advs,
            policy,
            checkpoint,
            learning_rate=lr,
            loss=loss,
            lr_schedule=dataclasses.replace(lr_schedule, base=lr),
            first_step=(it - 1) * steps_per_iteration,
            mu=config.mu,
            mini_batches=config.mini_batches,
            micro_batch_size=config.micro_batch_size,
            gradient_checkpointing=config.gradient_checkpointing,
            logprob_chunk_tokens=config.logprob_chunk_tokens,
            lora=config.lora_settings(),
            max_grad_norm=config.max_grad_norm,
            weight_decay=config.weight_decay,
            save=save,
            seed=config.seed * 100_003 + it,
            background_save=stages.saves_in_background,
            manifest_extra={"learning_rate": lr},
            **machine,
        )
        policy = checkpoint

        metrics = {
            "iteration": it,
            "reward": score["reward_mean"],
            **gen,
            **adv,
            **upd,
            "dynamic_sampling/rounds": rounds,
            "step_time": time.perf_counter() - started,
            # The settings that may change on resume, as they were for this iteration (grpo inspect shows changes).
            "settings": {k: getattr(config, k) for k in MID_RUN_SAFE} | {"learning_rate": lr},
        }
        metrics["tokens_per_second"] = upd.get("iteration_tokens", math.nan) / metrics["step_time"]
        if eval_path is not None and (it == config.iterations or (config.eval_every and it % config.eval_every == 0)):
            result = run_stage(manifest, "eval", evaluate_task, eval_path, policy, **evaluate)
            metrics["held_out_accuracy"] = result["accuracy"]
        write_metrics(run_dir, it, metrics)
        if save:  # after metrics.json: the new checkpoint is the resumable one once it has landed
            rotate = functools.partial(rotate_checkpoints, run_dir, config.save_total_limit, log)
            if not after_save(
                checkpoint, rotate
            ):  # on the writer's thread after the write, if it writes in the background
                rotate()
        iteration_done()
        VIEWS.refresh_learning_curve(run_dir, force="held_out_accuracy" in metrics or it == config.iterations)
        acc = f", held-out accuracy {metrics['held_out_accuracy']:.1%}" if "held_out_accuracy" in metrics else ""
        log.info(
            f"iteration {it}/{config.iterations}: reward {metrics['reward']:.3f}, kl {upd.get('kl', 0.0):.4f}, "
            f"{gen['completions']} completions, {metrics['step_time']:.1f}s{acc}"
        )
    if start and "held_out_accuracy" in metrics:
        before, after = start["accuracy"], metrics["held_out_accuracy"]
        log.info(
            f"held-out accuracy {before:.1%} -> {after:.1%} ({(after - before) * 100:+.1f} points) on {start['problems']} problems"
        )
        metrics["held_out_accuracy_before"] = before
    wait_for_saves()  # the last checkpoint is on disk (and recorded) before the run says it is done
    if first <= config.iterations:  # the rotation that the last checkpoint, written in the background, has not had yet
        rotate_checkpoints(run_dir, config.save_total_limit, log)
    if any(too_long.values()):
        log.info(
            f"prompts over max_prompt_length={config.max_prompt_length}: {too_long['prompts/truncated']} truncated, "
            f"{too_long['prompts/skipped']} skipped, over iterations {first}-{config.iterations}"
        )
    metrics["final_model"] = export_final(config, policy, machine)
    return metrics


def export_final(config: GRPOConfig, policy: str, machine: dict) -> str:
    """Write <run_dir>/final/ from the last iteration's policy, unless it already holds it
    (a re-run of a finished folder); recorded in the run folder's manifest by iteration."""
    run_dir = Path(config.run_dir)
    manifest = Manifest(run_dir)
    entry = manifest.entries().get(FINAL, {})
    if manifest.is_done(FINAL) and entry.get("iteration") == config.iterations and entry.get("policy") == str(policy):
        return str(run_dir / FINAL)
    manifest.forget(FINAL)  # a newer policy: the old final/ is no longer the run's result
    PENDING_UPDATES.catch_up([policy], get_run_logger())
    with stage_label(FINAL):
        export_final_task(str(policy), str(run_dir), **machine)
    manifest.record(FINAL, iteration=config.iterations, policy=str(policy))
    get_run_logger().info(f"final model (weights and tokenizer, no optimiser state): {run_dir / FINAL}")
    return str(run_dir / FINAL)
