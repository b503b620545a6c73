"""Re-scoring cached generations: tagged files beside the originals, never over them, a
comparison with the earlier scoring, streamed, and no model loaded."""

from __future__ import annotations

import itertools
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.schemas import ADVANTAGES, GENERATIONS, PROMPTS, REWARDS, SchemaError
from data.sources import normalise_row, prompts_table
from data.store import Manifest, iter_groups, read_table, write_table
from flows.config import GRPOConfig
from tasks.advantages import compute_advantages
from tasks.score import score_generations

# Three problems, four completions each: (completion, is it the gold answer?)
PROBLEMS = [("12+30=", "42"), ("50+25=", "75"), ("11+11=", "22")]
COMPLETIONS = [["42", "41", "42", "4 2"], ["75", "75", "75", "75"], ["x", "22", "", "222"]]


def longer_is_better(completion: str, example) -> float:
    return float(len(completion))


def write_generations(path, prompt_ids: list[str], completions: list[list[str]]) -> None:
    rows = [(pid, i, c) for pid, group in zip(prompt_ids, completions, strict=True) for i, c in enumerate(group)]
    table = pa.table(
        {
            "prompt_id": [r[0] for r in rows],
            "sample_index": [r[1] for r in rows],
            "prompt_text": ["q"] * len(rows),
            "completion": [r[2] for r in rows],
            "prompt_token_ids": [[1, 2]] * len(rows),
            "completion_token_ids": [[3]] * len(rows),
            "old_logprobs": [[-0.5]] * len(rows),
            "ref_logprobs": [None] * len(rows),
            "finish_reason": ["eos"] * len(rows),
            "sampler_logprobs": [None] * len(rows),
        },
        schema=GENERATIONS.schema,
    )
    write_table(table, path, GENERATIONS)


@pytest.fixture()
def run_dir(tmp_path):
    """A run folder with one scored iteration, made without any model."""
    run = tmp_path / "run"
    folder = run / "iter-0001"
    prompts = prompts_table(
        [
            normalise_row({"prompt": q, "answer": a, "task": "arithmetic"}, data_source="t", row=i)
            for i, (q, a) in enumerate(PROBLEMS)
        ]
    )
    write_table(prompts, folder / "prompts.parquet", PROMPTS)
    write_generations(folder / "generations.parquet", prompts["prompt_id"].to_pylist(), COMPLETIONS)
    config = GRPOConfig(run_dir=run, rewards={"exact_answer": 1.0})
    (run / "config.json").write_text(json.dumps({"config": config.model_dump(mode="json")}))
    manifest = Manifest(folder)
    for name in ("prompts.parquet", "generations.parquet"):
        manifest.record(name)
    score_generations(
        folder / "generations.parquet", folder / "prompts.parquet", folder / "rewards.parquet", {"exact_answer": 1.0}
    )
    compute_advantages(folder / "rewards.parquet", folder / "advantages.parquet")
    manifest.record("rewards.parquet")
    manifest.record("advantages.parquet")
    return run


@pytest.fixture()
def no_model(monkeypatch):
    """Any attempt to load a model fails the test. (Patched where every loader ends up, on
    the class: names imported elsewhere with `from ... import` would keep a patched copy.)"""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("re-scoring loaded a model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.slow  # the rescore flow on a Prefect API
def test_rescore_writes_tagged_files_beside_the_originals_and_compares(run_dir, no_model, prefect_harness):
    from flows.rescore import grpo_rescore

    folder = run_dir / "iter-0001"
    originals = {p.name: p.read_bytes() for p in folder.glob("*.parquet")}
    rewards = {"exact_answer": 1.0, "tests.test_rescore:longer_is_better": 0.5}
    [result] = grpo_rescore(str(run_dir), "v2", rewards=rewards)

    assert {p.name: p.read_bytes() for p in folder.glob("*.parquet") if "@" not in p.name} == originals
    new = read_table(folder / "rewards@v2.parquet", REWARDS).to_pylist()
    adv = read_table(folder / "advantages@v2.parquet", ADVANTAGES).to_pylist()
    flat = [c for group in COMPLETIONS for c in group]
    golds = [a for _, a in PROBLEMS for _ in range(4)]
    expected = [float(c == g) + 0.5 * len(c) for c, g in zip(flat, golds, strict=True)]
    assert [r["reward"] for r in new] == expected
    assert [r["reward"] for r in adv] == expected
    assert all(set(r) >= {"reward/exact_answer", "reward/tests.test_rescore:longer_is_better"} for r in new)

    before = [float(c == g) for c, g in zip(flat, golds, strict=True)]
    assert result["rows"] == 12
    assert result["mean_before"] == pytest.approx(sum(before) / 12)
    assert result["mean_after"] == pytest.approx(sum(expected) / 12)
    assert (
        result["changed"] == sum(b != a for b, a in zip(before, expected, strict=True)) == 11
    )  # the empty completion scores 0 both times
    first = result["examples"][0]
    assert (first["sample_index"], first["before"], first["after"], first["completion"]) == (0, 1.0, 2.0, "42")

    entry = Manifest(folder).entries()["rewards@v2.parquet"]
    assert entry["rescore"] == {"tag": "v2", "rewards": rewards} and Manifest(folder).is_done("rewards@v2.parquet")


@pytest.mark.slow  # the rescore flow on a Prefect API
def test_an_existing_tag_is_never_overwritten_but_an_interrupted_one_goes_on(run_dir, prefect_harness):
    from flows.rescore import TagInUse, grpo_rescore

    folder = run_dir / "iter-0001"
    grpo_rescore(str(run_dir), "t", rewards={"tests.test_rescore:longer_is_better": 1.0})
    written = (folder / "rewards@t.parquet").read_bytes()
    with pytest.raises(
        TagInUse, match=r"rewards@t\.parquet already exists \(re-scoring never overwrites\): choose another --tag"
    ):
        grpo_rescore(str(run_dir), "t", rewards={"exact_answer": 1.0})
    # Same tag, same rewards: an interrupted re-scoring finishes, done files kept as they are.
    (folder / "advantages@t.parquet").unlink()
    grpo_rescore(str(run_dir), "t", rewards={"tests.test_rescore:longer_is_better": 1.0})
    assert (folder / "rewards@t.parquet").read_bytes() == written and (folder / "advantages@t.parquet").is_file()
    # A file the user put there under that name is not overwritten either.
    (folder / "rewards@mine.parquet").write_bytes(b"not ours")
    with pytest.raises(TagInUse):
        grpo_rescore(str(run_dir), "mine", rewards={"exact_answer": 1.0})
    assert (folder / "rewards@mine.parquet").read_bytes() == b"not ours"


@pytest.mark.slow  # the rescore flow on a Prefect API
def test_one_generations_file_can_be_rescored_and_the_cli_prints_the_comparison(run_dir, capsys, prefect_harness):
    from flows.cli import main

    gens = run_dir / "iter-0001" / "generations.parquet"
    code = main(["rescore", str(gens), "--rewards", '{"tests.test_rescore:longer_is_better": 1.0}', "--tag", "cli"])
    out = capsys.readouterr().out
    assert code == 0
    assert "run/iter-0001: mean reward 0.5833 -> 1.9167 (rewards@cli.parquet); 11 of 12 rows changed" in out
    assert "#0: 1 -> 2  '42'" in out


@pytest.mark.slow  # the rescore command on a Prefect API
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tag", "../escape"], "tag '../escape': use letters, digits"),
        (["--rewards", '{"no_such_reward": 1}'], "unknown reward 'no_such_reward'"),
    ],
)
def test_bad_rescore_arguments_are_one_line_errors(run_dir, capsys, argv, message, prefect_harness):
    from flows.cli import main

    code = main(["rescore", str(run_dir), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("grpo: error:") and message in err[-1]
    assert not list((run_dir / "iter-0001").glob("*@*"))


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"estimator": "rloo"},
        {"estimator": "dr_grpo"},
        {"scale_rewards": "batch"},
        {"estimator": "rloo", "scale_rewards": "batch"},
        {"dynamic_sampling": True, "target_groups": 1},
    ],
)
def test_advantages_streamed_in_small_chunks_equal_one_pass(tmp_path, run_dir, settings):
    import torch

    from tasks.objective import group_advantages

    rewards = run_dir / "iter-0001" / "rewards.parquet"
    whole = compute_advantages(rewards, tmp_path / "whole.parquet", chunk_rows=1_000_000, **settings)
    chunked = compute_advantages(
        rewards, tmp_path / "chunked.parquet", chunk_rows=3, **settings
    )  # smaller than a group
    assert pq.read_table(tmp_path / "chunked.parquet").equals(pq.read_table(tmp_path / "whole.parquet"))
    assert chunked == pytest.approx(whole, rel=1e-12, nan_ok=True)
    # ... and the numbers are the objective's own, computed on the whole table at once.
    table = read_table(rewards, REWARDS)
    ids = torch.tensor(
        [
            [
                p for i, p in enumerate(table["prompt_id"].to_pylist()) if p not in table["prompt_id"].to_pylist()[:i]
            ].index(p)
            for p in table["prompt_id"].to_pylist()
        ]
    )
    expected = group_advantages(
        torch.tensor(table["reward"].to_pylist(), dtype=torch.float64),
        ids,
        settings.get("estimator", "grpo"),
        settings.get("scale_rewards"),
        1e-4,
    )
    got = read_table(tmp_path / "chunked.parquet", ADVANTAGES)["advantage"].to_pylist()
    assert got == pytest.approx(expected.advantage.float().tolist(), rel=1e-6)
    assert (whole["dynamic_sampling/groups"], whole["frac_reward_zero_std"]) == (3, pytest.approx(1 / 3))


def test_a_group_split_across_the_file_is_an_error_naming_the_row(tmp_path):
    path = tmp_path / "rewards.parquet"
    ids = ["a", "a", "b", "b", "a"]
    write_table(
        pa.table(
            {"prompt_id": ids, "sample_index": pa.array([0, 1, 0, 1, 2], pa.int32()), "reward": [1.0] * 5},
            schema=REWARDS.schema,
        ),
        path,
        REWARDS,
    )
    with pytest.raises(SchemaError, match=r"rewards.parquet: row 4: prompt_id 'a' appears again after other groups"):
        list(iter_groups(path, REWARDS, batch_rows=2))
    # Adjacent groups stream whole, whatever the batch size.
    write_table(
        pa.table(
            {
                "prompt_id": ["a", "a", "a", "b", "c", "c"],
                "sample_index": pa.array([0, 1, 2, 0, 0, 1], pa.int32()),
                "reward": [1.0] * 6,
            },
            schema=REWARDS.schema,
        ),
        path,
        REWARDS,
    )
    for batch_rows in (1, 2, 4, 100):
        chunks = [t["prompt_id"].to_pylist() for t in iter_groups(path, REWARDS, batch_rows=batch_rows)]
        assert sum(chunks, []) == ["a", "a", "a", "b", "c", "c"]
        assert all(len({c[-1]} & set(nxt)) == 0 for c, nxt in itertools.pairwise(chunks))  # no group split


def test_comparison_streams_in_chunks(run_dir, tmp_path):
    from flows.rescore import compare_rewards

    folder = run_dir / "iter-0001"
    score_generations(
        folder / "generations.parquet",
        folder / "prompts.parquet",
        tmp_path / "new.parquet",
        {"tests.test_rescore:longer_is_better": 1.0},
    )
    whole = compare_rewards(folder / "rewards.parquet", tmp_path / "new.parquet", folder / "generations.parquet")
    chunked = compare_rewards(
        folder / "rewards.parquet", tmp_path / "new.parquet", folder / "generations.parquet", chunk_rows=5
    )
    assert whole == chunked and whole["changed"] == 11
    alone = compare_rewards(None, tmp_path / "new.parquet", folder / "generations.parquet")
    assert alone["changed"] is None and math.isclose(alone["mean_after"], whole["mean_after"])


def write_incompressible_generations(path, groups: int, rows: int) -> None:
    """`groups` row groups of `rows` generations each (8 per prompt), with random token ids
    that do not compress: ~250 kB per row group of 2048 rows."""
    import numpy as np

    from data.store import ParquetStreamWriter

    rng = np.random.default_rng(0)
    with ParquetStreamWriter(path, GENERATIONS) as out:
        for g in range(groups):
            tokens = pa.ListArray.from_arrays(
                pa.array(np.arange(0, (rows + 1) * 30, 30, dtype=np.int32)),
                pa.array(rng.integers(0, 50_000, rows * 30).astype(np.int32)),
            )
            out.write(
                pa.table(
                    {
                        "prompt_id": [f"{i // 8}-{g}" for i in range(rows)],
                        "sample_index": pa.array([i % 8 for i in range(rows)], pa.int32()),
                        "prompt_text": ["q"] * rows,
                        "completion": [f"a{g}-{i}" for i in range(rows)],
                        "prompt_token_ids": tokens,
                        "completion_token_ids": tokens,
                        "old_logprobs": pa.nulls(rows, pa.list_(pa.float32())).fill_null(
                            pa.scalar([], pa.list_(pa.float32()))
                        ),
                        "ref_logprobs": pa.nulls(rows, pa.list_(pa.float32())),
                        "finish_reason": ["eos"] * rows,
                        "sampler_logprobs": pa.nulls(rows, pa.list_(pa.float32())),
                    },
                    schema=GENERATIONS.schema,
                )
            )


def test_streaming_a_file_holds_one_batch_not_the_file(tmp_path):
    """iter_batches (every streaming reader's) must not keep the row groups it has read:
    pyarrow's pre-buffering kept the file's bytes, ~85 MB per million generations."""
    from data.store import iter_batches

    path = tmp_path / "generations.parquet"
    rows = 2048
    write_incompressible_generations(path, groups=32, rows=rows)
    before = pa.total_allocated_bytes()
    most = 0
    for _batch in iter_batches(
        path, GENERATIONS, batch_size=rows, columns=["prompt_id", "completion", "completion_token_ids"]
    ):
        most = max(most, pa.total_allocated_bytes() - before)
    assert most < 2 * 2**20, f"{most / 2**20:.1f} MB held while streaming a {path.stat().st_size / 2**20:.1f} MB file"


def test_filtered_read_streams_and_keeps_only_the_matching_rows(tmp_path, arrow_peak):
    """read_rows_where (the comparison's and `grpo inspect`'s lookups by prompt) scans the
    file a batch at a time: a filtered pq.read_table read ahead most of the file (9 MB of
    this 13 MB one) to return 16 rows."""
    from data.store import read_rows_where

    path = tmp_path / "generations.parquet"
    rows = 2048
    write_incompressible_generations(path, groups=32, rows=rows)
    columns = ["prompt_id", "sample_index", "completion", "completion_token_ids"]
    wanted = ["255-31", "0-3", "not-there", "0-3"]  # out of file order, one missing, one twice

    def read() -> tuple[list[str], list[tuple]]:
        found = read_rows_where(path, GENERATIONS, "prompt_id", wanted, columns, batch_size=rows)
        return found.column_names, [
            (r["prompt_id"], r["sample_index"], r["completion"]) for r in found.select(columns[:3]).to_pylist()
        ]

    (names, found), most = arrow_peak(read)
    assert names == columns
    assert found == [("0-3", i, f"a3-{i}") for i in range(8)] + [
        ("255-31", i, f"a31-{2040 + i}") for i in range(8)
    ]  # file order
    assert most < 3 * 2**20, (
        f"{most / 2**20:.1f} MB held to find 16 rows in a {path.stat().st_size / 2**20:.1f} MB file"
    )
    assert read_rows_where(path, GENERATIONS, "prompt_id", [], columns).num_rows == 0

    empty = tmp_path / "empty.parquet"
    write_generations(empty, [], [])
    assert read_rows_where(empty, GENERATIONS, "prompt_id", ["0-3"], columns).column_names == columns
