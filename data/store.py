"""The run directory: atomic artifact writes, a checksummed manifest, schema-checked reads.

Layout (see ``shared/DESIGN.md``)::

    runs/<run_id>/config.json
    runs/<run_id>/iter-0001/{prompts,generations,rewards,advantages}.parquet
    runs/<run_id>/iter-0001/_manifest.json   # rows, bytes, sha256, schema version, done time

Every file is written under a temporary name in its final folder, flushed and fsynced, then
renamed over the final name, and the folder is fsynced: a crash leaves either the old file,
or the complete new one, or a ``.tmp-*`` file that no reader opens. A stage is *done* when
its manifest entry exists and the file on disk still has that checksum.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.crash_points import pause_point
from data.schemas import ArtifactSchema, SchemaError, check_schema

MANIFEST = "_manifest.json"
TMP_PREFIX = ".tmp-"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- a full disk, said in one line ------------------------------------------------------
class DiskFull(OSError):
    """No space left where an artifact is being written; the message says where, how much
    the write needs (when known) and how much is free there."""

    def __str__(self) -> str:
        return str(self.strerror)


def _mib(n: float) -> str:
    if n < 2**20:
        return f"{n / 2**10:,.0f} KiB"
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def free_bytes(path: str | Path) -> int:
    """Free space on the file system that holds `path` (or its nearest existing parent)."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def disk_full(path: str | Path, needed: int | None, at_least: bool = False) -> DiskFull:
    need = f"the write needs {'more than' if at_least else 'about'} {_mib(needed)}, " if needed else ""
    return DiskFull(
        errno.ENOSPC,
        f"disk full writing {path}: {need}{_mib(free_bytes(path))} free there; "
        "free some space (or --save-total-limit fewer checkpoints) and re-run to resume",
    )


def is_no_space(err: BaseException) -> bool:
    """ENOSPC, however the writer reports it: an OSError, or the RuntimeError of torch's zip
    writer (inline_container.cc) and safetensors' "No space left on device" text."""
    if isinstance(err, DiskFull) or getattr(err, "errno", None) == errno.ENOSPC:
        return True
    return isinstance(err, (OSError, RuntimeError)) and ("No space left" in str(err) or "StorageFull" in str(err))


def check_free_space(path: str | Path, needed: int) -> None:
    """Fail before writing `needed` bytes to `path` when its file system has less free."""
    if free_bytes(path) < needed:
        raise disk_full(path, needed)


@contextlib.contextmanager
def atomic_path(final: str | Path, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside `final`; on success fsync it and rename it onto `final`.

    On any exception the temp file is removed and `final` is untouched. A full disk is
    reported as `DiskFull` naming `final` (`expected_bytes`: what the write needs, if known).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{final.name}.", dir=final.parent)
    except OSError as err:
        if is_no_space(err):
            raise disk_full(final, expected_bytes) from err
        raise
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        pause_point(f"write {final}")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as err:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if is_no_space(err) and not isinstance(err, DiskFull):
            raise disk_full(final, expected_bytes or written or None, at_least=expected_bytes is None) from err
        raise


def atomic_write_bytes(final: str | Path, payload: bytes) -> None:
    with atomic_path(final, expected_bytes=len(payload)) as tmp:
        tmp.write_bytes(payload)


def atomic_write_json(final: str | Path, obj: Any) -> None:
    atomic_write_bytes(final, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_table(table: pa.Table, final: str | Path, artifact: ArtifactSchema) -> Path:
    """Check `table` against `artifact`, then write it atomically as Parquet."""
    final = Path(final)
    check_schema(table.schema, artifact, final)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **artifact.metadata()})
    with atomic_path(final, expected_bytes=table.nbytes) as tmp:  # uncompressed size: an upper bound
        pq.write_table(table, tmp, compression="zstd")
    return final


class ParquetStreamWriter:
    """Write a Parquet artifact batch by batch, atomically: nothing appears under the final
    name until `close()` succeeds. Use as a context manager."""

    def __init__(self, final: str | Path, artifact: ArtifactSchema, schema: pa.Schema | None = None):
        self.final = Path(final)
        self.artifact = artifact
        self.schema = (schema or artifact.schema).with_metadata(artifact.metadata())
        check_schema(self.schema, artifact, self.final)
        self._ctx = atomic_path(self.final)
        self._tmp = self._ctx.__enter__()
        try:
            self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        except BaseException as err:  # e.g. no space for the header: remove the temp file
            self._ctx.__exit__(type(err), err, err.__traceback__)
            raise
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table.cast(self.schema))
        self.rows += table.num_rows

    def __enter__(self) -> ParquetStreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._writer.close()  # writes the footer: it can fail too (a full disk)
        except BaseException as err:
            if exc is None:
                exc_type, exc, tb = type(err), err, err.__traceback__
        if exc is None:
            self._ctx.__exit__(None, None, None)
            return
        self._ctx.__exit__(exc_type, exc, tb)  # removes the temp file; raises DiskFull for ENOSPC
        raise exc


def read_table(path: str | Path, artifact: ArtifactSchema, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet artifact, failing with the file and column if its schema is wrong."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {artifact.name} artifact not found")
    # One open file for the schema check and the read (pq.read_table opens it again through
    # the dataset layer): 2.0 against 4.0 ms for a generations file of the tiny benchmark.
    with pq.ParquetFile(path) as parquet:
        check_schema(parquet.schema_arrow, artifact, path)
        absent = artifact.absent_columns(parquet.schema_arrow)
        if not absent:
            return parquet.read(columns=columns)
        table = parquet.read(columns=None if columns is None else [c for c in columns if c not in absent])
    return _with_null_columns(table, artifact, absent if columns is None else [c for c in columns if c in absent])


def _with_null_columns(data, artifact: ArtifactSchema, names: list[str]):
    """A table or record batch of an older file, with the columns added since as nulls."""
    for name in names:
        data = data.append_column(
            artifact.schema.field(name), pa.nulls(data.num_rows, artifact.schema.field(name).type)
        )
    return data


def iter_batches(path: str | Path, artifact: ArtifactSchema, batch_size: int = 4096, columns=None):
    """Stream a Parquet artifact in record batches (bounded memory for any file size)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {artifact.name} artifact not found")
    # pre_buffer off: with it, pyarrow keeps every column chunk it has read until the file
    # is closed (~85 MB per million generations read), so memory grew with the file.
    pf = pq.ParquetFile(path, pre_buffer=False)
    check_schema(pf.schema_arrow, artifact, path)
    absent = artifact.absent_columns(pf.schema_arrow)
    if not absent:
        yield from pf.iter_batches(batch_size=batch_size, columns=columns)
        return
    wanted = absent if columns is None else [c for c in columns if c in absent]
    for batch in pf.iter_batches(
        batch_size=batch_size, columns=None if columns is None else [c for c in columns if c not in absent]
    ):
        yield _with_null_columns(batch, artifact, wanted)


def read_rows_where(
    path: str | Path,
    artifact: ArtifactSchema,
    key: str,
    values,
    columns: list[str] | None = None,
    batch_size: int = 8192,
) -> pa.Table:
    """The rows of an artifact whose `key` is in `values`, streamed: a full scan that holds
    one batch at a time (a filtered ``pq.read_table`` buffered ~170 MB of a 500 MB file)."""
    wanted = pa.array(sorted(set(values)), type=pq.read_schema(path).field(key).type)
    parts = []
    schema = None
    for batch in iter_batches(path, artifact, batch_size=batch_size, columns=columns):
        schema = batch.schema
        kept = batch.filter(pc.is_in(batch.column(key), value_set=wanted))
        if kept.num_rows:
            parts.append(kept)
    if schema is None:  # an empty file
        return pq.read_table(path, columns=columns).slice(0, 0)
    return pa.Table.from_batches(parts, schema=schema)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Manifests are read, changed and rewritten whole; the flow's thread and the checkpoint writer's
# (a background save records its folder when it lands) may do so in the same folder at once.
_MANIFEST_LOCK = threading.RLock()


class Manifest:
    """``_manifest.json`` of one folder: what was completed there, with checksums."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST

    def entries(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        try:
            return json.loads(self.path.read_text())
        except json.JSONDecodeError as err:
            raise SchemaError(f"{self.path}: manifest is not valid JSON ({err})") from None

    def record(self, name: str, schema_version: int | None = None, **extra: Any) -> dict[str, Any]:
        """Record that `name` is complete: a file (checksummed), a folder, or a result held
        in the entry itself (e.g. an evaluation's summary)."""
        target = self.folder / name
        entry: dict[str, Any] = {"done_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
        entry["kind"] = "file" if target.is_file() else "folder" if target.is_dir() else "result"
        if target.is_file():
            entry["bytes"] = target.stat().st_size
            entry["sha256"] = sha256_file(target)
            if target.suffix == ".parquet":
                entry["rows"] = pq.read_metadata(target).num_rows
        if schema_version is not None:
            entry["schema_version"] = schema_version
        with _MANIFEST_LOCK:
            entries = self.entries()
            entries[name] = entry
            atomic_write_json(self.path, entries)
        return entry

    def refresh(self, name: str, **fields: Any) -> dict[str, Any]:
        """Record `name` again as it is on disk now (a folder that has landed since), keeping
        what its entry said about the work and adding `fields`."""
        with _MANIFEST_LOCK:
            entry = self.entries().get(name, {})
            kept = {
                k: v
                for k, v in entry.items()
                if k not in ("done_at", "kind", "bytes", "sha256", "rows", "schema_version")
            }
            return self.record(name, schema_version=entry.get("schema_version"), **(kept | fields))

    def annotate(self, name: str, **fields: Any) -> None:
        """Add `fields` to the recorded entry of `name` (nothing if it has none)."""
        with _MANIFEST_LOCK:
            entries = self.entries()
            if name in entries:
                entries[name].update(fields)
                atomic_write_json(self.path, entries)

    def is_done(self, name: str) -> bool:
        """True when `name` is recorded and, for a file, its checksum still matches."""
        entry = self.entries().get(name)
        if entry is None:
            return False
        target = self.folder / name
        if entry.get("kind") == "result":
            return True
        if entry.get("kind") == "folder":
            return target.is_dir()
        return target.is_file() and target.stat().st_size == entry["bytes"] and sha256_file(target) == entry["sha256"]

    def forget(self, name: str) -> None:
        with _MANIFEST_LOCK:
            entries = self.entries()
            if entries.pop(name, None) is not None:
                atomic_write_json(self.path, entries)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the ``.tmp-*`` leftovers of writers that were killed (files, and the temp
    folders of checkpoint writes); return what was removed."""
    removed = []
    for tmp in sorted(Path(folder).rglob(f"{TMP_PREFIX}*")):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()
        else:
            continue  # inside a temp folder removed just before
        removed.append(tmp)
    return removed


class RepeatedGroup(SchemaError):
    """A group's rows are not adjacent: its key appears again after other groups."""

    def __init__(self, message: str, *, value: Any, sample: Any, path: Path, first_path: Path, row: int):
        super().__init__(message)
        self.value, self.sample, self.path, self.first_path, self.row = value, sample, path, first_path, row


def iter_groups(
    paths: str | Path | Sequence[str | Path],
    artifact: ArtifactSchema,
    columns: list[str] | None = None,
    *,
    key: str = "prompt_id",
    batch_rows: int = 65_536,
) -> Iterator[pa.Table]:
    """Stream one artifact, or several read one after the other (an iteration's sampling
    rounds), as tables of *whole groups* (rows sharing `key`), about `batch_rows` rows
    each, so per-group statistics need only one group's rows in memory.

    Every artifact of the loop writes a group's rows together (generation emits the G
    completions of a prompt one after the other; later stages keep that order). A key that
    appears again after other groups, in the same file or a later one, raises
    `RepeatedGroup` naming the file and row, rather than giving two half-groups wrong
    statistics. Memory: one batch plus one group, and 16 bytes per group seen (the check).
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    wanted = None if columns is None else list(dict.fromkeys([key, *columns]))
    seen = _SeenGroups()
    for index, path in enumerate(paths):
        pending: pa.Table | None = None  # the last group of the previous batch: it may go on
        row = 0  # file row number of the first row of `pending` / of the batch
        for batch in iter_batches(path, artifact, batch_size=batch_rows, columns=wanted):
            table = pa.Table.from_batches([batch])
            if pending is not None:
                table = pa.concat_tables([pending, table])
            keys = table.column(key).to_pylist()
            starts = [0] + [i for i in range(1, len(keys)) if keys[i] != keys[i - 1]]
            seen.add(table, starts[:-1], key, paths, index, row)  # every group but the last is complete
            last = starts[-1]
            if last > 0:
                yield table.slice(0, last).combine_chunks()
            pending = table.slice(last)
            row += last
        if pending is not None and pending.num_rows:
            seen.add(pending, [0], key, paths, index, row)
            yield pending.combine_chunks()


class _SeenGroups:
    """The keys of the groups already streamed, as sorted 64-bit hashes (16 bytes a group
    with the file index, instead of ~100 for a Python set entry) so that a million groups
    cost 16 MB, not 100."""

    def __init__(self) -> None:
        self.hashes = np.zeros(0, dtype=np.int64)  # sorted
        self.files = np.zeros(0, dtype=np.int32)  # file index of each hash

    def add(self, table: pa.Table, starts: list[int], key: str, paths: list[Path], index: int, row: int) -> None:
        if not starts:
            return
        column = table.column(key)
        new = np.fromiter((hash(column[s].as_py()) for s in starts), dtype=np.int64, count=len(starts))
        at = np.minimum(np.searchsorted(self.hashes, new), max(self.hashes.size - 1, 0))
        known = self.hashes[at] == new if self.hashes.size else np.zeros(len(new), bool)
        _, first = np.unique(new, return_index=True)
        repeated_in_batch = np.ones(len(new), bool)
        repeated_in_batch[first] = False
        bad = np.flatnonzero(known | repeated_in_batch)
        if bad.size:
            i = int(bad[0])
            start = starts[i]
            first_file = paths[int(self.files[at[i]])] if known[i] else paths[index]
            value = column[start].as_py()
            sample = table.column("sample_index")[start].as_py() if "sample_index" in table.column_names else None
            where = "" if first_file == paths[index] else f" (first seen in {first_file})"
            raise RepeatedGroup(
                f"{paths[index]}: row {row + start}: {key} {value!r} appears again after other groups{where}; "
                "the rows of a group must be adjacent (as the generate stage writes them)",
                value=value,
                sample=sample,
                path=paths[index],
                first_path=first_file,
                row=row + start,
            )
        hashes = np.concatenate([self.hashes, new])
        files = np.concatenate([self.files, np.full(len(new), index, dtype=np.int32)])
        order = np.argsort(hashes, kind="stable")
        self.hashes, self.files = hashes[order], files[order]


def iter_aligned(*streams: Iterator[pa.RecordBatch]) -> Iterator[tuple[pa.Table, ...]]:
    """Walk several batch streams over files with the same rows in step: yields tuples of
    equally long tables (row i of each is row i of its file). A stream that ends before the
    others is an error: the files do not have the same number of rows."""
    buffers: list[pa.Table | None] = [None] * len(streams)
    while True:
        for i, stream in enumerate(streams):
            while buffers[i] is None or buffers[i].num_rows == 0:
                batch = next(stream, None)
                if batch is None:
                    break
                buffers[i] = pa.Table.from_batches([batch])
        lengths = [0 if b is None else b.num_rows for b in buffers]
        if not any(lengths):
            return
        if not all(lengths):
            raise ValueError(
                f"the files have different numbers of rows (one ended while another has {max(lengths)} rows left)"
            )
        n = min(lengths)
        yield tuple(b.slice(0, n) for b in buffers)
        buffers = [b.slice(n) for b in buffers]
