"""tasks/ingest.py: the ingest stage writes prompts (and rejected rows) as checked artifacts."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pyarrow.parquet as pq
import pytest
from prefect.states import Failed

from data.schemas import PROMPTS, REJECTED
from data.sources import InvalidRow, SourceError
from data.store import Manifest, read_table
from tasks.ingest import EmptySource, _worth_retrying, ingest_prompts, ingest_task

GOOD = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"},
    {
        "prompt": [{"role": "user", "content": "What is 6*7?"}],
        "reward_model": {"ground_truth": "42", "style": "rule"},
        "data_source": "mine",
        "extra_info": {"index": 1},
    },
    {"prompt": "def inc(x):\n", "test": "def check(c):\n    assert c(1) == 2\n", "entry_point": "inc"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def test_ingest_writes_a_checked_prompts_artifact(tmp_path):
    source = write_jsonl(tmp_path / "prompts.jsonl", GOOD)
    out = tmp_path / "iter-0001" / "prompts.parquet"

    summary = ingest_prompts(str(source), out)

    assert summary == {
        "source": str(source),
        "rows": 3,
        "rejected": 0,
        "duplicates": 0,
        "duplicate_examples": [],
        "read": 3,
        "out_path": str(out),
        "rejected_path": None,
    }
    table = read_table(out, PROMPTS)  # fails unless the file carries the PROMPTS schema
    rows = table.to_pylist()
    assert [r["task"] for r in rows] == ["math", "math", "code"]
    assert [r["answer"] for r in rows] == ["7", "42", None]
    assert rows[1]["messages"] == [{"role": "user", "content": "What is 6*7?"}]
    assert [r["source_row"] for r in rows] == [0, 1, 2]
    assert {r["data_source"] for r in rows} == {str(source)}
    assert len({r["prompt_id"] for r in rows}) == 3
    assert not (out.parent / "rejected.parquet").exists()

    entry = Manifest(out.parent).entries()["prompts.parquet"]
    assert (entry["rows"], entry["schema_version"], entry["source"]) == (3, PROMPTS.version, str(source))
    assert Manifest(out.parent).is_done("prompts.parquet")


def test_a_bad_row_stops_ingest_with_file_row_and_field_and_leaves_no_file(tmp_path):
    source = write_jsonl(tmp_path / "prompts.jsonl", [*GOOD, {"question": "No answer here?"}])
    out = tmp_path / "run" / "prompts.parquet"
    with pytest.raises(InvalidRow, match=rf"^{source} row 3, field 'answer': missing gold answer"):
        ingest_prompts(str(source), out)
    assert not out.exists() and leftovers(out.parent) == []
    assert not Manifest(out.parent).is_done("prompts.parquet")


def test_skip_invalid_keeps_good_rows_and_records_every_bad_one(tmp_path):
    bad = [
        {"answer": "5"},
        {"prompt": {"text": "p"}, "answer": "5"},
        {"prompt": "p", "answer": {"value": 5}},
    ]
    source = write_jsonl(tmp_path / "prompts.jsonl", [GOOD[0], bad[0], GOOD[1], bad[1], bad[2], GOOD[2]])
    out = tmp_path / "run" / "prompts.parquet"

    summary = ingest_prompts(str(source), out, skip_invalid=True)

    assert (summary["rows"], summary["rejected"], summary["read"]) == (3, 3, 6)
    assert summary["rejected_path"] == str(out.parent / "rejected.parquet")
    assert read_table(out, PROMPTS).column("source_row").to_pylist() == [0, 2, 5]
    rejected = read_table(out.parent / "rejected.parquet", REJECTED).to_pylist()
    assert [(r["source_row"], r["field"]) for r in rejected] == [(1, "prompt"), (3, "prompt"), (4, "answer")]
    assert rejected[0]["reason"].startswith("missing prompt")
    assert rejected[2]["reason"] == "expected text or a number, got dict"
    assert [json.loads(r["raw"]) for r in rejected] == bad  # the row itself, nothing lost
    assert {r["data_source"] for r in rejected} == {str(source)}
    assert Manifest(out.parent).is_done("rejected.parquet")


def test_skip_invalid_without_bad_rows_writes_an_empty_rejected_file(tmp_path):
    source = write_jsonl(tmp_path / "prompts.jsonl", GOOD)
    rejected = tmp_path / "elsewhere" / "bad.parquet"
    ingest_prompts(str(source), tmp_path / "prompts.parquet", skip_invalid=True, rejected_path=rejected)
    assert read_table(rejected, REJECTED).num_rows == 0


def test_a_source_without_any_usable_row_fails_but_keeps_the_reasons(tmp_path):
    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "p"}, {"prompt": "q"}])
    out = tmp_path / "run" / "prompts.parquet"
    with pytest.raises(EmptySource, match=r"no usable prompts \(2 rows read, 2 rejected; see .*rejected.parquet\)"):
        ingest_prompts(str(source), out, skip_invalid=True)
    assert not out.exists() and leftovers(out.parent) == []
    assert read_table(out.parent / "rejected.parquet", REJECTED).num_rows == 2


def test_duplicates_keep_the_first_and_are_counted(tmp_path):
    again = {**GOOD[0], "extra_info": {"copy": True}}  # same problem, other metadata
    source = write_jsonl(tmp_path / "prompts.jsonl", [GOOD[0], GOOD[1], again, GOOD[1], GOOD[2]])
    out = tmp_path / "prompts.parquet"

    summary = ingest_prompts(str(source), out)

    assert (summary["rows"], summary["duplicates"]) == (3, 2)
    assert summary["duplicate_examples"] == [(2, 0), (3, 1)]
    table = read_table(out, PROMPTS)
    assert table.column("source_row").to_pylist() == [0, 1, 4]
    assert Manifest(out.parent).entries()["prompts.parquet"]["duplicates"] == 2


def test_limit_stops_reading_early(tmp_path):
    source = tmp_path / "prompts.jsonl"
    write_jsonl(source, GOOD[:2])
    with open(source, "a") as fh:
        fh.write("{this line is never read\n")
    summary = ingest_prompts(str(source), tmp_path / "prompts.parquet", limit=2)
    assert (summary["rows"], summary["read"]) == (2, 2)
    with pytest.raises(SourceError, match=r"prompts.jsonl line 3: not valid JSON"):
        ingest_prompts(str(source), tmp_path / "all.parquet")
    assert not (tmp_path / "all.parquet").exists()
    with pytest.raises(ValueError, match="limit must be at least 1, got 0"):
        ingest_prompts(str(source), tmp_path / "none.parquet", limit=0)


def test_large_sources_are_written_in_bounded_batches(tmp_path, monkeypatch):
    monkeypatch.setattr("tasks.ingest.BATCH_ROWS", 10)
    rows = [{"prompt": f"{a}+1=", "answer": a + 1, "task": "arithmetic"} for a in range(95)]
    source = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "prompts.parquet"

    ingest_prompts(str(source), out)

    assert pq.ParquetFile(out).metadata.num_row_groups == 10  # one per batch of 10
    table = read_table(out, PROMPTS)
    assert table.column("answer").to_pylist() == [str(a + 1) for a in range(95)]


def test_task_argument_applies_to_every_row(tmp_path):
    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+2=", "answer": 3}])
    ingest_prompts(str(source), tmp_path / "prompts.parquet", task="arithmetic")
    assert read_table(tmp_path / "prompts.parquet", PROMPTS).column("task").to_pylist() == ["arithmetic"]


def test_dataset_folder_source_is_labelled_with_its_split(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"problem": "1+1?", "solution": "2"}])}).save_to_disk(
        str(tmp_path / "ds")
    )
    summary = ingest_prompts(str(tmp_path / "ds"), tmp_path / "prompts.parquet", split="test")
    assert summary["source"] == f"{tmp_path / 'ds'}[test]"
    assert read_table(tmp_path / "prompts.parquet", PROMPTS).column("data_source").to_pylist() == [summary["source"]]


def test_ingest_task_retries_only_transient_failures():
    assert ingest_task.retries == 2 and ingest_task.retry_delay_seconds == 2
    assert ingest_task.retry_condition_fn is _worth_retrying
    permanent = [
        InvalidRow("f.jsonl", 3, "answer", "missing gold answer"),
        SourceError("f.jsonl line 2: not valid JSON"),
        EmptySource("f.jsonl: no usable prompts"),
    ]
    for err in permanent:
        assert not _worth_retrying(ingest_task, None, Failed(data=err))
    assert _worth_retrying(ingest_task, None, Failed(data=ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub")))


def test_ingest_task_wraps_the_plain_function(tmp_path):
    source = write_jsonl(tmp_path / "prompts.jsonl", GOOD)
    summary = ingest_task.fn(str(source), str(tmp_path / "prompts.parquet"), skip_invalid=True)
    assert summary["rows"] == 3 and summary["rejected"] == 0
