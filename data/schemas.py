"""The Arrow schema of every artifact, declared once, versioned, and checked on read.

A reader names the artifact it expects; `check_schema` compares the file's schema with the
declared one and fails with the file and the column at fault. Columns the declaration
marks as a *family* (``reward/<fn>``, ``error/<fn>``) may appear any number of times: the
rewards table has one column per reward function, whose names only the config knows.

Bump an artifact's ``version`` whenever its columns change meaning or type; the manifest
records the version each file was written with, so an old run dir is recognised as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa


class SchemaError(ValueError):
    """An artifact's columns do not match its declared schema."""


@dataclass(frozen=True)
class ArtifactSchema:
    name: str
    version: int
    schema: pa.Schema
    # Column-name prefix -> Arrow type, for families of columns such as `reward/<fn>`.
    families: dict[str, pa.DataType] = field(default_factory=dict)
    # Column -> the version that added it: a file written with an older version lacks it,
    # still reads, and shows it as all nulls (data.store.read_table).
    added: dict[str, int] = field(default_factory=dict)

    def absent_columns(self, actual: pa.Schema) -> list[str]:
        """Declared columns that `actual` lacks because its file predates them."""
        version = (actual.metadata or {}).get(b"grpoflow.version")
        if version is None:
            return []  # a table being written: every column is required
        return [name for name, since in self.added.items() if int(version) < since and actual.get_field_index(name) < 0]

    def metadata(self) -> dict[bytes, bytes]:
        return {b"grpoflow.artifact": self.name.encode(), b"grpoflow.version": str(self.version).encode()}

    def with_family_columns(self, names: list[str]) -> pa.Schema:
        """The declared schema plus the given family columns (e.g. ``reward/math``)."""
        fields = list(self.schema)
        for name in names:
            fields.append(pa.field(name, self._family_type(name), nullable=True))
        return pa.schema(fields).with_metadata(self.metadata())

    def _family_type(self, column: str) -> pa.DataType:
        for prefix, dtype in self.families.items():
            if column.startswith(prefix):
                return dtype
        raise KeyError(column)


_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
_IO_CASE = pa.struct([("input", pa.string()), ("output", pa.string())])

PROMPTS = ArtifactSchema(
    name="prompts",
    version=1,
    schema=pa.schema(
        [
            # sha256 of the prompt content and its gold fields (first 16 hex digits): the same
            # problem gets the same id whichever file or run it came from.
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("prompt", pa.string()),  # plain-text prompt, or null when `messages` is set
            pa.field("messages", pa.list_(_MESSAGE)),  # chat prompt, or null when `prompt` is set
            pa.field("task", pa.string(), nullable=False),  # e.g. "arithmetic", "math", "code"
            pa.field("answer", pa.string()),  # gold answer (math-style rows)
            pa.field("test", pa.string()),  # HumanEval-style `check(candidate)` code
            pa.field("entry_point", pa.string()),  # HumanEval-style function name
            pa.field("tests", pa.list_(pa.string())),  # assert statements
            pa.field("io", pa.list_(_IO_CASE)),  # stdin/stdout cases
            pa.field("data_source", pa.string()),  # where the row came from (file or dataset)
            pa.field("source_row", pa.int64()),  # its row number there (0-based)
            pa.field("extra_info", pa.string()),  # any other source metadata, as JSON
        ]
    ),
)

GENERATIONS = ArtifactSchema(
    name="generations",
    version=3,  # 2: old_logprobs may be null (not computed when the update takes one step); 3: sampler_logprobs
    schema=pa.schema(
        # Ignored: pyarrow-stubs types each Field by its Arrow type, and against pa.schema's union
        # of accepted inputs mypy joins a list of differently typed ones to list[object].
        [  # type: ignore[arg-type]
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("sample_index", pa.int32(), nullable=False),  # 0..G-1 within the group
            pa.field("prompt_text", pa.string(), nullable=False),  # as fed to the model
            pa.field("completion", pa.string(), nullable=False),
            pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("completion_token_ids", pa.list_(pa.int32()), nullable=False),
            # log pi_old(o_t | q, o_<t) per completion token, at the sampling temperature; null
            # when the update takes a single optimiser step (pi_old is then the policy it
            # updates, and it uses its own detached log-probs) unless store_old_logprobs is set.
            pa.field("old_logprobs", pa.list_(pa.float32())),
            # log pi_ref(o_t | q, o_<t); null when beta = 0 (no reference model is loaded).
            pa.field("ref_logprobs", pa.list_(pa.float32())),
            pa.field("finish_reason", pa.string(), nullable=False),  # "eos", "stop" (a stop string) or "length"
            # The generation engine's own log-prob of each token it drew, under the distribution
            # it drew from: softmax(logits / T), renormalised over the nucleus when top_p < 1
            # (tasks/engines); null in files of version < 3 and for greedy decoding.
            pa.field("sampler_logprobs", pa.list_(pa.float32())),
        ]
    ),
    added={"sampler_logprobs": 3},
)

# Generations as trajectories (issue 25): version 4 of the generations artifact, PROPOSED and
# not yet the one the stages write (GENERATIONS above stays in force until the generate stage
# writes these columns; then GENERATIONS becomes this declaration). One row is one episode.
# The token columns keep their meaning, widened: `completion_token_ids` are every token after
# the prompt, the model's turns and the environment's replies as the chat template renders
# them (tasks/rollout.py), and the per-token columns (old/ref/sampler log-probs) align with
# them; `loss_mask` says which of those tokens the policy produced: only they get a loss, a
# ratio, a KL term or a place in a normaliser. `completion` is the model's last turn (what
# a single-turn reward scores), `finish_reason` how that turn ended. Single-turn rows (and
# files of version < 4) leave every new column null: a null `loss_mask` means all ones.
_TOOL_CALL = pa.struct(
    [
        ("turn", pa.int32()),  # the model turn (0-based) that made the call
        ("name", pa.string()),  # "" when the call did not parse
        ("arguments", pa.string()),  # JSON text, or the raw text of a call that did not parse
        ("result", pa.string()),  # what the model was shown (capped)
        ("error", pa.string()),  # why the call failed, else null
        ("duration_s", pa.float64()),
        ("chars_cut", pa.int64()),  # of the result, by the tool's own cap (also in env_chars_cut)
    ]
)
_TURN_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string()), ("name", pa.string())])
TRAJECTORY_FIELDS: list[pa.Field[Any]] = [
    pa.field("loss_mask", pa.list_(pa.int8())),  # per completion token: 1 = the policy's, 0 = the environment's
    pa.field("messages", pa.list_(_TURN_MESSAGE)),  # the whole conversation, initial messages first
    pa.field("prompt_messages", pa.int32()),  # how many of `messages` preceded the model's first turn
    pa.field("turns", pa.int32()),  # model turns
    pa.field("end_reason", pa.string()),  # done, max_turns, max_tokens, length, error, timeout
    pa.field("env_error", pa.string()),  # the environment's error text (end_reason error / timeout)
    pa.field("tool_calls", pa.list_(_TOOL_CALL)),
    pa.field("env_info", pa.string()),  # the steps' info merged, as JSON: what rubrics read to re-score
    # environment text cut, in characters: replies by max_env_chars, tool results by their tool's cap
    pa.field("env_chars_cut", pa.int64()),
]
GENERATIONS_V4 = ArtifactSchema(
    name="generations",
    version=4,
    schema=pa.schema(list(GENERATIONS.schema) + TRAJECTORY_FIELDS),
    added={**GENERATIONS.added, **{f.name: 4 for f in TRAJECTORY_FIELDS}},
)

REWARDS = ArtifactSchema(
    name="rewards",
    version=1,
    schema=pa.schema(
        [  # type: ignore[arg-type]  # a list of differently typed Fields: see GENERATIONS
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("sample_index", pa.int32(), nullable=False),
            # Weighted sum over reward functions; NaN when any function failed on the row.
            pa.field("reward", pa.float64(), nullable=False),
        ]
    ),
    families={"reward/": pa.float64(), "error/": pa.string()},
)

ADVANTAGES = ArtifactSchema(
    name="advantages",
    version=1,
    schema=pa.schema(
        [  # type: ignore[arg-type]  # a list of differently typed Fields: see GENERATIONS
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("sample_index", pa.int32(), nullable=False),
            pa.field("reward", pa.float64(), nullable=False),
            pa.field("group_mean", pa.float64(), nullable=False),
            pa.field("group_std", pa.float64(), nullable=False),
            pa.field("advantage", pa.float32(), nullable=False),
            pa.field("kept", pa.bool_(), nullable=False),  # used by the update stage
            pa.field("drop_reason", pa.string()),  # why not kept (e.g. "zero_std"), else null
        ]
    ),
)

REJECTED = ArtifactSchema(
    name="rejected",
    version=1,
    schema=pa.schema(
        [  # type: ignore[arg-type]  # a list of differently typed Fields: see GENERATIONS
            pa.field("data_source", pa.string(), nullable=False),
            pa.field("source_row", pa.int64(), nullable=False),
            pa.field("field", pa.string(), nullable=False),
            pa.field("reason", pa.string(), nullable=False),
            pa.field("raw", pa.string(), nullable=False),  # the row as JSON, so nothing is lost
        ]
    ),
)

# Run-level metrics, one row per (iteration, metric): long format, so a new metric (or a new
# reward function's `rewards/<fn>/mean`) never changes the schema. Wide view:
# `pd.read_parquet(path).pivot(index="iteration", columns="name", values="value")`.
METRICS = ArtifactSchema(
    name="metrics",
    version=1,
    schema=pa.schema(
        [  # type: ignore[arg-type]  # a list of differently typed Fields: see GENERATIONS
            pa.field("iteration", pa.int32(), nullable=False),  # 0 = before training
            pa.field("name", pa.string(), nullable=False),  # e.g. "reward", "clip_ratio/low_mean"
            pa.field("value", pa.float64(), nullable=False),  # NaN when undefined that iteration
        ]
    ),
)

ARTIFACTS: dict[str, ArtifactSchema] = {
    s.name: s for s in (PROMPTS, GENERATIONS, REWARDS, ADVANTAGES, REJECTED, METRICS)
}


def check_schema(actual: pa.Schema, expected: ArtifactSchema, path: str | Path) -> None:
    """Fail, naming the file and the column, unless `actual` carries `expected`'s columns.

    Declared columns must be present with the declared type; extra columns are allowed only
    when they belong to a declared family (``reward/...``) with the family's type.
    """
    where = f"{path}: {expected.name} artifact"
    absent = set(expected.absent_columns(actual))
    for want in expected.schema:
        idx = actual.get_field_index(want.name)
        if idx < 0 and want.name in absent:
            continue
        if idx < 0:
            raise SchemaError(f"{where}: missing column '{want.name}' ({want.type})")
        got = actual.field(idx)
        if not got.type.equals(want.type):
            raise SchemaError(f"{where}: column '{want.name}' has type {got.type}, expected {want.type}")
    declared = set(expected.schema.names)
    for got in actual:
        if got.name in declared:
            continue
        try:
            family_type = expected._family_type(got.name)
        except KeyError:
            raise SchemaError(f"{where}: unexpected column '{got.name}'") from None
        if not got.type.equals(family_type):
            raise SchemaError(f"{where}: column '{got.name}' has type {got.type}, expected {family_type}")
    meta = actual.metadata or {}
    version = meta.get(b"grpoflow.version")
    if version is not None and int(version) > expected.version:
        raise SchemaError(
            f"{where}: written with schema version {int(version)}, this grpoflow reads up to {expected.version}"
        )
