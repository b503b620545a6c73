"""Tracking (MLflow, TensorBoard) and the model registry's promotion gate, against real
stores: a SQLite file, and a `mlflow server` process started on 127.0.0.1 by the test
(stopped, with its workers, by process group, even when the test fails)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from data import builtin
from data.store import Manifest
from flows.config import GRPOConfig
from tests.conftest import require
from tests.test_serve import free_port

mlflow = require("mlflow", "tracking")
tensorboardX = require("tensorboardX", "tracking")


def shorter_is_better(completion: str, example) -> float:
    """A reward with spread on any model, so every update moves the weights; never
    negative, so added to exact_answer it leaves a right answer at or above 1 (solved)."""
    return 1.0 / (1 + len(completion))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tracking-data")
    return (
        write_jsonl(folder / "train.jsonl", builtin.train_problems(16, seed=5)),
        write_jsonl(folder / "held.jsonl", builtin.held_out_problems(8)),
    )


def settings(run_dir: Path, model: Path, data: tuple[Path, Path], **extra) -> dict:
    return (
        dict(
            run_dir=run_dir,
            model=str(model),
            dataset=str(data[0]),
            eval_dataset=str(data[1]),
            task="arithmetic",
            prompts_per_iteration=4,
            group_size=3,
            max_new_tokens=4,
            micro_batch_size=12,
            beta=0.0,
            eval_every=1,
            eval_size=8,
            rewards={"exact_answer": 1.0},
            score_workers=1,
            use_chat_template=False,
        )
        | extra
    )


def metrics_table(run_dir: Path) -> list[tuple[int, str, float]]:
    import pyarrow.parquet as pq

    t = pq.read_table(run_dir / "metrics.parquet")
    return list(zip(t["iteration"].to_pylist(), t["name"].to_pylist(), t["value"].to_pylist()))


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-12)


def tensorboard_scalars(logdir: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the event files (TFRecord framing: length,
    its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    found = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            found += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return found


def test_params_metrics_steps_artifacts_and_a_resumed_run_continues_its_mlflow_run(
    tmp_path, tiny_model_dir, data_files, prefect_harness, monkeypatch
):
    import flows.train
    from flows.observe.state import read_state
    from flows.observe.tracking import param_values
    from flows.rescore import grpo_rescore
    from flows.train import grpo_train

    run_dir, store, board = (
        tmp_path / "exp-a",
        tmp_path / "store",
        tmp_path / "tb",
    )  # a folder: a SQLite store inside it
    config = GRPOConfig(
        **settings(
            run_dir,
            tiny_model_dir,
            data_files,
            iterations=3,
            learning_rate=1e-3,
            rewards={"tests.test_tracking:shorter_is_better": 1.0},
            tracking_uri=str(store),
            tensorboard=board,
        )
    )

    # The first process dies right after iteration 2's metrics are written: they were never sent.
    real = flows.train.write_metrics

    def dies_after_iteration_2(run, it, metrics):
        real(run, it, metrics)
        if it == 2:
            raise RuntimeError("killed on purpose")

    monkeypatch.setattr(flows.train, "write_metrics", dies_after_iteration_2)
    with pytest.raises(RuntimeError, match="killed on purpose"):
        grpo_train(config)
    monkeypatch.setattr(flows.train, "write_metrics", real)
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    first_id = read_state(run_dir)["mlflow"]["run_id"]
    assert client.get_run(first_id).info.status == "FAILED"

    grpo_train(config)  # the resume: iteration 3, and the metrics of iteration 2 sent now

    experiment = client.get_experiment_by_name("exp-a")  # named after the run folder
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [first_id] and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params == param_values(config) and run.data.params["learning_rate"] == "0.001"
    rows = metrics_table(run_dir)
    assert {it for it, _, _ in rows} == {0, 1, 2, 3}
    for name in {n for _, n, _ in rows}:
        history = sorted((m.step, m.value) for m in client.get_metric_history(first_id, name))
        expected = sorted((it, v) for it, n, v in rows if n == name)
        assert [s for s, _ in history] == [s for s, _ in expected], name  # every step exactly once
        assert all(same(a, b) for (_, a), (_, b) in zip(history, expected)), name
    assert {"reward", "held_out_accuracy", "frac_reward_zero_std", "policy_loss"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(first_id)} | {
        a.path for a in client.list_artifacts(first_id, "stage_reports")
    }
    assert {
        "config.json",
        "learning_curve.png",
        "stage_reports/iter-0001.md",
        "stage_reports/iter-0003.md",
    } <= artifacts
    report = Path(
        mlflow.artifacts.download_artifacts(
            f"runs:/{first_id}/stage_reports/iter-0002.md", tracking_uri=f"sqlite:///{store}/mlflow.db"
        )
    )
    assert "rewards.parquet" in report.read_text() and "| reward |" in report.read_text()
    assert (store / "mlflow-artifacts").is_dir()  # beside the database, not in the working folder

    scalars = tensorboard_scalars(board)
    tb_name = lambda name: re.sub(
        r"[^-/\w.]", "_", name
    )  # TensorBoard's tag rule (":" of an import-path reward becomes "_")
    assert sorted((n, it) for n, it, _ in scalars) == sorted(
        (tb_name(n), it) for it, n, _ in rows
    )  # the same metrics, once each
    by_key = {(n, it): v for n, it, v in scalars}
    assert all(same(by_key[(tb_name(n), it)], v) for it, n, v in rows if not math.isnan(v))

    # A re-scoring is its own MLflow run, named after its tag, under the training run.
    grpo_rescore(str(run_dir), "v2", rewards={"exact_answer": 1.0})
    rescoring = client.search_runs([experiment.experiment_id], "tags.`grpoflow.rescore_tag` = 'v2'")
    assert len(rescoring) == 1 and rescoring[0].data.tags["mlflow.parentRunId"] == first_id
    steps = sorted(m.step for m in client.get_metric_history(rescoring[0].info.run_id, "reward"))
    assert steps == [1, 2, 3]


def memorising_model(folder: Path, problems: list[dict]) -> Path:
    """A tiny model trained until it answers `problems` (the held-out set here): a model
    with a high held-out accuracy, in seconds."""
    import torch

    from tasks.model import LivePolicy, save_checkpoint
    from tasks.tiny_model import _sft_batch, build_model, build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_model(len(tokenizer), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = _sft_batch(tokenizer, problems)
    for _ in range(80):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return save_checkpoint(LivePolicy(model, tokenizer), folder)


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite store, in its own process group."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "mlflow-server.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{folder / 'server.db'}",
                    "--artifacts-destination",
                    str(folder / "server-artifacts"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            )

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        pytest.fail(f"mlflow server not healthy within {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass


def test_two_scheduled_runs_against_a_server_the_worse_one_is_registered_not_promoted(
    tmp_path, data_files, prefect_harness, capsys
):
    from transformers import AutoModelForCausalLM

    from flows.observe.inspection import inspect_path
    from flows.observe.registry import champion_start
    from flows.serve import continued_config, grpo_scheduled

    server = MlflowServer(tmp_path)
    try:
        model = memorising_model(tmp_path / "good-model", builtin.held_out_problems(8))
        server.wait_healthy()
        run_dir = tmp_path / "prod"
        base = settings(
            run_dir,
            model,
            data_files,
            rewards={"exact_answer": 1.0, "tests.test_tracking:shorter_is_better": 0.01},
            tracking_uri=server.url,
            register_as="arith",
            learning_rate=1e-5,
        )
        base.pop("run_dir")
        first = grpo_scheduled(str(run_dir), base, iterations=1)
        assert first["registered"]["promoted"] and first["held_out_accuracy"] >= 0.75
        # The second run is made worse on purpose: a learning rate far too high wrecks the model.
        second = grpo_scheduled(str(run_dir), base | {"learning_rate": 0.5}, iterations=1)
        assert second["held_out_accuracy"] < first["held_out_accuracy"]
        reason = second["registered"]["reason"]
        assert (
            not second["registered"]["promoted"]
            and reason.startswith("not promoted: held_out_accuracy")
            and " < champion v1's " in reason
        )

        client = mlflow.tracking.MlflowClient(tracking_uri=server.url)
        versions = sorted(client.search_model_versions("name = 'arith'"), key=lambda v: int(v.version))
        assert [v.version for v in versions] == ["1", "2"]
        assert client.get_model_version_by_alias("arith", "champion").version == "1"
        assert versions[1].tags["grpoflow.gate"] == reason
        assert versions[0].tags["grpoflow.heldout_sha256"] == versions[1].tags["grpoflow.heldout_sha256"]
        assert {r.info.run_id for r in client.search_runs([client.get_experiment_by_name("prod").experiment_id])} == {
            first["registered"]["run_id"],
            second["registered"]["run_id"],
        }  # one MLflow run per scheduled run

        # The champion loads with plain from_pretrained from its registered files; they are iteration 1's weights.
        registered = client.get_model_version_by_alias("arith", "champion").source
        local = mlflow.artifacts.download_artifacts(
            registered, dst_path=str(tmp_path / "champion"), tracking_uri=server.url
        )
        champion = AutoModelForCausalLM.from_pretrained(local)
        trained = AutoModelForCausalLM.from_pretrained(run_dir / "iter-0001" / "checkpoint")
        assert all((a == b).all() for a, b in zip(champion.state_dict().values(), trained.state_dict().values()))
        assert not (Path(local) / "optimizer.pt").exists()

        # The next scheduled run trains from the champion (iteration 1), not from the wrecked iteration 2 ...
        assert champion_start(continued_config(run_dir, base | {"train_from": "latest"})) is None
        champion_checkpoint = str(run_dir / "iter-0001" / "checkpoint")
        assert champion_start(continued_config(run_dir, base)) == champion_checkpoint
        grpo_scheduled(str(run_dir), base, iterations=1)
        third = Manifest(run_dir / "iter-0003").entries()
        assert (
            third["start-policy"]["policy"] == champion_checkpoint
            and champion_checkpoint in third["generations.parquet"]["inputs"]
        )

        # ... and `grpo inspect` lists the folder's versions and which one is champion.
        shown = inspect_path(run_dir, as_json=True)["registry"]
        assert [(v["name"], v["version"]) for v in shown] == [("arith", 1), ("arith", 2), ("arith", 3)]
        champion_now = client.get_model_version_by_alias("arith", "champion").version
        assert [v["champion"] for v in shown] == [str(v["version"]) == champion_now for v in shown] and not shown[1][
            "champion"
        ]
        inspect_path(run_dir)
        out = capsys.readouterr().out
        assert "arith" in out and "champion" in out
    finally:
        server.stop()


def test_the_gate_never_compares_metrics_of_different_held_out_sets():
    from flows.observe.registry import gate

    champion = {"version": "3", "grpoflow.heldout_sha256": "a" * 64, "grpoflow.metric.held_out_accuracy": "0.5"}
    assert gate("held_out_accuracy", 0.5, "a" * 64, champion).promoted  # at least the champion's
    assert not gate("held_out_accuracy", 0.49, "a" * 64, champion).promoted
    refused = gate("held_out_accuracy", 0.9, "b" * 64, champion)
    assert not refused.promoted and "not champion v3's" in refused.reason and "not compared" in refused.reason
    assert not gate("held_out_accuracy", None, "a" * 64, champion).promoted
    assert not gate("held_out_accuracy", 0.9, None, None).promoted  # no held-out set: nothing to compare with
    assert gate("held_out_accuracy", 0.1, "b" * 64, None).promoted  # the first version


def test_register_as_needs_a_tracking_store():
    with pytest.raises(ValueError, match="register_as needs tracking_uri"):
        GRPOConfig(register_as="x")
