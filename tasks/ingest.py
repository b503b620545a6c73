"""Ingest stage: a prompt source (file, dataset folder or hub name) -> prompts.parquet.

Rows are streamed from the source and written in bounded batches, so a source of any size
passes through in constant memory (apart from one 16-character id per kept prompt, to drop
duplicates).

A bad row stops the stage with a message naming the source, the row and the field. With
``skip_invalid`` the stage goes on instead, and every bad row goes to ``rejected.parquet``
with its reason and the row itself as JSON: skipped rows are never silently lost.

Exact duplicates (rows with the same prompt_id: same prompt and gold fields, whatever their
metadata) would be the same GRPO group twice and would break the one-row-per-prompt_id join
of later stages; the first is kept, the rest are counted and named in the summary.

Both files are written atomically and recorded in the folder's manifest.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from data.errors import UserError
from data.schemas import PROMPTS, REJECTED, SchemaError
from data.sources import InvalidRow, SourceError, normalise_row, prompts_table, read_source, source_label
from data.store import DiskFull, Manifest, ParquetStreamWriter, iter_batches

log = logging.getLogger("grpoflow.ingest")

BATCH_ROWS = 1024  # rows held in memory before they are written out
DUPLICATE_EXAMPLES = 10  # duplicate rows named in the summary; the rest are only counted


class EmptySource(UserError):
    """The source yielded no usable prompt."""


@dataclass
class _Tally:
    read: int = 0
    kept: int = 0
    rejected: int = 0
    duplicates: int = 0
    duplicate_examples: list[tuple[int, int]] = field(default_factory=list)  # (row, same as row)


def ingest_prompts(
    source: str,
    out_path: str | Path,
    *,
    split: str = "train",
    task: str | None = None,
    skip_invalid: bool = False,
    rejected_path: str | Path | None = None,
    limit: int | None = None,
    config: str | None = None,
) -> dict[str, Any]:
    """Read `source`, normalise every row, write the prompts artifact at `out_path`.

    `limit` caps the prompts written (the first `limit` valid, distinct rows). With
    `skip_invalid`, bad rows go to `rejected_path` (default: ``rejected.parquet`` beside
    `out_path`), which is then always written, empty when no row was bad. Returns a summary:
    source, rows (written), rejected, duplicates, read, and the paths.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    out_path = Path(out_path)
    rejected_path = Path(rejected_path) if rejected_path is not None else out_path.parent / "rejected.parquet"
    label = source_label(source, split=split, config=config)
    rows = read_source(source, split=split, config=config)

    with ParquetStreamWriter(out_path, PROMPTS) as prompts:
        rejected_writer = ParquetStreamWriter(rejected_path, REJECTED) if skip_invalid else contextlib.nullcontext()
        with rejected_writer as rejected:
            tally = _ingest_rows(rows, label, task, limit, prompts, rejected)
        if tally.kept == 0:
            # Raised inside the prompts writer: no empty prompts.parquet appears, while the
            # rejected rows (the likely explanation) are already on disk.
            where = f"; see {rejected_path}" if skip_invalid else ""
            raise EmptySource(f"{label}: no usable prompts ({tally.read} rows read, {tally.rejected} rejected{where})")

    summary = {
        "source": label,
        "rows": tally.kept,
        "rejected": tally.rejected,
        "duplicates": tally.duplicates,
        "duplicate_examples": tally.duplicate_examples,
        "read": tally.read,
        "out_path": str(out_path),
        "rejected_path": str(rejected_path) if skip_invalid else None,
    }
    _record(out_path, rejected_path if skip_invalid else None, summary)
    if tally.duplicates:
        shown = ", ".join(f"row {r} = row {first}" for r, first in tally.duplicate_examples)
        log.warning("%s: %d duplicate rows dropped (%s)", label, tally.duplicates, shown)
    return summary


def _ingest_rows(
    rows: Iterator[tuple[int, dict[str, Any]]],
    label: str,
    task: str | None,
    limit: int | None,
    prompts: ParquetStreamWriter,
    rejected: ParquetStreamWriter | None,
) -> _Tally:
    """Normalise and write `rows`; `rejected` is None unless invalid rows are to be kept."""
    tally = _Tally()
    first_row_of: dict[str, int] = {}
    kept: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    for row_number, raw in rows:
        tally.read += 1
        try:
            row = normalise_row(raw, data_source=label, row=row_number, task=task)
        except InvalidRow as err:
            if rejected is None:
                raise
            bad.append(_rejected_row(err, raw))
            tally.rejected += 1
        else:
            first = first_row_of.setdefault(row["prompt_id"], row_number)
            if first != row_number:
                tally.duplicates += 1
                if len(tally.duplicate_examples) < DUPLICATE_EXAMPLES:
                    tally.duplicate_examples.append((row_number, first))
            else:
                kept.append(row)
                tally.kept += 1
        if len(kept) >= BATCH_ROWS:
            prompts.write(prompts_table(kept))
            kept.clear()
        if len(bad) >= BATCH_ROWS:
            rejected.write(pa.Table.from_pylist(bad, schema=REJECTED.schema))
            bad.clear()
        if tally.kept == limit:
            break  # before the next row is even parsed
    if kept:
        prompts.write(prompts_table(kept))
    if bad:
        rejected.write(pa.Table.from_pylist(bad, schema=REJECTED.schema))
    return tally


def _rejected_row(err: InvalidRow, raw: dict[str, Any]) -> dict[str, Any]:
    return {
        "data_source": err.data_source,
        "source_row": err.row,
        "field": err.field,
        "reason": err.reason,
        "raw": json.dumps(raw, sort_keys=True, ensure_ascii=False, default=str),
    }


def _record(out_path: Path, rejected_path: Path | None, summary: dict[str, Any]) -> None:
    facts = {"source": summary["source"], "duplicates": summary["duplicates"], "rejected": summary["rejected"]}
    Manifest(out_path.parent).record(out_path.name, schema_version=PROMPTS.version, **facts)
    if rejected_path is not None:
        Manifest(rejected_path.parent).record(
            rejected_path.name, schema_version=REJECTED.version, source=summary["source"]
        )


def merge_prompts(paths: list[str | Path], out_path: str | Path) -> dict[str, Any]:
    """Several ingested prompts files (one per mixed dataset) as one, streamed. A prompt in
    two of them (same prompt_id) is kept once, from the first, and counted: later stages
    join on prompt_id."""
    seen: set[str] = set()
    duplicates = 0
    with ParquetStreamWriter(out_path, PROMPTS) as out:
        for path in paths:
            for batch in iter_batches(path, PROMPTS, batch_size=BATCH_ROWS):
                table = pa.Table.from_batches([batch])
                keep = []
                for prompt_id in table.column("prompt_id").to_pylist():
                    keep.append(prompt_id not in seen)
                    seen.add(prompt_id)
                duplicates += keep.count(False)
                out.write(table.filter(pa.array(keep, pa.bool_())))
    if duplicates:
        log.warning("%s: %d prompts present in more than one mixed dataset kept once", out_path, duplicates)
    return {"rows": len(seen), "duplicates": duplicates, "sources": len(paths)}


@task(name="merge-prompts", cache_policy=NO_CACHE)
def merge_prompts_task(paths: list[str], out_path: str) -> dict[str, Any]:
    return merge_prompts(paths, out_path)


# Errors that are the same on every attempt: retrying them only delays the message.
_PERMANENT = (InvalidRow, SourceError, EmptySource, SchemaError, DiskFull)


def _worth_retrying(task_obj, task_run, state) -> bool:
    """Retry transient failures (a hub or a shared filesystem that is briefly away), not a
    bad file or a bad row."""
    return not isinstance(state.result(raise_on_failure=False), _PERMANENT)


@task(name="ingest", retries=2, retry_delay_seconds=2, retry_condition_fn=_worth_retrying)
def ingest_task(
    source: str,
    out_path: str,
    split: str = "train",
    task: str | None = None,
    skip_invalid: bool = False,
    rejected_path: str | None = None,
    limit: int | None = None,
    config: str | None = None,
) -> dict[str, Any]:
    return ingest_prompts(
        source,
        out_path,
        split=split,
        task=task,
        skip_invalid=skip_invalid,
        rejected_path=rejected_path,
        limit=limit,
        config=config,
    )
