"""tasks/advantages.py: the advantages artifact, NaN rewards, dynamic sampling (DAPO) and the
prompts of refill rounds."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pyarrow as pa
import pytest

from data import builtin
from data.schemas import ADVANTAGES, PROMPTS, REWARDS
from data.sources import normalise_row, prompts_table
from data.store import read_table, write_table
from tasks.advantages import DuplicateCompletion, compute_advantages, informative_groups, refill_prompts

NAN = math.nan


def write_rewards(path, groups: dict[str, list[float]], per_fn: dict[str, dict[str, list[float]]] | None = None):
    """rewards.parquet with one group per prompt id; `per_fn` adds reward/<fn> columns."""
    rows = [(pid, i, r) for pid, rs in groups.items() for i, r in enumerate(rs)]
    columns = {
        "prompt_id": [r[0] for r in rows],
        "sample_index": pa.array([r[1] for r in rows], pa.int32()),
        "reward": [r[2] for r in rows],
    }
    names = []
    for fn, by_prompt in (per_fn or {}).items():
        columns[f"reward/{fn}"] = [v for pid in groups for v in by_prompt[pid]]
        columns[f"error/{fn}"] = [None if not math.isnan(v) else "boom" for pid in groups for v in by_prompt[pid]]
        names += [f"reward/{fn}", f"error/{fn}"]
    write_table(pa.table(columns, schema=REWARDS.with_family_columns(names)), path, REWARDS)
    return path


def test_artifact_rows_statistics_and_metrics(tmp_path):
    groups = {"a": [0.0, 0.0, 1.0, 1.0], "b": [1.0, 1.0, 1.0, 1.0], "c": [2.0, NAN, 4.0, 3.0]}
    per_fn = {
        "acc": {"a": [0, 0, 1, 1], "b": [1, 1, 1, 1], "c": [1, NAN, 1, 1]},
        "fmt": {"a": [0] * 4, "b": [0] * 4, "c": [1, 0, 3, 2]},
    }
    path = write_rewards(
        tmp_path / "rewards.parquet",
        groups,
        {k: {p: [float(x) for x in v] for p, v in d.items()} for k, d in per_fn.items()},
    )
    out = tmp_path / "advantages.parquet"

    metrics = compute_advantages(path, out)

    rows = read_table(out, ADVANTAGES).to_pylist()
    assert len(rows) == 12 and all(r["kept"] and r["drop_reason"] is None for r in rows)
    adv = [r["advantage"] for r in rows]
    s_a, s_c = math.sqrt(1 / 3), 1.0  # c's valid rewards 2, 4, 3: mean 3, Bessel std 1
    assert adv[:4] == pytest.approx([-0.5 / (s_a + 1e-4)] * 2 + [0.5 / (s_a + 1e-4)] * 2, rel=1e-6)
    assert adv[4:8] == [0.0] * 4
    assert adv[8:] == pytest.approx([-1 / (s_c + 1e-4), 0.0, 1 / (s_c + 1e-4), 0.0], rel=1e-6)
    assert [r["group_mean"] for r in rows[8:]] == [3.0] * 4  # the NaN row is not a 0 reward
    assert [r["group_std"] for r in rows[4:9]] == [0.0] * 4 + [1.0]
    assert math.isnan(rows[9]["reward"])

    assert metrics["reward"] == pytest.approx((2 + 4 + 2 + 4 + 3) / 11)
    assert metrics["reward_std"] == pytest.approx(
        (4 * s_a + 0 + 4 * s_c) / 12
    )  # mean over rows of the group std, as TRL
    assert metrics["frac_reward_zero_std"] == pytest.approx(1 / 3)
    assert metrics["rewards/nan_count"] == 1
    assert metrics["rewards/acc/mean"] == pytest.approx(9 / 11)  # NaN left out, not a 0
    assert metrics["rewards/fmt/mean"] == pytest.approx(6 / 12)
    assert metrics["rewards/fmt/std"] == pytest.approx(
        math.sqrt(sum((x - 0.5) ** 2 for x in [0] * 8 + [1, 0, 3, 2]) / 11)
    )
    assert metrics["dynamic_sampling/frac_dropped"] == 0.0 and metrics["dynamic_sampling/kept_completions"] == 12


def test_estimators_reach_the_artifact(tmp_path):
    path = write_rewards(tmp_path / "rewards.parquet", {"a": [0.0, 0.0, 1.0, 1.0]})
    compute_advantages(path, tmp_path / "rloo.parquet", estimator="rloo")
    compute_advantages(path, tmp_path / "dr.parquet", estimator="dr_grpo")
    assert read_table(tmp_path / "rloo.parquet", ADVANTAGES)["advantage"].to_pylist() == pytest.approx(
        [-2 / 3, -2 / 3, 2 / 3, 2 / 3]
    )
    assert read_table(tmp_path / "dr.parquet", ADVANTAGES)["advantage"].to_pylist() == pytest.approx(
        [-0.5, -0.5, 0.5, 0.5]
    )
    with pytest.raises(ValueError, match="dr_grpo"):
        compute_advantages(path, tmp_path / "x.parquet", estimator="dr_grpo", scale_rewards="group")


def test_dynamic_sampling_drops_groups_without_spread_and_keeps_their_rows(tmp_path):
    groups = {"a": [0.0, 1.0], "b": [1.0, 1.0], "c": [NAN, 0.5], "d": [0.0, 2.0], "e": [3.0, 1.0]}
    path = write_rewards(tmp_path / "rewards.parquet", groups)
    out = tmp_path / "advantages.parquet"

    metrics = compute_advantages(path, out, dynamic_sampling=True)
    rows = read_table(out, ADVANTAGES).to_pylist()
    assert len(rows) == 10  # nothing disappears from the artifact
    reasons = {r["prompt_id"]: r["drop_reason"] for r in rows}
    assert reasons == {"a": None, "b": "zero_std", "c": "zero_std", "d": None, "e": None}
    assert all(r["kept"] == (r["drop_reason"] is None) for r in rows)
    assert metrics["dynamic_sampling/frac_dropped"] == pytest.approx(2 / 5)
    assert metrics["frac_reward_zero_std"] == pytest.approx(2 / 5)
    assert metrics["dynamic_sampling/kept_groups"] == 3 and metrics["dynamic_sampling/kept_completions"] == 6

    # Enough groups with signal: the later ones are left out, in sampling order (DAPO keeps a fixed batch).
    compute_advantages(path, out, dynamic_sampling=True, target_groups=2)
    reasons = {r["prompt_id"]: r["drop_reason"] for r in read_table(out, ADVANTAGES).to_pylist()}
    assert reasons == {"a": None, "b": "zero_std", "c": "zero_std", "d": None, "e": "batch_full"}


def test_sampling_rounds_are_concatenated_and_may_not_repeat_a_completion(tmp_path):
    r0 = write_rewards(tmp_path / "rewards.parquet", {"a": [1.0, 1.0], "b": [0.0, 1.0]})
    r1 = write_rewards(tmp_path / "rewards-r1.parquet", {"c": [0.0, 0.0], "d": [1.0, 0.0]})
    assert informative_groups(r0) == 1 and informative_groups([r0, r1]) == 2
    out = tmp_path / "advantages.parquet"
    metrics = compute_advantages([r0, r1], out, dynamic_sampling=True, target_groups=2)
    assert read_table(out, ADVANTAGES)["prompt_id"].to_pylist() == ["a", "a", "b", "b", "c", "c", "d", "d"]
    assert metrics["dynamic_sampling/kept_groups"] == 2 and metrics["dynamic_sampling/groups"] == 4
    dup = write_rewards(tmp_path / "rewards-r2.parquet", {"b": [0.0, 1.0]})
    with pytest.raises(DuplicateCompletion, match="prompt_id b sample 0 appears twice"):
        compute_advantages([r0, dup], out)


def test_refill_prompts_skip_the_iterations_earlier_prompts(tmp_path):
    dataset = tmp_path / "dataset.parquet"
    problems = builtin.train_problems(10, seed=3)
    write_table(
        prompts_table([normalise_row(p, data_source="t", row=i) for i, p in enumerate(problems)]), dataset, PROMPTS
    )
    first = tmp_path / "prompts.parquet"
    write_table(read_table(dataset, PROMPTS).slice(0, 4), first, PROMPTS)

    r1 = tmp_path / "prompts-r1.parquet"
    assert refill_prompts(dataset, r1, exclude_paths=[first], count=4, seed="0:1:1") == {"prompts": 4}
    ids0 = set(read_table(first, PROMPTS)["prompt_id"].to_pylist())
    ids1 = read_table(r1, PROMPTS)["prompt_id"].to_pylist()
    assert len(set(ids1)) == 4 and not ids0 & set(ids1)
    again = tmp_path / "again.parquet"
    refill_prompts(dataset, again, exclude_paths=[first], count=4, seed="0:1:1")
    assert read_table(again, PROMPTS)["prompt_id"].to_pylist() == ids1  # seeded: a resumed run picks the same

    r2 = tmp_path / "prompts-r2.parquet"
    assert refill_prompts(dataset, r2, exclude_paths=[first, r1], count=4, seed="0:1:2") == {
        "prompts": 2
    }  # 10 - 8 left
    assert refill_prompts(dataset, tmp_path / "r3.parquet", exclude_paths=[first, r1, r2], count=4, seed="0:1:3") == {
        "prompts": 0
    }
