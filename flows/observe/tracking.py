"""Where a run's numbers go besides its folder: MLflow and TensorBoard (`make install-tracking`).

Metrics are written once, by the flow, into ``iter-*/metrics.json`` and ``metrics.parquet``
(DESIGN.md). The sinks here only read those files and send on what they have not sent yet:

* **MLflow** (``--tracking-uri``): one MLflow run per flow run, in the experiment named by
  ``--experiment`` (default: the run folder's name). Every setting is a param, every number
  of metrics.parquet a metric under the same name with step = iteration; each iteration's
  stage reports (the markdown the Prefect UI shows) and, at the end, config.json and the
  learning curve are artifacts. The run's id is kept in ``<run folder>/tracking.json``: a run
  resumed after a crash or an error continues that MLflow run, and sends exactly the
  (metric, step) pairs MLflow does not hold yet. A new flow run on a finished folder (a
  scheduled run of ``grpo serve`` that adds iterations) is a new MLflow run of the same
  experiment, starting at its first new iteration.
* **TensorBoard** (``--tensorboard DIR``): the same metrics as event files (tensorboardX). A
  resumed run tells TensorBoard to drop the events a killed process wrote past the last step
  recorded in tracking.json (``purge_step``), so no step is shown twice.

A sink that cannot send (a server down) logs one warning and tries again after the next
iteration: the files are the truth and it catches up from them. The flow calls `Tracking`
in one place (flows/train.py); no stage function knows about any of this. Nothing here is
imported by a run that tracks nothing, so the default install never needs mlflow.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from data.run_folder import iteration_dir, iteration_numbers
from data.schemas import METRICS, check_schema
from data.store import Manifest
from flows.config import GRPOConfig
from flows.observe.state import read_state, update_state
from flows.observe.views import PLOT_NAME, BackgroundViews, stage_markdown

log = logging.getLogger("grpoflow.tracking")

BATCH = 1000  # MLflow's limit of metrics per log_batch call


def store_uri(value: str) -> str:
    """An MLflow tracking URI from --tracking-uri: URLs (http://, sqlite:///, file:...) as
    they are; a path to a .db/.sqlite file is that SQLite store; any other path is a folder
    holding one (``<folder>/mlflow.db``; MLflow 3 refuses its old folder-of-files store)."""
    if "://" in value or value.startswith("file:"):
        return value
    path = Path(value).expanduser().resolve()
    if path.suffix not in (".db", ".sqlite", ".sqlite3"):
        path = path / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def first_new_iteration(run_dir: Path) -> int:
    """The first iteration a flow run starting now adds: 0 (the baseline evaluation) on a
    folder with no complete iteration, else the one after the last complete one."""
    done = [
        it for it in iteration_numbers(run_dir) if it >= 1 and (iteration_dir(run_dir, it) / "metrics.json").is_file()
    ]
    return max(done) + 1 if done else 0


def metric_rows(run_dir: Path, after: int) -> list[tuple[int, str, float]]:
    """(iteration, name, value) of metrics.parquet for the iterations after `after`."""
    path = run_dir / "metrics.parquet"
    if not path.is_file():
        return []
    check_schema(pq.read_schema(path), METRICS, path)
    table = pq.read_table(path, filters=[("iteration", ">", after)])
    return list(zip(*(table.column(c).to_pylist() for c in ("iteration", "name", "value")), strict=True))


def param_values(config: GRPOConfig) -> dict[str, str]:
    """Every setting as an MLflow param: text, mappings and lists as JSON."""
    out = {}
    for name, value in config.model_dump(mode="json").items():
        out[name] = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return out


def iteration_report(run_dir: Path, it: int) -> str:
    """Every stage report of one iteration (the Prefect artifacts' markdown), in one text."""
    folder = iteration_dir(run_dir, it)
    entries = Manifest(folder).entries()
    return "\n".join(stage_markdown(folder, name, entry.get("summary", {})) for name, entry in entries.items())


# --- sinks ---------------------------------------------------------------------------------
class Sink:
    """Sends the run folder's metrics somewhere; a config asks for it by giving `setting`."""

    name = ""
    setting = ""  # the config field that turns this sink on
    module = ""  # what it needs installed (the `tracking` extra)
    errors: tuple[type[BaseException], ...] = (OSError,)  # what a failed send raises: retried after the next iteration

    @classmethod
    def wanted(cls, config: GRPOConfig) -> bool:
        return getattr(config, cls.setting) is not None

    def sync(self) -> None:
        """Send every metric of metrics.parquet not sent yet."""
        raise NotImplementedError

    def finish(self, failed: bool) -> None:
        raise NotImplementedError


SINKS: dict[str, type[Sink]] = {}


def sink(cls: type[Sink]) -> type[Sink]:
    if cls.name in SINKS:
        raise ValueError(f"sink '{cls.name}' is registered twice")
    SINKS[cls.name] = cls
    return cls


class MissingExtra(ImportError):
    """A setting asks for an optional part that is not installed."""


def require_tracking(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(
            f"{module} is not installed: tracking needs the optional part `make install-tracking` "
            f"(pip install -e '.[tracking]')"
        ) from None


def check_installed(config: GRPOConfig) -> None:
    """Before the flow starts: every sink the config asks for can be imported (found, not loaded)."""
    import importlib.util

    for cls in SINKS.values():
        if cls.wanted(config) and importlib.util.find_spec(cls.module) is None:
            require_tracking(cls.module)  # raises MissingExtra, naming the install


@sink
class MlflowSink(Sink):
    name, setting, module = "mlflow", "tracking_uri", "mlflow"

    def __init__(self, config: GRPOConfig) -> None:
        require_tracking("mlflow")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.errors = (MlflowException, OSError)

        self.run_dir = Path(config.run_dir)
        self.uri = store_uri(config.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.experiment_id = experiment_id(self.client, self.uri, config.experiment or self.run_dir.name)
        recorded = read_state(self.run_dir).get("mlflow") or {}
        first = first_new_iteration(self.run_dir)
        run = self._recorded_run(recorded)
        if run is not None and (run.info.status != "FINISHED" or first > config.iterations):
            # A resume (the last flow run died or failed), or a re-run with nothing to add.
            self.run_id, self.first = run.info.run_id, int(recorded["first_iteration"])
            self.client.update_run(self.run_id, status="RUNNING")
            self._log_params(config, run.data.params)
            self.sent = self._sent_steps(run)
            self.sent_through = -1
            log.info(f"MLflow: continuing run {self.run_id} of experiment {self.experiment_id} at {self.uri}")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{self.run_dir.name} it. {first}-{config.iterations}",
                tags=self._tags(first),
            )
            self.run_id, self.first, self.sent, self.sent_through = run.info.run_id, first, set(), first - 1
            self._log_params(config, {})
            log.info(f"MLflow: run {self.run_id} in experiment {self.experiment_id} at {self.uri}")
        update_state(
            self.run_dir,
            "mlflow",
            lambda _: {
                "tracking_uri": self.uri,
                "experiment_id": self.experiment_id,
                "run_id": self.run_id,
                "first_iteration": self.first,
            },
        )

    def _recorded_run(self, recorded: dict):
        from mlflow.exceptions import MlflowException

        if recorded.get("tracking_uri") != self.uri or not recorded.get("run_id"):
            return None
        try:
            run = self.client.get_run(recorded["run_id"])
        except MlflowException:
            return None  # deleted, or another store under the same name
        return run if run.info.lifecycle_stage == "active" else None

    def _tags(self, first: int) -> dict[str, str]:
        tags = {"grpoflow.run_dir": str(self.run_dir.resolve()), "grpoflow.first_iteration": str(first)}
        try:
            from prefect.runtime import flow_run

            if flow_run.id:
                tags["prefect.flow_run_id"] = str(flow_run.id)
        except ImportError:
            pass
        return tags  # the package versions are in the config.json artifact

    def _log_params(self, config: GRPOConfig, existing: dict[str, str]) -> None:
        """Params are immutable in MLflow: a setting that changed on a resume is recorded as a
        tag `changed.<name>` (the param keeps the value the run started with)."""
        from mlflow.entities import Param, RunTag

        values = param_values(config)
        new = [Param(k, v) for k, v in values.items() if k not in existing]
        changed = [RunTag(f"changed.{k}", v) for k, v in values.items() if k in existing and existing[k] != v]
        for i in range(0, max(len(new), 1), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.run_id, params=new[i : i + 100], tags=changed if i == 0 else [])

    def _sent_steps(self, run) -> set[tuple[str, int]]:
        return {(key, m.step) for key in run.data.metrics for m in self.client.get_metric_history(self.run_id, key)}

    def sync(self) -> None:
        from mlflow.entities import Metric

        rows = [
            r
            for r in metric_rows(self.run_dir, max(self.first, self.sent_through + 1) - 1)
            if (r[1], r[0]) not in self.sent
        ]
        if not rows:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, it) for it, name, value in rows]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + BATCH])
        self.sent_through = max(r[0] for r in rows)
        self.sent = set()  # from here on every sent pair is at or before sent_through
        # After the metrics are marked sent: a report that fails to upload is not worth sending them twice.
        for it in sorted({r[0] for r in rows}):
            self.client.log_text(self.run_id, iteration_report(self.run_dir, it), f"stage_reports/iter-{it:04d}.md")

    def finish(self, failed: bool) -> None:
        for name in ("config.json", PLOT_NAME):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        data = self.run_dir / "dataset"
        if Manifest(data).entries():
            report = "\n".join(
                stage_markdown(data, n, e.get("summary", {})) for n, e in Manifest(data).entries().items()
            )
            self.client.log_text(self.run_id, report, "stage_reports/dataset.md")
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def experiment_id(client, uri: str, name: str) -> str:
    """The id of experiment `name`, created if needed. A SQLite store keeps its artifacts
    beside the database file (MLflow's default would be ./mlruns in the working folder)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage != "active":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        location = (db.parent / f"{db.stem}-artifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


@sink
class TensorBoardSink(Sink):
    name, setting, module = "tensorboard", "tensorboard", "tensorboardX"

    def __init__(self, config: GRPOConfig) -> None:
        tensorboardX = require_tracking("tensorboardX")
        self.run_dir = Path(config.run_dir)
        self.logdir = str(Path(config.tensorboard).expanduser().resolve())
        recorded = read_state(self.run_dir).get("tensorboard") or {}
        self.sent_through = int(recorded["sent_through"]) if recorded.get("logdir") == self.logdir else -1
        # purge_step: TensorBoard hides what an earlier, killed writer logged at these steps or later.
        self.writer = tensorboardX.SummaryWriter(
            self.logdir, purge_step=self.sent_through + 1 if self.sent_through >= 0 else None
        )

    def sync(self) -> None:
        rows = metric_rows(self.run_dir, self.sent_through)
        if not rows:
            return
        for it, name, value in rows:
            self.writer.add_scalar(name, value, global_step=it)
        self.writer.flush()
        self.sent_through = max(r[0] for r in rows)
        update_state(self.run_dir, "tensorboard", lambda _: {"logdir": self.logdir, "sent_through": self.sent_through})

    def finish(self, failed: bool) -> None:
        self.writer.close()


# --- what the flow calls ---------------------------------------------------------------------
class Tracking:
    """The sinks a config asks for (none: every method does nothing and nothing is imported).

    `iteration_done` after each iteration's metrics are written: the sinks send them from the
    views' background thread, so an iteration never waits on a tracking server. The registry
    (flows/observe/registry.py) registers the final model through its MLflow sink. Used as a context manager by the
    flow: leaving it sends the rest and ends every sink, FINISHED or FAILED."""

    def __init__(self, config: GRPOConfig, views: BackgroundViews) -> None:
        self.config = config
        self.views = views  # the flow run's background thread: sinks send from there
        self.sinks = [cls(config) for cls in SINKS.values() if cls.wanted(config)]
        self._warned: set[str] = set()

    def _sync(self, s: Sink) -> None:
        try:
            s.sync()
            self._warned.discard(s.name)
        except s.errors as err:  # the files are the truth: retried after the next iteration, never fails the run
            if s.name not in self._warned:
                log.warning(
                    f"{s.name}: metrics not sent yet, retried after the next iteration ({type(err).__name__}: {err})"
                )
                self._warned.add(s.name)

    def iteration_done(self) -> None:
        for s in self.sinks:
            self.views.submit(self._sync, s)

    @property
    def mlflow(self) -> MlflowSink | None:
        """The MLflow sink, when the run tracks to MLflow (the registry needs it)."""
        return next((s for s in self.sinks if isinstance(s, MlflowSink)), None)

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.views.drain()  # the syncs still queued
        for s in self.sinks:
            try:
                s.sync()
                s.finish(failed=error is not None)
            except s.errors as err:
                if error is None:
                    raise  # the run is done on disk: re-running the folder sends the rest
                log.warning(f"{s.name}: not closed after the run's own error ({type(err).__name__}: {err})")


# --- re-scorings -----------------------------------------------------------------------------
def log_rescoring(run_dir: str | Path, tag: str, rewards: dict[str, float], results: list[dict[str, Any]]) -> None:
    """A re-scoring (`grpo rescore`) of a tracked run folder is one MLflow run of the folder's
    experiment, named ``rescore@TAG`` and nested under its latest training run: per
    iteration (step) the mean reward with the new rewards (`reward`), the original's
    (`reward_before`) and how many rows changed (`changed`). Nothing happens for a folder
    that was never tracked; an interrupted re-scoring that goes on continues its run."""
    run_dir = Path(run_dir)
    recorded = read_state(run_dir).get("mlflow")
    if not recorded:
        return
    require_tracking("mlflow")
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=recorded["tracking_uri"])
    run_id = (read_state(run_dir).get("rescores") or {}).get(tag)
    try:
        existing = client.get_run(run_id) if run_id else None
    except MlflowException:
        existing = None
    if existing is None:
        run_id = client.create_run(
            recorded["experiment_id"],
            run_name=f"rescore@{tag}",
            tags={
                "mlflow.parentRunId": recorded["run_id"],
                "grpoflow.rescore_tag": tag,
                "grpoflow.run_dir": str(run_dir.resolve()),
            },
        ).info.run_id
        client.log_batch(run_id, params=[Param("tag", tag), Param("rewards", json.dumps(rewards, sort_keys=True))])
        update_state(run_dir, "rescores", lambda runs: (runs or {}) | {tag: run_id})
    now, metrics = int(time.time() * 1000), []
    for result in results:
        it = int(Path(result["folder"]).name.removeprefix("iter-"))
        for name, value in (
            ("reward", result["mean_after"]),
            ("reward_before", result["mean_before"]),
            ("changed", result["changed"]),
        ):
            if value is not None:
                metrics.append(Metric(name, float(value), now, it))
    for i in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + BATCH])
    client.set_terminated(run_id, status="FINISHED")
