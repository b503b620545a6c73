"""Timers around grpoflow's stage functions, installed in a benchmark process before the flow
runs, so one real `grpo_train` run yields the split of every iteration: each stage's own
work, and inside it Parquet I/O, checkpoint writes and model loads. What is left of an
iteration's wall time outside the stage functions is orchestration (Prefect task runs,
manifests, metrics files).

Timers are inclusive and keyed by label; `take()` returns and resets them, so the caller can
read one iteration at a time (the flow runs its stages one after another in this process).
"""

from __future__ import annotations

import functools
import importlib
import time
from collections import defaultdict

_TOTALS: dict[str, float] = defaultdict(float)

# (module, attribute, label). Stage functions are looked up as module globals by their
# Prefect task wrappers at call time, so patching the module attribute times the real call.
STAGES = [
    ("tasks.select", "select_prompts", "select"),
    ("tasks.generate", "generate_completions", "generate"),
    ("tasks.score", "score_generations", "score"),
    ("tasks.advantages", "compute_advantages", "advantages"),
    ("tasks.update", "update_policy", "update"),
    ("tasks.evaluate", "evaluate_policy", "evaluate"),
]
# Parts of the stages' time: the names as each stage module imported them.
PARTS = [
    *[
        (m, "read_table", "parquet_io")
        for m in ("tasks.select", "tasks.generate", "tasks.score", "tasks.advantages", "tasks.update", "tasks.evaluate")
    ],
    *[(m, "write_table", "parquet_io") for m in ("tasks.select", "tasks.generate", "tasks.advantages")],
    ("tasks.score", "iter_batches", "parquet_io"),
    (
        "tasks.update",
        "save_checkpoint",
        "checkpoint_write",
    ),  # written by the update itself (a Ray rank, or no background writer)
    # The local flow's checkpoints are written on a background thread (tasks.model.save_in_background):
    # their time overlaps the next iteration; what the update waits for them is on the critical path.
    ("tasks.model", "save_checkpoint", "checkpoint_write_background"),
    ("tasks.update", "wait_for_saves", "checkpoint_wait"),
    ("tasks.generate", "load_model", "model_load"),  # the reference model, when beta > 0
    ("tasks.model", "load_model", "model_load"),  # the policy, when not held in memory
    ("tasks.engines.hf", "HFEngine.sample", "generate_sampling"),  # the engine's sampling, behind the generate stage
    ("tasks.generate", "batched_completion_logprobs", "logprob_forwards"),  # old policy, and reference when beta > 0
]


def _timed(fn, label: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _TOTALS[label] += time.perf_counter() - started

    wrapper.__timed__ = True
    return wrapper


def install() -> None:
    for module_name, attr, label in STAGES + PARTS:
        owner = importlib.import_module(module_name)
        *path, attr = attr.split(".")  # "Class.method" times a method on its class
        for name in path:
            owner = getattr(owner, name)
        fn = getattr(owner, attr)
        if not getattr(fn, "__timed__", False):
            setattr(owner, attr, _timed(fn, label))
    # The score stage streams its output through this writer.
    from data.store import Manifest, ParquetStreamWriter

    for method in ("write", "__exit__"):
        fn = getattr(ParquetStreamWriter, method)
        if not getattr(fn, "__timed__", False):
            setattr(ParquetStreamWriter, method, _timed(fn, "parquet_io"))
    # Manifest bookkeeping (sha256 of every artifact) happens in the flow, outside the stages.

    if not getattr(Manifest.record, "__timed__", False):
        Manifest.record = _timed(Manifest.record, "manifest")
        Manifest.is_done = _timed(Manifest.is_done, "manifest")


def take() -> dict[str, float]:
    out = dict(_TOTALS)
    _TOTALS.clear()
    return out


STAGE_LABELS = [label for _, _, label in STAGES]


def record_iterations(sink: list[dict]) -> None:
    """Append one record per finished iteration to `sink`: wall seconds since the previous
    iteration ended (so everything the flow does per iteration is counted), the flow's own
    step_time, and the stage timers of that iteration."""
    import flows.train as train

    original = train.write_metrics
    last: list[float] = []

    def write_metrics(run_dir, iteration, metrics):
        original(run_dir, iteration, metrics)
        now = time.perf_counter()
        if not last:  # the first iteration counts from its own start, not the flow's (model prep, ingest)
            last.append(now - metrics.get("step_time", 0.0))
        sink.append(
            {
                "iteration": iteration,
                "wall": now - last[0],
                "step_time": metrics.get("step_time"),
                "timers": take(),
                # with beta 0, completions of zero advantage are never forwarded (tasks/update.py)
                "zero_gradient_completions": metrics.get("update/zero_gradient_completions"),
                "trained_completions": metrics.get("update/trained_completions"),
            }
        )
        last[0] = now

    train.write_metrics = write_metrics
