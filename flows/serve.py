"""`grpo serve`: scheduled retraining of one run folder.

    grpo serve --cron "0 3 * * *" --run-dir runs/prod --dataset data/prompts.jsonl --iterations 5

serves a Prefect deployment (``flow.serve``) of the `grpo_scheduled` flow. Each of its runs

1. reads the run folder's config.json (the settings given to `grpo serve` win; on an empty
   folder they are the whole config), and finds the last complete iteration L;
2. reads the dataset again (it may have grown since the last run) and keeps the prompts no
   earlier iteration trained on, compared by prompt_id (a content hash), in
   ``dataset/prompts-from-<L+1>.parquet``;
3. runs the training flow up to iteration L + `iterations` (fewer when the unseen prompts
   do not fill that many iterations; none, and says so, when they fill not even one). The
   training flow starts from the latest checkpoint in the folder (flows/resume.py) and the
   new iterations draw their prompts from the new file. With ``--register-as`` (and
   ``train_from`` "champion", the default) iteration L+1 starts from the registered
   champion instead when the latest checkpoint is not the champion (an un-promoted run is
   not trained on), and each run's final model goes through the promotion gate
   (flows/observe/registry.py).

A run that dies half-way is finished by the next one: the same resume rules as `grpo run`.
The deployment runs one flow run at a time (two runs must never write one folder; the
folder's lock also refuses a second writer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from data.run_folder import completed_iterations, iteration_dir, pool_name, record_start_policy, resume_point
from data.store import Manifest
from flows.config import GRPOConfig
from flows.observe.registry import champion_start
from flows.resume import stored_settings
from flows.runner import StageRunner
from flows.train import grpo_train, write_builtin_prompts_task
from tasks.fresh_prompts import unseen_prompts_task
from tasks.ingest import ingest_task

FLOW_NAME = "grpo-scheduled"


def continued_config(run_dir: str | Path, settings: dict[str, Any] | None) -> GRPOConfig:
    """The run folder's own config, with `settings` (what `grpo serve` was given) on top."""
    run_dir = Path(run_dir)
    return GRPOConfig(**(stored_settings(run_dir) | (settings or {}) | {"run_dir": run_dir}))


def last_complete_iteration(run_dir: str | Path) -> int:
    """The highest iteration with its metrics.json written (0 for a new folder)."""
    return completed_iterations(run_dir)


def write_candidates(config: GRPOConfig, out_path: str) -> dict:
    """The dataset as it is now, as a prompts artifact (the same stage `grpo run` uses)."""
    if config.uses_builtin_data():
        return write_builtin_prompts_task(out_path, held_out=False, size=0)
    return ingest_task(
        config.dataset,
        out_path,
        split=config.dataset_split,
        task=config.task,
        skip_invalid=config.skip_invalid,
        rejected_path=str(Path(out_path).with_name("incoming-rejected.parquet")),
    )


@flow(name=FLOW_NAME)
def grpo_scheduled(run_dir: str, settings: dict[str, Any] | None = None, iterations: int = 1) -> dict:
    """One scheduled run: add up to `iterations` iterations to `run_dir`, trained on prompts
    none of its iterations has used, starting from its latest checkpoint."""
    # The work is in a plain function on purpose: `flow.serve` ships this flow function to
    # each run's process by value (cloudpickle), with copies of only the globals it names;
    # code reached through a module-level function is imported there normally instead.
    return continue_run(run_dir, settings, iterations)


def continue_run(run_dir: str | Path, settings: dict[str, Any] | None, iterations: int) -> dict:
    """The body of `grpo_scheduled` (steps 1-3 of this module's docstring)."""
    log = get_run_logger()
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    config = continued_config(folder, settings)
    last = last_complete_iteration(folder)
    data_dir = folder / "dataset"
    data_manifest = Manifest(data_dir)

    pool = pool_name(last + 1)
    if not Manifest(iteration_dir(folder, last + 1)).is_done("prompts.parquet"):
        # No iteration has drawn from a pool made for iteration L+1 yet: make it again from
        # the dataset as it is now (it may have grown since a run that found nothing new).
        data_manifest.forget(pool)
    if not data_manifest.is_done(pool):
        incoming = data_dir / "incoming.parquet"
        write_candidates(config, str(incoming))
        seen = [str(p) for p in sorted(folder.glob("iter-*/prompts.parquet"))]
        with StageRunner(log) as runner:
            runner.run(
                data_manifest,
                pool,
                unseen_prompts_task,
                str(incoming),
                seen,
                str(data_dir / pool),
                manifest_extra={"first_iteration": last + 1},
            )
        incoming.unlink()
        incoming.with_name("incoming-rejected.parquet").unlink(missing_ok=True)
    unseen = data_manifest.entries()[pool]["rows"]

    new = min(iterations, unseen // config.prompts_per_iteration)
    if new == 0:
        # Leave no pool behind that no iteration uses: `grpo run` would draw from it.
        data_manifest.forget(pool)
        (data_dir / pool).unlink(missing_ok=True)
        log.info(
            f"{unseen} unseen prompts, fewer than prompts_per_iteration ({config.prompts_per_iteration}): no new "
            "iteration; waiting for new prompts"
        )
        return {"iterations_added": 0, "last_iteration": last, "unseen_prompts": unseen}
    resumed = resume_point(folder, last)
    start = f"iter-{resumed.iteration:04d}/checkpoint" if resumed else (config.model or "the built-in tiny model")
    champion = champion_start(config)
    if (
        champion is not None
        and champion != (resumed.checkpoint if resumed else None)
        and record_start_policy(folder, last + 1, champion)
    ):
        start = f"the champion of {config.register_as} ({champion}), not {start}"
    log.info(f"adding iterations {last + 1}..{last + new} on {unseen} unseen prompts, starting from {start}")
    metrics = grpo_train(config.model_copy(update={"iterations": last + new}))
    return {"iterations_added": new, "last_iteration": last + new, "unseen_prompts": unseen, **metrics}


def serve(run_dir: str | Path, *, cron: str | None, settings: dict[str, Any], iterations: int, name: str) -> None:
    """Serve the deployment `grpo-scheduled/<name>` until interrupted (Ctrl-C / SIGTERM)."""
    from prefect.deployments.runner import EntrypointType

    grpo_scheduled.serve(
        name=name,
        cron=cron,
        parameters={"run_dir": str(run_dir), "settings": settings, "iterations": iterations},
        description=(
            f"Continue {run_dir} with up to {iterations} iteration(s) on prompts it has not seen, from its latest "
            "checkpoint."
        ),
        limit=1,  # runs of this deployment one after the other: they share the run folder
        # A module path works wherever grpoflow is installed, whatever the working directory.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
