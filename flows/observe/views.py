"""What a run shows besides its artifacts: one Prefect artifact per stage, so the Prefect UI
shows the numbers `grpo inspect` prints, and a learning-curve PNG in the run folder.

Both are read-only views built from the files the stages wrote; a failure to build or
publish one is logged and never fails the stage it describes. The flows build them on one
background thread (`BackgroundViews`, one per flow run: flows/runner.py): on the tiny model
the Prefect API round trips and matplotlib took 0.4 s of a 1.3 s iteration when the flow
waited for them (benchmarks/RESULTS.md). The plot is CPU work under the GIL, which a thread
does not hide, so it is also rate-limited to at most PLOT_BUDGET of the wall time: every
iteration on real models, every few on tiny ones, and always when asked to (held-out
accuracy points, the last iteration). The stage reports are too (REPORT_BUDGET): they read
the stage's files and make an API round trip, about 0.09 s of CPU per iteration, 15% of a
tiny-model iteration on a second thread that holds the GIL against the stages. A report over
budget waits, and only the latest one of each stage is kept: the next report under budget,
or the end of the flow (`drain`), publishes it, so the Prefect UI always ends on the last
iteration of every stage.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.schemas import SchemaError
from data.store import atomic_path
from flows.observe.inspection import artifact_kind, load_groups, sibling_paths

log = logging.getLogger("grpoflow.report")

PLOT_NAME = "learning_curve.png"
PLOT_BUDGET = 0.05  # largest share of wall time spent redrawing the learning curve
REPORT_BUDGET = 0.05  # largest share of wall time spent building and publishing stage reports
EXAMPLE_GROUPS = 3  # groups whose best and worst completion a rewards/advantages artifact shows
TEXT_LIMIT = 160  # characters of a prompt or completion shown in a Prefect artifact


# --- Prefect artifacts -----------------------------------------------------------------------
def artifact_key(folder: Path, output: str) -> str:
    """Prefect keys allow [a-z0-9-]: "<run>-<stage>", e.g. "exp1-rewards-at-v2". One key per
    run and stage, so the UI shows the latest iteration and keeps the others as history."""
    stage = output.removesuffix(".parquet").replace("@", "-at-")
    run = folder.parent.name if folder.name.startswith("iter-") or folder.name == "dataset" else folder.name
    return re.sub(r"[^a-z0-9]+", "-", f"{run}-{stage}".lower()).strip("-")[:100]


def _md(text: Any) -> str:
    """One table cell: no pipes or newlines, at most TEXT_LIMIT characters."""
    text = "" if text is None else str(text)
    text = text.replace("\n", " ⏎ ").replace("|", "\\|")
    return text if len(text) <= TEXT_LIMIT else text[: TEXT_LIMIT - 1] + "…"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.4g}"
    return _md(value)


def _reward_statistics(path: Path) -> list[str]:
    schema = pq.read_schema(path)
    columns = ["reward"] + [n for n in schema.names if n.startswith("reward/")]
    table = pq.read_table(path, columns=columns)
    lines = ["", "| reward | mean | std | min | max | unscored rows |", "|---|---|---|---|---|---|"]
    for name in columns:
        values = table.column(name)
        nan = pc.is_nan(values)
        valid = pc.filter(values, pc.invert(nan))
        stats = (
            [
                pc.mean(valid).as_py(),
                pc.stddev(valid, ddof=1).as_py() if len(valid) > 1 else 0.0,
                pc.min(valid).as_py(),
                pc.max(valid).as_py(),
            ]
            if len(valid)
            else [None] * 4
        )
        lines.append(
            f"| {name} | "
            + " | ".join("" if v is None else f"{v:.4g}" for v in stats)
            + f" | {pc.sum(nan).as_py() or 0} |"
        )
    return lines


def _best_and_worst(path: Path) -> list[str]:
    kind, tag = artifact_kind(path)
    first = next(pq.ParquetFile(path).iter_batches(batch_size=1024, columns=["prompt_id"]), None)
    if first is None:
        return []
    ids = list(dict.fromkeys(first.column("prompt_id").to_pylist()))[:EXAMPLE_GROUPS]
    groups = load_groups(sibling_paths(path, kind, tag), ids)
    lines = [
        "",
        f"Best and worst completion of the first {len(ids)} groups:",
        "",
        "| prompt | gold | best | reward | worst | reward |",
        "|---|---|---|---|---|---|",
    ]
    for g in groups:
        scored = [
            row for row in g.completions if isinstance(row.get("reward"), float) and not math.isnan(row["reward"])
        ]
        if not scored:
            continue
        best = max(scored, key=lambda row: row["reward"])
        worst = min(scored, key=lambda row: row["reward"])
        lines.append(
            f"| {_md(g.prompt)} | {_md(g.gold)} | {_md(best.get('completion'))} | {best['reward']:.3g} "
            f"| {_md(worst.get('completion'))} "
            f"| {worst['reward']:.3g} |"
        )
    return lines


def stage_markdown(folder: Path, output: str, summary: dict[str, Any]) -> str:
    """The artifact of one stage: its summary (counts, timings, metrics) and, for rewards and
    advantages, reward statistics per function and the best and worst completion of a few
    groups."""
    lines = [f"### {folder.parent.name}/{folder.name}/{output}", "", "| | |", "|---|---|"]
    lines += [f"| {_md(k)} | {_fmt(v)} |" for k, v in summary.items() if not isinstance(v, (dict, list))]
    path = folder / output
    if path.suffix == ".parquet" and path.is_file():
        kind, _ = artifact_kind(path)
        if kind == "rewards":
            lines += _reward_statistics(path)
        if kind in ("rewards", "advantages"):
            lines += _best_and_worst(path)
    return "\n".join(lines) + "\n"


def publish_stage_report(folder: str | Path, output: str, summary: dict[str, Any]) -> None:
    """Publish `stage_markdown` as a Prefect artifact, inside a flow run only (tests and
    benchmarks that call stages directly publish nothing)."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    folder = Path(folder)
    try:
        create_markdown_artifact(
            markdown=stage_markdown(folder, output, summary),
            key=artifact_key(folder, output),
            description=f"{folder.name}/{output}",
        )
    except (OSError, ValueError, KeyError, SchemaError, pa.ArrowException, httpx.HTTPError) as err:
        log.warning(f"{folder.name}/{output}: no Prefect artifact ({type(err).__name__}: {err})")


# --- learning curve ----------------------------------------------------------------------------
def learning_curve_points(run_dir: str | Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(iteration, mean reward) and (iteration, held-out accuracy) from every metrics.json."""
    rewards, accuracy = [], []
    for path in sorted(Path(run_dir).glob("iter-*/metrics.json")):
        metrics = json.loads(path.read_text())
        it = int(metrics.get("iteration", path.parent.name.removeprefix("iter-")))
        reward = metrics.get("reward")
        if isinstance(reward, (int, float)) and not math.isnan(reward) and it > 0:
            rewards.append((it, float(reward)))
        if isinstance(metrics.get("held_out_accuracy"), (int, float)):
            accuracy.append((it, float(metrics["held_out_accuracy"])))
    return rewards, accuracy


def plot_learning_curve(run_dir: str | Path) -> Path | None:
    """Write <run_dir>/learning_curve.png: mean training reward and held-out accuracy per
    iteration. Rewritten atomically, so a viewer never reads half."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rewards, accuracy = learning_curve_points(run_dir)
    if not rewards and not accuracy:
        return None
    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lines = []
    if rewards:
        lines += ax.plot(*zip(*rewards, strict=True), color="tab:blue", label="mean reward (training prompts)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean reward", color="tab:blue")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    if accuracy:
        lines += right.plot(*zip(*accuracy, strict=True), "o-", color="tab:orange", label="held-out accuracy")
    right.set_ylim(0, 1)
    right.set_ylabel("held-out accuracy", color="tab:orange")
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right")
    ax.set_title(Path(run_dir).name)
    # Fixed margins: tight_layout measured every tick label on each refresh (a third of the plot's time).
    fig.subplots_adjust(left=0.09, right=0.89, bottom=0.12, top=0.92)
    out = Path(run_dir) / PLOT_NAME
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out


# --- building the views off the flow's thread ------------------------------------------------------
class BackgroundViews:
    """Runs the view builders above on one background thread, in submission order, so an
    iteration never waits for them. Each job runs in a copy of the submitter's context (the
    Prefect flow run it belongs to). A learning-curve refresh still waiting in the queue is
    not queued twice. `drain()` waits for everything submitted; each flow calls it before
    returning, so a finished run has every view."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grpoflow-views")
        self._jobs: list[Future] = []
        self._plots_waiting: set[Path] = set()
        self._next_plot_at = 0.0  # monotonic time before which an unforced refresh is skipped
        self._reports_since: float | None = None  # when the first stage report was asked for
        self._report_seconds = 0.0  # spent on stage reports since then
        self._held: dict[
            str, tuple[contextvars.Context, Path, str, dict]
        ] = {}  # over budget: the latest report per key
        self._lock = threading.Lock()

    def _submit(self, fn, *args, context: contextvars.Context | None = None) -> None:
        job = self._pool.submit((context or contextvars.copy_context()).run, fn, *args)
        with self._lock:
            self._jobs = [j for j in self._jobs if not j.done()] + [job]

    def submit(self, fn, *args) -> None:
        """Run `fn(*args)` on the views' thread, after everything submitted before it."""
        self._submit(fn, *args)

    def publish_stage_report(self, folder: str | Path, output: str, summary: dict[str, Any]) -> None:
        """Publish the stage's report in the background, or, while reports have taken more than
        REPORT_BUDGET of the wall time, hold it until the next report or the flow's end."""
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is None:  # read here: the flow run is the submitter's
            return
        folder = Path(folder)
        now = time.monotonic()
        with self._lock:
            if self._reports_since is None:
                self._reports_since = now
            self._held[artifact_key(folder, output)] = (contextvars.copy_context(), folder, output, dict(summary))
            if self._report_seconds > REPORT_BUDGET * (now - self._reports_since):
                return
            held, self._held = list(self._held.values()), {}
        for context, *args in held:
            self._submit(self._report, *args, context=context)

    def _report(self, folder: Path, output: str, summary: dict) -> None:
        started = time.monotonic()
        try:
            publish_stage_report(folder, output, summary)
        finally:
            with self._lock:
                self._report_seconds += time.monotonic() - started

    def refresh_learning_curve(self, run_dir: str | Path, force: bool = False) -> None:
        """Redraw the run's learning curve, unless the last redraw was so recent that this one
        would take more than PLOT_BUDGET of the time since (`force` draws anyway)."""
        run_dir = Path(run_dir)
        with self._lock:
            if run_dir in self._plots_waiting or (not force and time.monotonic() < self._next_plot_at):
                return
            self._plots_waiting.add(run_dir)
        self._submit(self._plot, run_dir)

    def _plot(self, run_dir: Path) -> None:
        with self._lock:
            self._plots_waiting.discard(run_dir)  # from here on, a newer iteration queues a new refresh
        started = time.monotonic()
        try:
            plot_learning_curve(run_dir)
        except (OSError, ValueError) as err:
            log.warning(f"{run_dir}: learning curve not refreshed ({type(err).__name__}: {err})")
        finished = time.monotonic()
        self._next_plot_at = finished + (finished - started) * (1 / PLOT_BUDGET - 1)

    def drain(self) -> None:
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for context, *args in held:
            self._submit(self._report, *args, context=context)
        with self._lock:
            jobs, self._jobs = self._jobs, []
        wait(jobs)
        for job in jobs:
            if job.exception() is not None:  # a view is never worth failing (or masking the error of) the run
                log.error("building a run view failed", exc_info=job.exception())
