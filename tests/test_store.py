"""The run-directory store: atomic writes, manifests, schema checks on read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.schemas import ADVANTAGES, REWARDS, SchemaError
from data.store import (
    Manifest,
    ParquetStreamWriter,
    atomic_write_bytes,
    read_table,
    remove_stale_temp_files,
    write_table,
)


def _advantages(n: int) -> pa.Table:
    return pa.table(
        {
            "prompt_id": [f"p{i // 4}" for i in range(n)],
            "sample_index": pa.array([i % 4 for i in range(n)], pa.int32()),
            "reward": [float(i % 2) for i in range(n)],
            "group_mean": [0.5] * n,
            "group_std": [0.5] * n,
            "advantage": pa.array([1.0 if i % 2 else -1.0 for i in range(n)], pa.float32()),
            "kept": [True] * n,
            "drop_reason": pa.array([None] * n, pa.string()),
        },
        schema=ADVANTAGES.schema,
    )


def test_write_then_read_round_trips_with_version(tmp_path):
    path = write_table(_advantages(8), tmp_path / "advantages.parquet", ADVANTAGES)
    table = read_table(path, ADVANTAGES)
    assert table.num_rows == 8
    assert table.schema.metadata[b"grpoflow.version"] == b"1"
    assert [f.name for f in tmp_path.iterdir()] == ["advantages.parquet"]


def test_reader_names_file_and_column_of_a_wrong_schema(tmp_path):
    path = tmp_path / "advantages.parquet"
    pq.write_table(_advantages(4).drop(["advantage"]), path)
    with pytest.raises(SchemaError, match=r"advantages\.parquet.*missing column 'advantage'"):
        read_table(path, ADVANTAGES)
    pq.write_table(_advantages(4).set_column(6, "kept", pa.array(["yes"] * 4)), path)
    with pytest.raises(SchemaError, match=r"column 'kept' has type string, expected bool"):
        read_table(path, ADVANTAGES)


def test_family_columns_are_accepted_only_with_their_type(tmp_path):
    schema = REWARDS.with_family_columns(["reward/math", "error/math"])
    table = pa.table(
        {
            "prompt_id": ["a"],
            "sample_index": pa.array([0], pa.int32()),
            "reward": [1.0],
            "reward/math": [1.0],
            "error/math": [None],
        },
        schema=schema,
    )
    write_table(table, tmp_path / "rewards.parquet", REWARDS)
    bad = table.append_column("score/other", pa.array([1.0]))
    with pytest.raises(SchemaError, match="unexpected column 'score/other'"):
        write_table(bad, tmp_path / "rewards2.parquet", REWARDS)


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path):
    final = tmp_path / "advantages.parquet"
    write_table(_advantages(4), final, ADVANTAGES)
    before = final.read_bytes()
    with pytest.raises(RuntimeError):
        with ParquetStreamWriter(final, ADVANTAGES) as writer:
            writer.write(_advantages(4))
            raise RuntimeError("crash mid-write")
    assert final.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["advantages.parquet"]


def test_killed_writer_leaves_no_file_under_the_final_name(tmp_path):
    """SIGKILL a process in the middle of a streaming write: no final file appears, and the
    temp file it leaves is recognised and removed as a leftover."""
    final = tmp_path / "advantages.parquet"
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from tests.test_store import _advantages
        from data.schemas import ADVANTAGES
        from data.store import ParquetStreamWriter
        with ParquetStreamWriter({str(final)!r}, ADVANTAGES) as w:
            w.write(_advantages(1000))
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not final.exists()
    leftovers = remove_stale_temp_files(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-advantages.parquet")
    assert list(tmp_path.iterdir()) == []


def test_manifest_marks_done_only_while_checksum_matches(tmp_path):
    path = write_table(_advantages(4), tmp_path / "advantages.parquet", ADVANTAGES)
    manifest = Manifest(tmp_path)
    assert not manifest.is_done("advantages.parquet")
    entry = manifest.record("advantages.parquet", schema_version=1)
    assert entry["rows"] == 4 and entry["bytes"] == path.stat().st_size and len(entry["sha256"]) == 64
    assert manifest.is_done("advantages.parquet")
    with open(path, "r+b") as fh:  # same size, different bytes
        fh.seek(10)
        fh.write(b"\x00\x01")
    assert not manifest.is_done("advantages.parquet")
    path.unlink()
    assert not manifest.is_done("advantages.parquet")


def test_manifest_result_entries_and_atomic_bytes(tmp_path):
    manifest = Manifest(tmp_path)
    manifest.record("eval", summary={"accuracy": 0.5})
    assert manifest.is_done("eval")
    assert manifest.entries()["eval"]["summary"] == {"accuracy": 0.5}
    atomic_write_bytes(tmp_path / "x.bin", b"abc")
    assert (tmp_path / "x.bin").read_bytes() == b"abc"
