"""Score stage: generations.parquet + prompts.parquet -> rewards.parquet.

One ``reward/<fn>`` column per reward function, one ``error/<fn>`` column with the error
text of the rows it could not score (NaN reward there) or, beside a number, why the row
scored what it did (the candidate's program crashed: 0 and the traceback's last line), and
the weighted ``reward`` total
(NaN when any function failed on the row: the advantages stage leaves such rows out of
their group's baseline instead of pretending they scored 0).

How it stays safe and bounded at any size:

* the generations are read in record batches and the rewards file is written in chunks
  (``ParquetStreamWriter``: nothing appears under the final name unless all rows scored),
  so memory holds a few chunks whatever the file size; the prompts file is read forward
  in step with the generations (the generate stage writes them in prompt order), and a
  generations file in any other order falls back to an index of the whole prompts file;
* rewards run in a pool of worker processes (``rewards.pool``), one per core by default;
  a call that overruns its reward's ``time_limit_s`` costs its worker (killed, replaced)
  and its row (NaN plus the error text), never the stage; nothing here relies on signals,
  so the stage runs in any thread (Prefect runs tasks in worker threads);
* the stage fails loudly, as soon as it is certain, when more than ``max_error_fraction``
  of the rows could not be scored: many NaN rows mean something is broken, not a bad policy.

Each reward receives the prompt row plus two fields of the generation:
``completion_tokens`` (length in tokens) and ``finish_reason`` ("eos" or "length").
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task

from data.schemas import GENERATIONS, PROMPTS, REWARDS
from data.store import DiskFull, ParquetStreamWriter, iter_batches, read_table
from rewards import RewardOptionsError, make_reward
from rewards.pool import shared_pool
from tasks.progress import progress
from tasks.stage_settings import StageSettings

_GENERATION_COLUMNS = ["prompt_id", "sample_index", "completion", "completion_token_ids", "finish_reason"]


class TooManyRewardErrors(RuntimeError):
    pass


def score_generations(
    generations_path: str | Path,
    prompts_path: str | Path,
    out_path: str | Path,
    rewards: Mapping[str, float],
    max_error_fraction: float = 0.05,
    *,
    reward_options: Mapping[str, Mapping[str, Any]] | None = None,
    workers: int | None = None,
    chunk_rows: int = 4096,
    worker_memory_mb: int | None = 4096,
) -> dict[str, Any]:
    """Score every completion with every reward in `rewards` (name -> weight).

    `reward_options` maps a reward name to its options (``rewards.make_reward``);
    `workers` defaults to one per core; `chunk_rows` rows are read and written at a time.
    """
    started = time.monotonic()
    bound = _bind(rewards, reward_options or {})
    if not 0.0 <= max_error_fraction <= 1.0:
        raise ValueError(f"max_error_fraction must be within [0, 1], got {max_error_fraction}")
    weights = [float(rewards[r.name]) for r in bound]
    names = [f"reward/{r.name}" for r in bound] + [f"error/{r.name}" for r in bound]
    if not Path(generations_path).exists():
        raise FileNotFoundError(f"{generations_path}: generations artifact not found")
    total_rows = pq.read_metadata(generations_path).num_rows
    allowed_errors = math.floor(max_error_fraction * total_rows)
    prompts = _PromptRows(prompts_path, chunk_rows)

    keys: deque[tuple[str, int]] = deque()  # (prompt_id, sample_index) of rows in flight
    rows = _rows(generations_path, prompts, keys, chunk_rows)
    errored = 0
    error_samples: list[str] = []  # the first few distinct error texts, for the failure message
    sums = [0.0] * len(bound)
    counts = [0] * len(bound)
    totals_sum = 0.0
    # Workers are kept for the next iteration: starting them costs 0.7-4 s per call here.
    with shared_pool(bound, workers, memory_mb=worker_memory_mb) as pool, progress("score", total=total_rows) as bar:
        with ParquetStreamWriter(out_path, REWARDS, REWARDS.with_family_columns(names)) as writer:
            chunk = _Chunk(len(bound))
            for outcomes in pool.imap(rows):
                bar.advance()
                prompt_id, sample_index = keys.popleft()
                total = sum(w * o.value for w, o in zip(weights, outcomes))
                chunk.add(prompt_id, sample_index, total, outcomes)
                for index, outcome in enumerate(outcomes):
                    # A value with an error text is scored (the candidate's failure explained);
                    # only NaN means the row could not be scored.
                    if not math.isnan(outcome.value):
                        sums[index] += outcome.value
                        counts[index] += 1
                    elif len(error_samples) < 3 and outcome.error not in error_samples:
                        error_samples.append(outcome.error)
                if math.isnan(total):
                    errored += 1
                    if errored > allowed_errors:
                        raise TooManyRewardErrors(
                            f"more than max_error_fraction={max_error_fraction:.0%} of the {total_rows} rows in "
                            f"{generations_path} could not be scored ({errored} so far); first errors: "
                            + "; ".join(error_samples)
                        )
                else:
                    totals_sum += total
                if len(chunk) >= chunk_rows:
                    writer.write(chunk.table(writer.schema, bound))
                    chunk = _Chunk(len(bound))
            if len(chunk):
                writer.write(chunk.table(writer.schema, bound))
        timeouts, deaths = pool.timeouts, pool.deaths
    scored = total_rows - errored
    seconds = time.monotonic() - started
    return {
        "rows": total_rows,
        "errored": errored,
        "reward_mean": totals_sum / scored if scored else math.nan,
        **{f"reward/{r.name}_mean": (sums[i] / counts[i] if counts[i] else math.nan) for i, r in enumerate(bound)},
        **{f"error/{r.name}_rows": total_rows - counts[i] for i, r in enumerate(bound)},
        "timeouts": timeouts,
        "worker_deaths": deaths,
        "seconds": seconds,
        "rows_per_s": total_rows / seconds if seconds > 0 else math.nan,
    }


def _bind(rewards: Mapping[str, float], reward_options: Mapping[str, Mapping[str, Any]]) -> list:
    if not rewards:
        raise ValueError("no rewards configured: give at least one reward name and weight")
    stray = sorted(set(reward_options) - set(rewards))
    if stray:
        raise RewardOptionsError(
            f"reward_options names {', '.join(map(repr, stray))}, which is not among the configured rewards "
            f"({', '.join(rewards)})"
        )
    for name, weight in rewards.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"reward '{name}' has weight {weight!r}; weights must be finite numbers")
    return [make_reward(name, reward_options.get(name)) for name in rewards]


class _PromptRows:
    """prompt_id -> prompt row as a dict, for one batch of generations at a time.

    The generate stage writes a prompts file's generations in that file's order (a
    prompt's G completions together), so the prompts are read forward in step with them,
    one batch at a time, and memory does not grow with the files. A generations file in
    another order (written elsewhere, or re-scored beside a prompts file it was not made
    from) asks for a prompt already passed, or one the file lacks: from then on the whole
    prompts file is indexed (`_PromptIndex`), which also names a missing prompt."""

    def __init__(self, path: str | Path, batch_rows: int):
        self.path = path
        self._batches = iter_batches(path, PROMPTS, batch_size=batch_rows)
        self._window: pa.RecordBatch | None = None  # the prompts batch being walked through
        self._row_of: dict[str, int] = {}  # prompt_id -> its first row in `_window`
        self._index: _PromptIndex | None = None
        self._advance()  # a missing or malformed prompts file fails here, before any scoring

    def rows(self, prompt_ids: list[str], generations_path: str | Path, first_row: int) -> dict[str, dict[str, Any]]:
        if self._index is None:
            found = self._walk(list(dict.fromkeys(prompt_ids)))
            if found is not None:
                return found
            self._batches.close()
            self._index = _PromptIndex(self.path)
        return self._index.rows(prompt_ids, generations_path, first_row)

    def _walk(self, wanted: list[str]) -> dict[str, dict[str, Any]] | None:
        """The rows of `wanted`, found in file order from the current batch on; None when
        one of them is not there (out of order, or missing)."""
        found: dict[str, dict[str, Any]] = {}
        in_window: list[str] = []
        for prompt_id in wanted:
            while prompt_id not in self._row_of:
                found.update(self._take(in_window))
                in_window = []
                if not self._advance():
                    return None
            in_window.append(prompt_id)
        found.update(self._take(in_window))
        return found

    def _advance(self) -> bool:
        self._window = next(self._batches, None)
        self._row_of = _first_rows(self._window.column("prompt_id")) if self._window is not None else {}
        return self._window is not None

    def _take(self, prompt_ids: list[str]) -> dict[str, dict[str, Any]]:
        if not prompt_ids:
            return {}
        return dict(zip(prompt_ids, self._window.take([self._row_of[p] for p in prompt_ids]).to_pylist()))


class _PromptIndex:
    """prompt_id -> prompt row as a dict, from the whole prompts file held as Arrow."""

    def __init__(self, path: str | Path):
        self.path = path
        self.table = read_table(path, PROMPTS)
        self.row_of = _first_rows(self.table.column("prompt_id"))

    def rows(self, prompt_ids: list[str], generations_path: str | Path, first_row: int) -> dict[str, dict[str, Any]]:
        wanted = list(dict.fromkeys(prompt_ids))
        missing = [p for p in wanted if p not in self.row_of]
        if missing:
            row = first_row + prompt_ids.index(missing[0])
            raise KeyError(f"{generations_path}: row {row}: prompt_id {missing[0]} is not in {self.path}")
        examples = self.table.take([self.row_of[p] for p in wanted]).to_pylist()
        return dict(zip(wanted, examples))


def _first_rows(prompt_ids: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """prompt_id -> the row where it first appears (a prompt listed twice is the same prompt)."""
    row_of: dict[str, int] = {}
    for index, prompt_id in enumerate(prompt_ids.to_pylist()):
        row_of.setdefault(prompt_id, index)
    return row_of


def _rows(generations_path, prompts: _PromptRows, keys: deque, batch_rows: int) -> Iterator[tuple]:
    """(completion, example, per-row fields) for every generation, in file order."""
    first_row = 0
    for batch in iter_batches(generations_path, GENERATIONS, batch_size=batch_rows, columns=_GENERATION_COLUMNS):
        prompt_ids = batch.column("prompt_id").to_pylist()
        examples = prompts.rows(prompt_ids, generations_path, first_row)
        lengths = pc.list_value_length(batch.column("completion_token_ids")).to_pylist()
        for prompt_id, sample_index, completion, length, finish in zip(
            prompt_ids,
            batch.column("sample_index").to_pylist(),
            batch.column("completion").to_pylist(),
            lengths,
            batch.column("finish_reason").to_pylist(),
        ):
            keys.append((prompt_id, sample_index))
            yield completion, examples[prompt_id], {"completion_tokens": length, "finish_reason": finish}
        first_row += batch.num_rows


class _Chunk:
    """Scored rows waiting to be written."""

    def __init__(self, n_rewards: int):
        self.prompt_ids: list[str] = []
        self.sample_indices: list[int] = []
        self.totals: list[float] = []
        self.values: list[list[float]] = [[] for _ in range(n_rewards)]
        self.errors: list[list[str | None]] = [[] for _ in range(n_rewards)]

    def __len__(self) -> int:
        return len(self.totals)

    def add(self, prompt_id: str, sample_index: int, total: float, outcomes) -> None:
        self.prompt_ids.append(prompt_id)
        self.sample_indices.append(sample_index)
        self.totals.append(total)
        for index, outcome in enumerate(outcomes):
            self.values[index].append(outcome.value)
            self.errors[index].append(outcome.error)

    def table(self, schema: pa.Schema, bound) -> pa.Table:
        columns = {
            "prompt_id": pa.array(self.prompt_ids, pa.string()),
            "sample_index": pa.array(self.sample_indices, pa.int32()),
            "reward": pa.array(self.totals, pa.float64()),
        }
        for index, reward in enumerate(bound):
            columns[f"reward/{reward.name}"] = pa.array(self.values[index], pa.float64())
        for index, reward in enumerate(bound):
            columns[f"error/{reward.name}"] = pa.array(self.errors[index], pa.string())
        return pa.table(columns, schema=schema)


def score_failure_is_transient(task, task_run, state) -> bool:
    """Retry only what may be transient: a wrong config or file fails the same way again (shared
    by the Ray cluster's score task, flows/cluster/ray_cluster.py)."""
    error = state.result(raise_on_failure=False)
    # ValueError covers RewardOptionsError and SchemaError; KeyError covers UnknownRewardError
    # and a prompt_id missing from the prompts file.
    return not isinstance(error, (ValueError, KeyError, FileNotFoundError, DiskFull))


@dataclass(frozen=True)
class ScoreSettings(StageSettings):
    """`score_generations`' settings, the same for every iteration of a run."""

    rewards: dict[str, float]
    max_error_fraction: float = 0.05
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    workers: int | None = None
    chunk_rows: int = 4096
    worker_memory_mb: int | None = 4096


@task(name="score", retries=2, retry_delay_seconds=1, retry_condition_fn=score_failure_is_transient)
def score_task(generations_path: str, prompts_path: str, out_path: str, settings: ScoreSettings) -> dict:
    return score_generations(generations_path, prompts_path, out_path, **settings.keywords())
