"""Prompt sources: read rows from files or `datasets`, and normalise them into PROMPTS rows.

Users bring prompts in whatever layout their last tool used, so this module reads them as
they are instead of asking for a conversion script:

* **files**: ``.jsonl`` / ``.json`` (JSON Lines, or one JSON array), ``.parquet``, ``.csv``;
  the text formats also gzipped (``.jsonl.gz``, as HumanEval ships);
* **datasets**: a local folder (written by ``save_to_disk``, or a folder of data files that
  ``datasets.load_dataset`` understands), or a hub name with an optional config,
  ``openai/gsm8k:main`` (``name:config``; hub ids cannot contain ``:``), or ``config=``;
* **layouts**: grpoflow's own columns; verl's (``prompt`` as a chat list,
  ``reward_model.ground_truth``, ``data_source``, ``ability``, ``extra_info``); TRL's
  (``prompt`` text or chat, ``answer`` or ``solution``); GSM8K (``question``, ``answer``
  ending in ``#### x``); MATH (``problem``, ``solution``); HumanEval (``prompt``, ``test``,
  ``entry_point``); assert lists (``tests`` or MBPP's ``test_list``); stdin/stdout cases
  (``io: [{input, output}]`` or parallel ``inputs``/``outputs``, also as verl's
  ``reward_model.ground_truth``); the code-RL datasets' test cases: APPS/TACO
  ``input_output`` (``{inputs, outputs, fn_name?}``, as JSON text), DeepCoder's ``tests``
  (that object, or a list of ``{input, output, testtype}`` cases), LiveCodeBench's
  ``public_test_cases``/``private_test_cases`` with ``metadata.func_name``, the same JSON in
  verl's ``reward_model.ground_truth``; KodCode's pytest file in ``test``. Call-based cases
  (a ``fn_name``, or LiveCodeBench's ``testtype: functional``) become ``entry_point`` =
  the function and ``io`` cases whose input is one JSON value per argument and line and
  whose output is the return value as JSON (``rewards/code_tests.py`` calls the function).

Row numbers are 0-based, as ``datasets`` and pandas index rows (for a JSON Lines file without
blank lines, row N is line N + 1). A file that does not parse raises `SourceError` naming the
file and the 1-based line, as editors show it. A row whose content is unusable raises
`InvalidRow` naming the source, the row and the field; the ingest stage either stops on it
or, when asked to skip invalid rows, records it in ``rejected.parquet``.

A row's ``data_source`` is where grpoflow read it (the file as given, or the dataset and its
split), so ``data_source`` and ``source_row`` find the row again; a verl row's own
``data_source`` (and ``ability``) are kept in ``extra_info``.

Nothing in a row is dropped: every column grpoflow does not map lands in ``extra_info``
(JSON), next to the row's own ``extra_info`` object. When both carry a key with different
values, the row's ``extra_info`` keeps the key and the column is stored as ``column:<name>``.
"""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import sys
import zlib
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from data.errors import UserError
from data.schemas import PROMPTS

if TYPE_CHECKING:
    import datasets

# Rows are read from Parquet in batches of this many: bounded memory for any file size.
PARQUET_BATCH_ROWS = 1024

JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (*JSON_SUFFIXES, ".csv")
FILE_SUFFIXES = (*TEXT_SUFFIXES, ".parquet", *(f"{s}.gz" for s in TEXT_SUFFIXES))


class SourceError(UserError):
    """A source cannot be read at all: missing, of an unknown kind, or not parseable.

    Deterministic, so the ingest task does not retry it (unlike a hub that is briefly down).
    """


class InvalidRow(UserError):
    """One row cannot become a prompt; names the source, the 0-based row and the field."""

    def __init__(self, data_source: str, row: int, field: str, reason: str):
        self.data_source = data_source
        self.row = row
        self.field = field
        self.reason = reason
        super().__init__(f"{data_source} row {row}, field '{field}': {reason}")

    def __reduce__(self) -> tuple[type[InvalidRow], tuple[str, int, str, str]]:
        # an exception unpickles as cls(*args), and args is the one message
        return (InvalidRow, (self.data_source, self.row, self.field, self.reason))


# --------------------------------------------------------------------------- reading sources


def read_source(
    source: str | os.PathLike[str], *, split: str = "train", config: str | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(row number, raw row)`` for every row of `source`, streaming where possible.

    `split` and `config` apply to datasets only (a file is one split). Raises `SourceError`
    for a missing local path, an unknown file type or a file that does not parse.
    """
    path = Path(source).expanduser()
    if path.is_file():
        yield from _read_file(path, str(source))
    elif path.is_dir():
        yield from _read_dataset_folder(path, str(source), split)
    elif _looks_like_local_path(str(source)):
        # Never fall through to the hub for something that is plainly a path: the lookup
        # would take long to fail and then blame the network instead of the typo.
        raise SourceError(f"{source}: no such file or folder")
    else:
        name, config = _hub_name_and_config(str(source), config)
        yield from _read_hub_dataset(name, config, split)


def source_label(source: str | os.PathLike[str], *, split: str = "train", config: str | None = None) -> str:
    """How rows of `source` are named in ``data_source``, errors and ``rejected.parquet``.

    A file is named as given; a dataset with splits gets ``[split]``, since row numbers
    count within one split: ``openai/gsm8k:main[train]``.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return str(source)
    if path.is_dir():
        single_split = (path / "state.json").is_file()  # save_to_disk of one Dataset
        return str(source) if single_split else f"{source}[{split}]"
    name, config = _hub_name_and_config(str(source), config)
    return f"{name}:{config}[{split}]" if config else f"{name}[{split}]"


def _looks_like_local_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or source.lower().endswith(FILE_SUFFIXES)


def _hub_name_and_config(source: str, config: str | None) -> tuple[str, str | None]:
    name, sep, inline = source.partition(":")
    if sep and config is not None and inline != config:
        raise SourceError(f"{source}: config '{inline}' in the name contradicts config='{config}'")
    return name, (inline if sep else config)


def _read_file(path: Path, label: str) -> Iterator[tuple[int, dict[str, Any]]]:
    gzipped = path.suffix.lower() == ".gz"
    kind = Path(path.stem).suffix.lower() if gzipped else path.suffix.lower()
    if kind == ".parquet" and not gzipped:
        yield from _read_parquet(path, label)
    elif kind in TEXT_SUFFIXES:
        try:
            # utf-8-sig tolerates a byte-order mark; newline="" is what the csv module needs
            # and leaves JSON Lines alone.
            opener = gzip.open if gzipped else open
            with opener(path, "rt", encoding="utf-8-sig", newline="") as fh:
                if kind == ".csv":
                    yield from _read_csv(fh, label)
                elif kind == ".json" and _first_char(fh) == "[":
                    yield from _read_json_array(fh, label)
                else:
                    yield from _read_json_lines(fh, label)
        except UnicodeDecodeError as err:
            raise SourceError(f"{label}: not UTF-8 text (byte {err.start}: {err.reason})") from None
        except (gzip.BadGzipFile, EOFError) as err:
            raise SourceError(f"{label}: not a readable gzip file ({err})") from None
    else:
        raise SourceError(f"{label}: unsupported file type (expected one of {', '.join(FILE_SUFFIXES)})")


def _first_char(fh: TextIO) -> str:
    while (char := fh.read(1)) and char.isspace():
        pass
    fh.seek(0)
    return char


def _read_json_lines(fh: TextIO, label: str) -> Iterator[tuple[int, dict[str, Any]]]:
    row = 0
    for line_no, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.rstrip("\r\n"))  # else a column past the end reads as 1
        except json.JSONDecodeError as err:
            raise SourceError(
                f"{label} line {line_no}: not valid JSON ({err.msg} at column {err.colno}); "
                "expected one JSON object per line"
            ) from None
        if not isinstance(obj, dict):
            raise SourceError(f"{label} line {line_no}: expected a JSON object, got {_type_name(obj)}")
        yield row, obj
        row += 1


def _read_json_array(fh: TextIO, label: str) -> Iterator[tuple[int, dict[str, Any]]]:
    # A JSON array has no streaming parser in the standard library; JSON Lines is the
    # format for large sources, and the docs say so.
    try:
        items = json.load(fh)
    except json.JSONDecodeError as err:
        raise SourceError(f"{label} line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    for row, obj in enumerate(items):
        if not isinstance(obj, dict):
            raise SourceError(f"{label} item {row}: expected a JSON object, got {_type_name(obj)}")
        yield row, obj


def _read_parquet(path: Path, label: str) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS)
        row = 0
        for batch in batches:
            for obj in batch.to_pylist():
                yield row, obj
                row += 1
    except (pa.ArrowException, OSError) as err:
        raise SourceError(f"{label}: not a readable Parquet file ({err})") from None


# CSV has no nested types, so chat prompts, test lists and metadata objects are written into
# their cells as JSON text; these are the columns where such text is decoded.
_CSV_JSON_COLUMNS = frozenset(
    {"prompt", "messages", "tests", "test_list", "io", "inputs", "outputs", "reward_model", "extra_info"}
)


def _read_csv(fh: TextIO, label: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Every cell stays text (no type guessing: an answer "007" stays "007"); an empty
    cell is a missing value, since CSV cannot tell the two apart."""
    # Code prompts and test suites easily exceed the csv module's default 128 KiB cell limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.reader(fh)
    try:
        header = next(reader, None)
        if header is None:
            return
        for row, cells in enumerate(reader):
            if len(cells) != len(header):
                raise SourceError(
                    f"{label} line {reader.line_num}: {len(cells)} fields, but the header has {len(header)}"
                )
            yield row, {name: _csv_cell(name, cell) for name, cell in zip(header, cells, strict=True)}
    except csv.Error as err:
        raise SourceError(f"{label} line {reader.line_num}: not valid CSV ({err})") from None


def _csv_cell(column: str, cell: str) -> Any:
    if cell == "":
        return None
    if column in _CSV_JSON_COLUMNS and cell.lstrip()[:1] in ("[", "{"):
        try:
            decoded = json.loads(cell)
        except json.JSONDecodeError:
            return cell  # text that merely starts with a bracket
        # A text prompt may itself be JSON ("[3, 1, 2]"); only a list of objects is a chat.
        if column == "prompt" and not (
            isinstance(decoded, list) and decoded and all(isinstance(m, dict) for m in decoded)
        ):
            return cell
        return decoded
    return cell


def _read_dataset_folder(path: Path, label: str, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    import datasets  # imported here: a second of start-up that plain files never need

    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise SourceError(f"{label}: no split '{split}' (splits: {', '.join(dataset)})")
            dataset = dataset[split]
    else:
        dataset = _load_dataset(label, str(path), None, split)
    yield from enumerate(dataset)


def _read_hub_dataset(name: str, config: str | None, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    # Not streamed: `load_dataset` caches the split as memory-mapped Arrow, so a retried task
    # (hubs fail transiently) does not download it again. Network errors are left as they
    # are so that the task's retries see them.
    label = f"{name}:{config}" if config else name
    yield from enumerate(_load_dataset(label, name, config, split))


def _load_dataset(label: str, path: str, config: str | None, split: str) -> datasets.Dataset:
    import datasets
    from datasets.exceptions import DatasetGenerationError

    try:
        return datasets.load_dataset(path, config, split=split)
    except DatasetGenerationError as err:
        # The useful part (which file, which row) is in the chain of causes.
        raise SourceError(f"{label}: datasets could not read it ({_root_cause(err)})") from None
    except (ValueError, FileNotFoundError) as err:  # unknown split, no data files, ...
        raise SourceError(f"{label}: {err}") from None
    except ConnectionError:
        if hub_offline():  # no retry can help: say so, and what to do instead
            raise SourceError(
                f"dataset '{label}' is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE / "
                "HF_DATASETS_OFFLINE is set): give a local .jsonl/.parquet/.csv file or dataset folder, or load it "
                "once where the hub is reachable so that it is cached"
            ) from None
        raise


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off for this process (its own env switches)."""
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}"


# --------------------------------------------------------------------------- normalising rows

# Columns that become a PROMPTS field. The first present one of each alias list is used; the
# others, if any, go to extra_info like every other unmapped column.
_PROMPT_COLUMNS = ("messages", "prompt", "question", "problem", "question_content")
_ANSWER_COLUMNS = ("answer", "solution")
_TESTS_COLUMNS = ("tests", "test_list")
# Test-case columns of the code-RL datasets: APPS/TACO, LiveCodeBench (public and private).
_CASE_COLUMNS = ("input_output", "public_test_cases", "private_test_cases")
_GOLD_FIELDS = ("answer", "test", "entry_point", "tests", "io")


def normalise_row(raw: Mapping[str, Any], *, data_source: str, row: int, task: str | None = None) -> dict[str, Any]:
    """One PROMPTS row (every column of `data.schemas.PROMPTS`) from a raw source row.

    `task` overrides the row's ``task`` column; without either, a row with tests is
    ``code`` and any other ``math``. Raises `InvalidRow` for a missing prompt, a missing
    gold answer (or tests, for code), or a value of the wrong type.
    """
    bad = _Complaint(data_source, row)
    extra = _own_extra_info(raw.get("extra_info"), bad)
    # Columns consumed into a PROMPTS field; every other non-null column goes to extra_info.
    used = {"extra_info", "test", "entry_point"} | ({"task"} if task is None else set())

    prompt_column = _first_present(raw, _PROMPT_COLUMNS)
    if prompt_column is None:
        raise bad("prompt", f"missing prompt (expected one of the columns {', '.join(_PROMPT_COLUMNS)})")
    used.add(prompt_column)
    prompt, messages = _prompt(raw[prompt_column], prompt_column, bad)

    gold = _gold(raw, bad, extra, used)
    kind = _task_kind(task if task is not None else raw.get("task"), gold, bad)
    _check_gold_for_task(kind, gold, bad)

    out = {
        "prompt_id": prompt_id(prompt, messages, gold),
        "prompt": prompt,
        "messages": messages,
        "task": kind,
        **gold,
        "data_source": data_source,
        "source_row": row,
    }
    if raw.get("prompt_id") == out["prompt_id"]:
        used.add("prompt_id")  # our own id, read back: nothing to keep
    for column, value in raw.items():
        if column not in used and value is not None:
            _put(extra, column, value, "column")
    out["extra_info"] = json.dumps(extra, sort_keys=True, ensure_ascii=False, default=str) if extra else None
    return out


def prompt_id(prompt: str | None, messages: list[dict[str, str]] | None, gold: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the prompt and its gold fields, first 16 hex digits.

    Only content counts (not the file, row, task or metadata), so the same problem gets the
    same id from any file, format or run. A text prompt and the same text as one chat turn
    are different prompts: the model sees them differently.
    """
    content = {"prompt": prompt, "messages": messages, **{name: gold.get(name) for name in _GOLD_FIELDS}}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def prompts_table(rows: list[dict[str, Any]]) -> pa.Table:
    """A PROMPTS-schema table from rows made by `normalise_row`.

    For rows of your own, normalise them first, e.g. for the built-in task:
    ``prompts_table([normalise_row(p, data_source="builtin:arithmetic", row=i) for i, p in
    enumerate(problems)])``.
    """
    columns = set(PROMPTS.schema.names)
    for index, row in enumerate(rows):
        unknown = set(row) - columns
        if unknown:
            raise ValueError(f"prompts row {index}: unknown columns {sorted(unknown)}; pass rows through normalise_row")
        for required in ("prompt_id", "task"):
            if row.get(required) is None:
                raise ValueError(f"prompts row {index}: no '{required}'; pass rows through normalise_row")
    return pa.Table.from_pylist(rows, schema=PROMPTS.schema.with_metadata(PROMPTS.metadata()))


class _Complaint:
    """Builds the InvalidRow of one row, so each check names only the field and the reason."""

    def __init__(self, data_source: str, row: int):
        self.data_source = data_source
        self.row = row

    def __call__(self, field: str, reason: str) -> InvalidRow:
        return InvalidRow(self.data_source, self.row, field, reason)


def _first_present(raw: Mapping[str, Any], columns: tuple[str, ...]) -> str | None:
    return next((c for c in columns if raw.get(c) is not None), None)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _prompt(value: Any, column: str, bad: _Complaint) -> tuple[str | None, list[dict[str, str]] | None]:
    """(text prompt, None) or (None, chat messages)."""
    if isinstance(value, str):
        if not value.strip():
            raise bad(column, "empty prompt")
        return value, None
    if isinstance(value, list):
        if not value:
            raise bad(column, "empty chat (no messages)")
        return None, [_message(m, f"{column}[{i}]", bad) for i, m in enumerate(value)]
    raise bad(column, f"expected text or a list of chat messages, got {_type_name(value)}")


def _record_with(keys: tuple[str, str], value: Any, what: str, field: str, bad: _Complaint) -> Mapping[str, Any]:
    """`value` as an object whose only non-null keys are among `keys` (a message, a test case)."""
    if not isinstance(value, Mapping):
        raise bad(field, f"expected a {what} {{{', '.join(keys)}}}, got {_type_name(value)}")
    # Arrow structs carry every key of the column, null where a row has none: only keys
    # with a value count as "extra".
    unsupported = sorted(k for k, v in value.items() if k not in keys and v is not None)
    if unsupported:
        raise bad(field, f"unsupported {what} keys {unsupported} (only {' and '.join(keys)})")
    return value


def _message(value: Any, field: str, bad: _Complaint) -> dict[str, str]:
    value = _record_with(("role", "content"), value, "message", field, bad)
    for key in ("role", "content"):
        if not isinstance(value.get(key), str):
            raise bad(f"{field}.{key}", f"expected text, got {_type_name(value.get(key))}")
    if not value["role"].strip():
        raise bad(f"{field}.role", "empty role")
    return {"role": value["role"], "content": value["content"]}


def _own_extra_info(value: Any, bad: _Complaint) -> dict[str, Any]:
    """The row's own ``extra_info`` object (verl's), also when stored as JSON text (ours)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise bad("extra_info", "expected an object or JSON text of one, got text that is not JSON") from None
    if not isinstance(value, Mapping):
        raise bad("extra_info", f"expected an object, got {_type_name(value)}")
    return dict(value)


def _put(extra: dict[str, Any], key: str, value: Any, origin: str) -> None:
    if key not in extra or extra[key] == value:
        extra[key] = value
    else:
        extra[f"{origin}:{key}"] = value


def _gold(raw: Mapping[str, Any], bad: _Complaint, extra: dict[str, Any], used: set[str]) -> dict[str, Any]:
    """The gold fields (answer, test, entry_point, tests, io), from whichever layout."""
    gold: dict[str, Any] = {
        "answer": None,
        "test": _optional_text(raw.get("test"), "test", bad),
        "entry_point": _optional_text(raw.get("entry_point"), "entry_point", bad),
        "tests": None,
        "io": _io_cases(raw, bad, used),
    }
    tests_column = _first_present(raw, _TESTS_COLUMNS)
    if tests_column is not None:
        used.add(tests_column)
        if not _looks_like_cases(raw[tests_column]):
            gold["tests"] = _assert_list(raw[tests_column], tests_column, bad)
        else:  # DeepCoder keeps its cases in `tests`, as JSON text
            _add_cases(gold, _cases(raw[tests_column], tests_column, bad, _func_name(raw, bad)), tests_column, bad)
    for column in _CASE_COLUMNS:
        if raw.get(column) is not None:
            used.add(column)
            _add_cases(gold, _cases(raw[column], column, bad, _func_name(raw, bad)), column, bad)

    answer_column = _first_present(raw, _ANSWER_COLUMNS)
    if answer_column is not None:
        used.add(answer_column)
        gold["answer"] = _answer_text(raw[answer_column], answer_column, bad, extra)
    if raw.get("reward_model") is not None:
        used.add("reward_model")
        _verl_reward_model(raw["reward_model"], gold, bad, extra)
    return gold


def _optional_text(value: Any, field: str, bad: _Complaint) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad(field, f"expected text, got {_type_name(value)}")
    return value or None


def _gold_text(value: Any, field: str, bad: _Complaint) -> str | None:
    """Text as it is, a number as text (46.0 -> "46"), NaN (a missing cell) as None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):  # bool is an int in Python, but True is no gold answer
        raise bad(field, "expected text or a number, got bool")
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    raise bad(field, f"expected text or a number, got {_type_name(value)}")


def _answer_text(value: Any, field: str, bad: _Complaint, extra: dict[str, Any]) -> str | None:
    """The gold answer a checker compares against. GSM8K answers are a worked solution whose
    last line is ``#### 72``: the answer is what follows ``####`` (thousands separators
    removed), and the full text is kept in extra_info as ``solution``."""
    text = _gold_text(value, field, bad)
    if text is None:
        return None
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and lines[-1].lstrip().startswith("####"):
        final = lines[-1].lstrip()[4:].strip()
        if not final:
            raise bad(field, "nothing after '####' (GSM8K-style answer)")
        _put(extra, "solution", text, "grpoflow")
        return _drop_thousands_separators(final)
    return text.strip() or None


def _drop_thousands_separators(number: str) -> str:
    digits = number.replace(",", "")
    body = digits.lstrip("+-")
    return digits if body.replace(".", "", 1).isdigit() else number


def _verl_reward_model(value: Any, gold: dict[str, Any], bad: _Complaint, extra: dict[str, Any]) -> None:
    """verl keeps the gold in ``reward_model.ground_truth``: an answer, or (code) test cases
    ``{inputs, outputs}`` as an object or as its JSON text. An explicit top-level answer or
    io wins; the rest of ``reward_model`` (``style``) goes to extra_info."""
    if not isinstance(value, Mapping):
        raise bad("reward_model", f"expected an object {{ground_truth, style}}, got {_type_name(value)}")
    rest = dict(value)
    truth = rest.get("ground_truth")
    cases = _io_from_ground_truth(truth, bad)
    if cases is not None and gold["io"] is None:
        _add_cases(gold, cases, "reward_model.ground_truth", bad)
        rest.pop("ground_truth")
    elif cases is None and truth is not None and gold["answer"] is None:
        gold["answer"] = _answer_text(truth, "reward_model.ground_truth", bad, extra)
        rest.pop("ground_truth")
    rest = {k: v for k, v in rest.items() if v is not None}
    if rest:
        _put(extra, "reward_model", rest, "column")


def _io_from_ground_truth(truth: Any, bad: _Complaint) -> _Cases | None:
    field = "reward_model.ground_truth"
    if isinstance(truth, str) and truth.lstrip()[:1] in ("{", "["):
        try:
            decoded = json.loads(truth)
        except json.JSONDecodeError:
            return None  # an answer that happens to start with a brace, e.g. a set
        if isinstance(decoded, Mapping) or (isinstance(decoded, list) and decoded and _all_cases(decoded)):
            truth = decoded
    if isinstance(truth, Mapping) and "inputs" in truth and "outputs" in truth:
        return _cases(truth, field, bad, None)
    if isinstance(truth, list) and truth and _all_cases(truth):
        return _cases(truth, field, bad, None)
    if isinstance(truth, Mapping):
        raise bad(field, "expected an answer or test cases {inputs, outputs}, got an object")
    return None


# (io cases, the function name when they are call-based)
_Cases = tuple[list[dict[str, str]], str | None]


def _all_cases(items: Sequence[object]) -> bool:
    return all(isinstance(c, Mapping) and "input" in c and "output" in c for c in items)


def _looks_like_cases(value: Any) -> bool:
    """Test cases (DeepCoder's `tests`), as opposed to a list of assert statements."""
    if isinstance(value, str):
        return value.lstrip()[:1] in ("{", "[")
    return isinstance(value, Mapping) or (isinstance(value, list) and bool(value) and _all_cases(value))


def _func_name(raw: Mapping[str, Any], bad: _Complaint) -> str | None:
    """LiveCodeBench's function name: ``metadata`` (JSON text or an object) ``func_name``."""
    metadata = raw.get("metadata")
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError:
            return None
    name = metadata.get("func_name") if isinstance(metadata, Mapping) else None
    if name is not None and not isinstance(name, str):
        raise bad("metadata.func_name", f"expected text, got {_type_name(name)}")
    return name or None


def _cases(value: Any, field: str, bad: _Complaint, func_name: str | None) -> _Cases | None:
    """Test cases as the code-RL datasets publish them, as `io` cases plus the function name
    of call-based ones. `value`: ``{inputs, outputs, fn_name?}`` (APPS, TACO, PRIME), a list
    of ``{input, output, testtype?, metadata?}`` (LiveCodeBench, DeepCoder), either as JSON
    text, or LiveCodeBench's compressed private cases (base64 of zlib of a pickled JSON text)."""
    if isinstance(value, str):
        value = _decode_cases_text(value, field, bad)
    if isinstance(value, Mapping):
        if "inputs" not in value or "outputs" not in value:
            raise bad(field, "expected test cases {inputs, outputs, fn_name}")
        fn_name = value.get("fn_name") or None
        if fn_name is None:
            return _stdin_cases(value["inputs"], value["outputs"], field, bad), None
        if not isinstance(fn_name, str):
            raise bad(f"{field}.fn_name", f"expected text, got {_type_name(fn_name)}")
        return _call_cases(value["inputs"], value["outputs"], field, bad), fn_name
    if isinstance(value, list):
        if not value:
            return None
        functional = []
        for i, case in enumerate(value):
            if not isinstance(case, Mapping) or "input" not in case or "output" not in case:
                raise bad(f"{field}[{i}]", "expected a case {input, output}")
            metadata = case.get("metadata")
            name = case.get("fn_name") or (metadata.get("func_name") if isinstance(metadata, Mapping) else None)
            functional.append(case.get("testtype") == "functional" or bool(name))
            func_name = func_name or name
        if any(functional) and not all(functional):
            raise bad(field, "mixes functional and stdin cases")
        inputs, outputs = [c["input"] for c in value], [c["output"] for c in value]
        if not any(functional):
            return _stdin_cases(inputs, outputs, field, bad), None
        if not func_name:
            raise bad(field, "functional cases without a function name (expected metadata.func_name or fn_name)")
        return _call_cases(inputs, outputs, field, bad), func_name
    raise bad(field, f"expected test cases (an object or a list), got {_type_name(value)}")


def _decode_cases_text(text: str, field: str, bad: _Complaint) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:  # LiveCodeBench's private cases: base64(zlib(pickle(json text)))
        decoded = _RestrictedUnpickler(io.BytesIO(zlib.decompress(base64.b64decode(text, validate=True)))).load()
        return json.loads(decoded) if isinstance(decoded, str) else decoded
    except (ValueError, zlib.error, pickle.UnpicklingError, EOFError, json.JSONDecodeError) as err:
        raise bad(field, f"expected test cases as JSON text: {type(err).__name__}: {str(err)[:200]}") from None


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds strings, numbers and containers only: a pickle naming any class or function
    (the only way a pickle runs code) is refused. The dataset's data, never a candidate's."""

    def find_class(self, module: str, name: str) -> NoReturn:
        raise pickle.UnpicklingError(f"refused to load {module}.{name} from the test cases")


def _stdin_cases(inputs: Any, outputs: Any, field: str, bad: _Complaint) -> list[dict[str, str]]:
    """APPS joins a case given as a list of lines with newlines; so does this."""
    if isinstance(inputs, list) and isinstance(outputs, list):
        inputs = ["\n".join(map(str, i)) if isinstance(i, list) else i for i in inputs]
        outputs = ["\n".join(map(str, o)) if isinstance(o, list) else o for o in outputs]
    return _parallel_io(inputs, outputs, field, bad) or []


def _call_cases(inputs: Any, outputs: Any, field: str, bad: _Complaint) -> list[dict[str, str]]:
    """Call-based cases: input one JSON value per argument and line, output JSON. Inputs
    published as argument lists (APPS, TACO) are written so, their outputs as JSON; inputs
    already in that text form (LiveCodeBench, PRIME) keep theirs and their output text."""
    for name, values in (("inputs", inputs), ("outputs", outputs)):
        if not isinstance(values, list):
            raise bad(f"{field}.{name}", f"expected a list, got {_type_name(values)}")
    if len(inputs) != len(outputs):
        raise bad(f"{field}.outputs", f"{len(outputs)} outputs for {len(inputs)} inputs")
    cases = []
    for n, (args, output) in enumerate(zip(inputs, outputs, strict=True)):
        if isinstance(args, list):
            cases.append({"input": "\n".join(json.dumps(a) for a in args), "output": json.dumps(output)})
        elif isinstance(args, str) and isinstance(output, str):
            cases.append({"input": args, "output": output})
        else:
            raise bad(f"{field}.inputs[{n}]", f"expected an argument list or JSON lines, got {_type_name(args)}")
    return cases


def _add_cases(gold: dict[str, Any], cases: _Cases | None, field: str, bad: _Complaint) -> None:
    """Add `cases` to the row's io; call-based ones set its entry_point to their function."""
    if cases is None or not cases[0]:
        return
    io_cases, fn_name = cases
    if fn_name is not None:
        if gold["entry_point"] not in (None, fn_name):
            raise bad(field, f"cases call {fn_name}() but the row's entry_point is {gold['entry_point']}")
        if gold["io"] and gold["entry_point"] is None:
            raise bad(field, "functional cases beside stdin/stdout cases")
        gold["entry_point"] = fn_name
    elif gold["io"] and gold["entry_point"] is not None:
        raise bad(field, "stdin/stdout cases beside functional cases")
    gold["io"] = [*(gold["io"] or []), *io_cases]


def _io_cases(raw: Mapping[str, Any], bad: _Complaint, used: set[str]) -> list[dict[str, str]] | None:
    if raw.get("io") is not None:
        used.add("io")
        cases = raw["io"]
        if not isinstance(cases, list):
            raise bad("io", f"expected a list of {{input, output}} cases, got {_type_name(cases)}")
        return [_io_case(case, f"io[{i}]", bad) for i, case in enumerate(cases)] or None
    if raw.get("inputs") is not None or raw.get("outputs") is not None:
        used.update(("inputs", "outputs"))
        return _parallel_io(raw.get("inputs"), raw.get("outputs"), "", bad)
    return None


def _io_case(case: Any, field: str, bad: _Complaint) -> dict[str, str]:
    # Only stdin/stdout cases: a case with e.g. LiveCodeBench's testtype "functional" is not one.
    case = _record_with(("input", "output"), case, "case", field, bad)
    return {key: _required_gold_text(case.get(key), f"{field}.{key}", bad) for key in ("input", "output")}


def _parallel_io(inputs: Any, outputs: Any, prefix: str, bad: _Complaint) -> list[dict[str, str]] | None:
    dot = f"{prefix}." if prefix else ""
    for name, values in (("inputs", inputs), ("outputs", outputs)):
        if not isinstance(values, list):
            raise bad(f"{dot}{name}", f"expected a list of texts, got {_type_name(values)}")
    if len(inputs) != len(outputs):
        raise bad(f"{dot}outputs", f"{len(outputs)} outputs for {len(inputs)} inputs")
    return [
        {
            "input": _required_gold_text(i, f"{dot}inputs[{n}]", bad),
            "output": _required_gold_text(o, f"{dot}outputs[{n}]", bad),
        }
        for n, (i, o) in enumerate(zip(inputs, outputs, strict=True))
    ] or None


def _required_gold_text(value: Any, field: str, bad: _Complaint) -> str:
    text = None if value is None else _gold_text(value, field, bad)
    if text is None:
        raise bad(field, "missing")
    return text


def _assert_list(value: Any, field: str, bad: _Complaint) -> list[str] | None:
    if not isinstance(value, list):
        raise bad(field, f"expected a list of assert statements, got {_type_name(value)}")
    for i, test in enumerate(value):
        if not isinstance(test, str):
            raise bad(f"{field}[{i}]", f"expected text, got {_type_name(test)}")
    return value or None


def _task_kind(given: Any, gold: Mapping[str, Any], bad: _Complaint) -> str:
    if given is not None:
        if not isinstance(given, str) or not given.strip():
            raise bad("task", f"expected a task name such as 'math' or 'code', got {given!r}")
        return given.strip()
    has_tests = any(gold[name] is not None for name in ("test", "tests", "io"))
    return "code" if has_tests else "math"


def _check_gold_for_task(kind: str, gold: Mapping[str, Any], bad: _Complaint) -> None:
    if kind == "code":
        if all(gold[name] is None for name in ("test", "tests", "io")):
            raise bad("tests", "code row without tests (expected test, tests, io, or inputs/outputs)")
    elif gold["answer"] is None:
        raise bad("answer", "missing gold answer (expected answer, solution or reward_model.ground_truth)")
