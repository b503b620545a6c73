"""`grpo inspect`, the per-stage Prefect artifacts, the learning-curve PNG and the progress
bars' terminal detection."""

from __future__ import annotations

import io
import json
import math
import time

import pytest

from data.store import TMP_PREFIX, Manifest, atomic_write_json
from flows.cli import main
from flows.observe.inspection import inspect_path
from flows.observe.views import PLOT_NAME, artifact_key, plot_learning_curve, stage_markdown
from tests.test_rescore import COMPLETIONS, run_dir  # noqa: F401  (the fixture: one scored iteration, no model)


@pytest.fixture()
def run(run_dir):  # noqa: F811
    """The scored iteration plus what a training run adds: timings, an update, metrics, and
    a second iteration killed while generating."""
    folder = run_dir / "iter-0001"
    manifest = Manifest(folder)
    entries = manifest.entries()
    for name in entries:
        manifest.record(name, summary=entries[name].get("summary", {}), seconds=0.25)
    manifest.record("checkpoint", summary={"kl": 0.0123}, seconds=1.5)  # not saved: weights only in memory
    atomic_write_json(
        folder / "metrics.json",
        {"iteration": 1, "reward": 0.5, "kl": 0.0123, "frac_reward_zero_std": 1 / 3, "held_out_accuracy": 0.25},
    )
    second = run_dir / "iter-0002"
    second.mkdir()
    (second / "prompts.parquet").write_bytes((folder / "prompts.parquet").read_bytes())
    Manifest(second).record("prompts.parquet", seconds=0.1)
    (second / f"{TMP_PREFIX}generations.parquet.x1y2").write_bytes(b"half")
    return run_dir


def test_run_overview_has_every_stage_of_every_iteration(run):
    data = inspect_path(run, as_json=True)
    first, second = data["iterations"]
    assert first["stages"]["generate"] == {"status": "done", "rows": 12, "seconds": 0.25}
    assert first["stages"]["update"] == {"status": "in memory", "rows": None, "seconds": 1.5}
    assert first["stages"]["eval"]["status"] == "missing"
    rewards = [1.0, 0, 1, 0, 1, 1, 1, 1, 0, 1, 0, 0]
    mean = sum(rewards) / 12
    assert first["reward_mean"] == pytest.approx(mean)
    assert first["reward_std"] == pytest.approx(math.sqrt(sum((r - mean) ** 2 for r in rewards) / 11))
    assert (first["held_out_accuracy"], first["kl"], first["frac_reward_zero_std"]) == (
        0.25,
        0.0123,
        pytest.approx(1 / 3),
    )
    assert second["stages"]["prompts"]["status"] == "done"
    assert second["stages"]["generate"]["status"] == "partial"  # a killed writer's temp file
    assert second["stages"]["score"]["status"] == "missing"
    # A file changed behind the manifest's back shows as such.
    (run / "iter-0001" / "advantages.parquet").write_bytes(b"edited")
    assert inspect_path(run, as_json=True)["iterations"][0]["stages"]["advantages"]["status"] == "changed"


def test_run_table_on_the_command_line(run, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    for text in (
        "generate",
        "zero-std",
        "done 12 0.2s",
        "in memory 1.5s",
        "partial",
        "25.0%",
        "0.0123",
        "0.583 ± 0.515",
    ):
        assert text in out, text
    assert main(["inspect", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["iterations"][1]["reward_mean"] is None  # NaN becomes null


def test_artifact_view_joins_prompt_gold_rewards_and_advantages(run):
    ids = inspect_path(run / "iter-0001" / "rewards.parquet", sample=10, as_json=True)
    assert len(ids["groups"]) == 3
    pid = ids["groups"][2]["prompt_id"]
    data = inspect_path(run / "iter-0001" / "advantages.parquet", prompt_id=pid, sort="reward", as_json=True)
    [group] = data["groups"]
    assert (group["prompt"], group["gold"], group["task"]) == ("11+11=", "22", "arithmetic")
    best, *rest = group["completions"]
    assert (best["completion"], best["rewards"], best["reward"], best["kept"]) == (
        "22",
        {"exact_answer": 1.0},
        1.0,
        True,
    )
    assert best["advantage"] > 0 > rest[-1]["advantage"]
    assert sorted(c["completion"] for c in group["completions"]) == sorted(COMPLETIONS[2])


def test_sample_is_seeded_and_sort_orders_each_group(run, capsys):
    path = run / "iter-0001" / "generations.parquet"
    pick = [g["prompt_id"] for g in inspect_path(path, sample=2, seed=5, as_json=True)["groups"]]
    assert (
        pick == [g["prompt_id"] for g in inspect_path(path, sample=2, seed=5, as_json=True)["groups"]]
        and len(pick) == 2
    )
    by_advantage = inspect_path(path, sample=3, sort="advantage", as_json=True)["groups"]
    for g in by_advantage:
        advantages = [c["advantage"] for c in g["completions"]]
        assert advantages == sorted(advantages, reverse=True)
    assert main(["inspect", str(path), "--prompt-id", pick[0], "--sort", "reward"]) == 0
    out = capsys.readouterr().out
    assert f"prompt {pick[0]}" in out and "gold:" in out and "exact_answer" in out and "advantage" in out


def test_inspect_errors_name_the_file(run, tmp_path, capsys):
    (tmp_path / "notes.parquet").write_text("not parquet")
    assert main(["inspect", str(tmp_path / "notes.parquet")]) == 2
    assert "notes.parquet: not a Parquet artifact" in capsys.readouterr().err
    assert main(["inspect", str(run / "iter-0001" / "rewards.parquet"), "--prompt-id", "nope"]) == 2
    assert "rewards.parquet: no rows with prompt_id nope" in capsys.readouterr().err


def test_stage_report_has_counts_reward_statistics_and_best_and_worst(run):
    folder = run / "iter-0001"
    text = stage_markdown(folder, "rewards.parquet", {"rows": 12, "errored": 0, "reward_mean": 7 / 12})
    assert "| rows | 12 |" in text and "| reward_mean | 0.5833 |" in text
    assert "| reward/exact_answer | 0.5833 | 0.5149 | 0 | 1 | 0 |" in text
    assert "| 11+11= | 22 | 22 | 1 | x | 0 |" in text  # best and worst of the third group
    assert artifact_key(folder, "rewards@v2.parquet") == "run-rewards-at-v2"
    assert artifact_key(run / "dataset", "prompts.parquet") == "run-prompts"


def test_each_stage_publishes_a_prefect_artifact(run, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.rescore import grpo_rescore

    grpo_rescore(str(run), "pub", rewards={"exact_answer": 1.0})
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["run-rewards-at-pub", "run-advantages-at-pub"]))
        )
    texts = {a.key: a.data for a in found}
    assert all(a.flow_run_id is not None for a in found)  # published off the flow's thread, still filed under its run
    assert "reward/exact_answer" in texts["run-rewards-at-pub"] and "Best and worst" in texts["run-rewards-at-pub"]
    assert "frac_reward_zero_std" in texts["run-advantages-at-pub"]


def test_learning_curve_png_is_written_atomically(run, tmp_path):
    out = plot_learning_curve(run)
    assert out == run / PLOT_NAME and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.glob(f"{TMP_PREFIX}*"))
    assert plot_learning_curve(tmp_path) is None  # nothing to plot yet


def test_learning_curve_redraws_are_rate_limited_but_forced_ones_always_happen(run, monkeypatch):
    import flows.observe.views

    drawn = []

    def slow_plot(run_dir):
        time.sleep(0.05)  # a redraw this slow may run at most once per 0.05 / PLOT_BUDGET seconds
        drawn.append(run_dir)

    monkeypatch.setattr(flows.observe.views, "plot_learning_curve", slow_plot)
    views = flows.observe.views.BackgroundViews()
    views.refresh_learning_curve(run)
    views.drain()
    views.refresh_learning_curve(run)  # right after a redraw: skipped
    views.drain()
    assert drawn == [run]
    views.refresh_learning_curve(run, force=True)  # held-out accuracy or the last iteration
    views.drain()
    assert drawn == [run, run]
    time.sleep(0.05 / flows.observe.views.PLOT_BUDGET)
    views.refresh_learning_curve(run)
    views.drain()
    assert drawn == [run, run, run]


def test_stage_reports_over_budget_wait_and_the_latest_of_each_stage_is_published(run, monkeypatch):
    import prefect.context

    import flows.observe.views

    published = []

    def slow_report(folder, output, summary):
        time.sleep(0.01)  # reports this slow may take at most REPORT_BUDGET of the wall time
        published.append((output, summary["n"]))

    monkeypatch.setattr(flows.observe.views, "publish_stage_report", slow_report)
    monkeypatch.setattr(
        prefect.context.FlowRunContext, "get", classmethod(lambda cls: object())
    )  # as inside a flow run
    views = flows.observe.views.BackgroundViews()
    folder = run / "iter-0001"
    views.publish_stage_report(folder, "rewards.parquet", {"n": 1})
    views.drain()
    for n, output in [(2, "rewards.parquet"), (3, "rewards.parquet"), (4, "advantages.parquet")]:
        views.publish_stage_report(folder, output, {"n": n})  # over budget: held, the newer replacing the older
    time.sleep(0.1)
    assert published == [("rewards.parquet", 1)]
    views.drain()  # the flow's end publishes what is held
    assert published == [("rewards.parquet", 1), ("rewards.parquet", 3), ("advantages.parquet", 4)]
    time.sleep(0.08 / flows.observe.views.REPORT_BUDGET)  # 3 x 0.01 s of reports: back under budget, published at once
    views.publish_stage_report(folder, "rewards.parquet", {"n": 5})
    time.sleep(0.2)
    assert published[-1] == ("rewards.parquet", 5)
    views.drain()


def test_progress_bars_only_on_a_terminal(monkeypatch):
    from tasks.progress import bars_enabled, progress, stage_label

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for name in ("CI", "GRPOFLOW_PROGRESS", "TERM"):
        monkeypatch.delenv(name, raising=False)
    assert bars_enabled(Terminal()) and not bars_enabled(io.StringIO())
    monkeypatch.setenv("CI", "true")
    assert not bars_enabled(Terminal())
    monkeypatch.delenv("CI")
    monkeypatch.setenv("GRPOFLOW_PROGRESS", "0")
    assert not bars_enabled(Terminal())
    # Without a terminal the bar is silent but still carries the stage's name (pause points).
    with stage_label("iter-0002/checkpoint"), progress("update", total=3) as bar:
        assert bar._label == "iter-0002/checkpoint: update"
        bar.advance(3)
