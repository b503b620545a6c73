"""The run-level metrics.parquet: appended to after each iteration, rebuilt whenever it does
not hold exactly the earlier iterations, and equal to a rebuild either way."""

from __future__ import annotations

import json

from data.run_folder import iteration_dir
from data.schemas import METRICS
from data.store import read_table
from data.metrics import write_metrics, write_metrics_table


def _table(run):
    return read_table(run / "metrics.parquet", METRICS).to_pylist()


def test_appending_an_iteration_equals_rebuilding_from_every_metrics_json(tmp_path, monkeypatch):
    import data.metrics

    parsed = []
    original = data.metrics._metric_rows
    monkeypatch.setattr(data.metrics, "_metric_rows", lambda path: parsed.append(path) or original(path))
    for it in range(4):
        iteration_dir(tmp_path, it).mkdir()
        write_metrics(tmp_path, it, {"iteration": it, "reward": it / 10, "kl": 0.01 * it, "note": "text is left out"})
    appended = _table(tmp_path)
    assert len(parsed) == 4  # one metrics.json read per iteration, not all of them every time
    assert sorted((r["iteration"], r["name"]) for r in appended) == [
        (it, name) for it in range(4) for name in ("kl", "reward")
    ]
    write_metrics_table(tmp_path)  # a full rebuild
    assert _table(tmp_path) == appended


def test_a_table_that_misses_an_iteration_is_rebuilt_whole(tmp_path):
    for it in range(3):
        iteration_dir(tmp_path, it).mkdir()
        (iteration_dir(tmp_path, it) / "metrics.json").write_text(json.dumps({"iteration": it, "reward": float(it)}))
    write_metrics_table(tmp_path)
    (iteration_dir(tmp_path, 1) / "metrics.json").write_text(
        json.dumps({"iteration": 1, "reward": 5.0})
    )  # repaired by hand
    iteration_dir(tmp_path, 3).mkdir()
    (tmp_path / "metrics.parquet").unlink()  # lost: the next iteration rebuilds it
    write_metrics(tmp_path, 3, {"iteration": 3, "reward": 3.0})
    assert [(r["iteration"], r["value"]) for r in _table(tmp_path)] == [(0, 0.0), (1, 5.0), (2, 2.0), (3, 3.0)]
    iteration_dir(tmp_path, 5).mkdir()  # iteration 4 has no metrics.json: the table cannot be appended to
    write_metrics(tmp_path, 5, {"iteration": 5, "reward": 5.5})
    assert [r["iteration"] for r in _table(tmp_path)] == [0, 1, 2, 3, 5]
