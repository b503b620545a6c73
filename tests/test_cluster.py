"""The stages on a local Ray cluster (flows/cluster/ray_cluster.py): the update on 2 gloo ranks is the
update on 1, generation on 2 workers gives the rows of 1 worker, a killed worker's stage is
retried to the same artifact. One Ray cluster (127.0.0.1 only) for the whole module."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from tests.conftest import require, save_tiny_qwen2

ray = require("ray", "cluster")

from safetensors.torch import load_file  # noqa: E402

from data import builtin  # noqa: E402
from data.schemas import GENERATIONS, PROMPTS, REWARDS  # noqa: E402
from data.sources import normalise_row, prompts_table  # noqa: E402
from data.store import read_table, write_table  # noqa: E402
from flows.cluster.ray_cluster import ClusterError, RayCluster, TrainingRankDied, check_shared_storage  # noqa: E402
from flows.config import GRPOConfig  # noqa: E402
from tasks.advantages import compute_advantages  # noqa: E402
from tasks.model import forget_live_policies  # noqa: E402
from tasks.objective import LossSettings  # noqa: E402
from tasks.score import score_generations  # noqa: E402
from tasks.update import update_policy  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    # Logical CPUs: 2 ranks + 2 generation workers + scoring tasks fit; Ray does not pin them.
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A tiny Qwen2 on disk; 8 prompts x 4 completions with reference log-probs; rewards with
    spread and their advantages."""
    root = tmp_path_factory.mktemp("cluster")
    model_dir = save_tiny_qwen2(root / "model")
    prompts = root / "prompts.parquet"
    rows = [normalise_row(p, data_source="t", row=i) for i, p in enumerate(builtin.train_problems(8, seed=5))]
    write_table(prompts_table(rows), prompts, PROMPTS)
    from tasks.generate import generate_completions

    gens = root / "generations.parquet"
    generate_completions(
        prompts,
        gens,
        str(model_dir),
        group_size=4,
        max_new_tokens=6,
        reference_path=str(model_dir),
        use_chat_template=False,
        seed=1,
        device="cpu",
    )
    forget_live_policies()
    table = read_table(gens, GENERATIONS, columns=["prompt_id", "sample_index"])
    rng = random.Random(4)
    rewards = pa.table(
        {
            "prompt_id": table["prompt_id"],
            "sample_index": table["sample_index"],
            "reward": [float(rng.randint(0, 3)) for _ in range(table.num_rows)],
        },
        schema=REWARDS.schema,
    )
    write_table(rewards, root / "rewards.parquet", REWARDS)
    compute_advantages(root / "rewards.parquet", root / "advantages.parquet")
    return {
        "root": root,
        "model": str(model_dir),
        "prompts": str(prompts),
        "gens": str(gens),
        "adv": str(root / "advantages.parquet"),
    }


def _cluster(root, **kw) -> RayCluster:
    return RayCluster.connect(GRPOConfig(run_dir=root, cluster="auto", **kw))


@pytest.fixture(scope="module")
def ddp_ranks(local_ray, artifacts):
    cluster = _cluster(artifacts["root"], training_ranks=2)
    yield cluster
    cluster.close()


def _three_steps(artifacts, out, aggregation, cluster=None):
    """3 optimiser steps from the initial model: in this process (one rank, no process group)
    or on the cluster's ranks. 32 completions in 3 mini-batches of micro-batches of 5: the
    ranks get uneven shares (3, 3, 2 micro-batches per step)."""
    loss = LossSettings(beta=0.04, aggregation=aggregation, max_completion_length=6)
    settings = dict(learning_rate=1e-3, loss=loss, mini_batches=3, micro_batch_size=5, seed=3, device="cpu")
    try:
        if cluster is None:
            metrics = update_policy(artifacts["gens"], artifacts["adv"], artifacts["model"], str(out), **settings)
        else:
            metrics = cluster.update(artifacts["gens"], artifacts["adv"], artifacts["model"], str(out), **settings)
    finally:
        forget_live_policies()
    return load_file(out / "model.safetensors"), torch.load(out / "optimizer.pt", weights_only=True), metrics


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b) and all(a[k].shape == b[k].shape for k in a)  # whole tensors, not shards
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("aggregation", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_two_gloo_ranks_take_the_steps_of_one(ddp_ranks, artifacts, aggregation):
    one, opt_one, m_one = _three_steps(artifacts, artifacts["root"] / f"one-{aggregation}", aggregation)
    two, opt_two, m_two = _three_steps(artifacts, artifacts["root"] / f"two-{aggregation}", aggregation, ddp_ranks)
    assert m_one["update/optimizer_steps"] == m_two["update/optimizer_steps"] == 3
    assert m_two["update/training_ranks"] == 2
    initial = load_file(os.path.join(artifacts["model"], "model.safetensors"))
    assert (
        _max_diff(one, two) <= 1e-5 and _max_diff(one, initial) > 1e-3
    )  # the weights moved, the same on 1 and 2 ranks
    assert opt_one["state"].keys() == opt_two["state"].keys()
    for i, state in opt_one["state"].items():
        assert torch.allclose(state["exp_avg"], opt_two["state"][i]["exp_avg"], atol=1e-6)
    for key in ("policy_loss", "kl", "entropy", "grad_norm", "update/trained_completions"):
        assert m_two[key] == pytest.approx(m_one[key], rel=1e-5, abs=1e-7)


def test_fsdp2_ranks_take_the_steps_of_one_and_save_one_whole_checkpoint(ddp_ranks, artifacts):
    one, opt_one, _ = _three_steps(artifacts, artifacts["root"] / "one-fsdp", "dapo")
    # The same two ranks (starting actors costs seconds): a policy loaded afresh is wrapped by
    # the parallelism the update is given.
    fsdp = _cluster(artifacts["root"], training_ranks=2, parallelism="fsdp2")
    fsdp.trainers = ddp_ranks.trainers
    two, opt_two, _ = _three_steps(artifacts, artifacts["root"] / "two-fsdp", "dapo", fsdp)
    assert _max_diff(one, two) <= 1e-5
    assert opt_one["state"].keys() == opt_two["state"].keys()
    for i, state in opt_one["state"].items():
        assert torch.allclose(state["exp_avg_sq"], opt_two["state"][i]["exp_avg_sq"], atol=1e-8)


def test_a_run_folder_no_node_can_see_is_refused(local_ray, tmp_path, monkeypatch):
    check_shared_storage(tmp_path)  # this machine's only node sees it
    import flows.cluster.ray_cluster as rc

    # One machine cannot hide a folder from itself: the probe written differs from the one expected.
    monkeypatch.setattr(rc.Path, "write_text", lambda self, text: self.write_bytes(b"another machine's file"))
    with pytest.raises(ClusterError, match="not visible from Ray node"):
        check_shared_storage(tmp_path)


GENERATE = dict(group_size=4, max_new_tokens=6, use_chat_template=False, with_old_logprobs=True, device="cpu", seed=7)


@pytest.fixture(scope="module")
def two_generators(local_ray, artifacts):
    # 8 prompts in shards of 3: shards 0 and 2 on worker 0, shard 1 on worker 1.
    cluster = _cluster(artifacts["root"], generation_workers=2, generation_shard_prompts=3)
    yield cluster
    cluster.close()


def test_generation_on_two_workers_gives_the_rows_of_one_in_the_same_order(two_generators, artifacts):
    root = artifacts["root"]
    two = two_generators.generate(artifacts["prompts"], str(root / "gen-2.parquet"), artifacts["model"], **GENERATE)
    one_worker = _cluster(root, generation_workers=1, generation_shard_prompts=3)
    one_worker.generators = two_generators.generators[:1]  # a warm actor: every shard on it
    one = one_worker.generate(artifacts["prompts"], str(root / "gen-1.parquet"), artifacts["model"], **GENERATE)
    assert two["generation_workers"] == 2 and one["generation_workers"] == 1
    a, b = read_table(root / "gen-1.parquet", GENERATIONS), read_table(root / "gen-2.parquet", GENERATIONS)
    assert a.num_rows == 32 and a.equals(b)
    prompt_ids = read_table(artifacts["prompts"], PROMPTS)["prompt_id"].to_pylist()
    assert a["prompt_id"].to_pylist() == [p for p in prompt_ids for _ in range(4)]  # prompt order, groups adjacent
    assert not list(root.glob(".tmp-*"))  # no shard file left behind


def test_a_worker_killed_mid_generation_is_replaced_and_the_retry_writes_the_same_rows(
    two_generators, artifacts, monkeypatch, tmp_path
):
    root = artifacts["root"]
    if not (root / "gen-2.parquet").exists():
        two_generators.generate(artifacts["prompts"], str(root / "gen-2.parquet"), artifacts["model"], **GENERATE)
    cluster = _cluster(root, generation_workers=2, generation_shard_prompts=3)
    assert cluster.stages().generate.retries >= 1  # what the flow calls: the stage's Prefect retry
    cluster.generators = two_generators.generators[:1]
    marker = tmp_path / "paused"
    monkeypatch.setenv("GRPOFLOW_PAUSE_AT", "-00001.parquet")  # the new worker 1 stops before writing shard 1
    monkeypatch.setenv("GRPOFLOW_PAUSE_MARKER", str(marker))
    out = root / "gen-killed.parquet"
    victim = ray.get(cluster._generators()[1].pid.remote())  # asked now: a busy actor answers only after its call
    failed: list[BaseException] = []

    def first_try():
        try:
            cluster.generate(artifacts["prompts"], str(out), artifacts["model"], **GENERATE)
        except BaseException as err:  # noqa: BLE001 - the test inspects it below
            failed.append(err)

    import threading

    thread = threading.Thread(target=first_try)
    thread.start()
    for _ in range(600):
        if marker.exists():
            break
        thread.join(0.2)
    assert marker.exists(), "worker 1 never reached shard 1"
    monkeypatch.delenv("GRPOFLOW_PAUSE_AT")
    os.kill(victim, signal.SIGKILL)
    thread.join(120)
    assert failed and isinstance(failed[0], ray.exceptions.RayActorError) and not out.exists()
    cluster.generate(artifacts["prompts"], str(out), artifacts["model"], **GENERATE)  # the retry: a new worker 1
    assert read_table(out, GENERATIONS).equals(read_table(root / "gen-2.parquet", GENERATIONS))
    for worker in cluster.generators[1:]:  # worker 0 belongs to the module's fixture
        ray.kill(worker)


def test_scoring_on_ray_tasks_writes_the_rewards_of_one_process(local_ray, artifacts):
    root = artifacts["root"]
    settings = dict(
        rewards={"exact_answer": 1.0, "format": 0.5}, reward_options={}, chunk_rows=7, worker_memory_mb=None
    )
    local = score_generations(
        artifacts["gens"], artifacts["prompts"], str(root / "rewards-local.parquet"), workers=1, **settings
    )
    cluster = _cluster(root)
    summary = cluster.score(artifacts["gens"], artifacts["prompts"], str(root / "rewards-ray.parquet"), **settings)
    assert summary["score_slices"] > 1
    assert read_table(root / "rewards-ray.parquet", REWARDS).equals(read_table(root / "rewards-local.parquet", REWARDS))
    for key in ("rows", "errored", "reward_mean", "reward/exact_answer_mean", "error/format_rows"):
        assert summary[key] == pytest.approx(local[key])


def test_a_dead_training_rank_fails_the_update_cleanly(ddp_ranks, artifacts):
    if not ddp_ranks.trainers:  # run alone: the ranks start with the first update
        ddp_ranks.trainers = ddp_ranks._start_trainers()
    ray.kill(ddp_ranks.trainers[1])
    with pytest.raises(TrainingRankDied, match="resume from the last checkpoint"):
        _three_steps(artifacts, artifacts["root"] / "dead", "grpo", ddp_ranks)
    assert ddp_ranks.trainers == []  # the whole group is ended; the next update starts a new one


def test_a_cluster_run_killed_with_sigkill_leaves_no_worker_and_resumes(
    local_ray, artifacts, tmp_path, prefect_harness
):
    """`grpo run --cluster auto` SIGKILLed while writing iteration 2's generations: the killed
    flow's actors do not outlive it (Ray ends them: their CPUs come back), and running the
    folder again resumes after iteration 1, keeps iteration 1's artifacts byte for byte and
    finishes iteration 2."""
    import json
    import subprocess
    import sys
    import time

    from prefect.settings import PREFECT_API_URL

    from data.store import Manifest
    from flows.train import grpo_train

    dataset = tmp_path / "train.jsonl"
    dataset.write_text("".join(json.dumps(p) + "\n" for p in builtin.train_problems(24, seed=3)))
    settings = dict(
        model=artifacts["model"],
        dataset=str(dataset),
        task="arithmetic",
        iterations=2,
        prompts_per_iteration=4,
        group_size=3,
        max_new_tokens=4,
        micro_batch_size=4,
        beta=0.04,
        learning_rate=0.01,
        seed=7,
        eval_size=4,
        score_workers=1,
        cluster="auto",
        training_ranks=2,
        generation_workers=1,
        generation_shard_prompts=2,
    )
    run_dir = tmp_path / "run"
    free_before = ray.available_resources().get("CPU", 0)
    args = [sys.executable, "-m", "flows.cli", "run", "--run-dir", str(run_dir)]
    for key, value in settings.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    marker = tmp_path / "paused"
    env = os.environ | {
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "GRPOFLOW_PAUSE_MARKER": str(marker),
        "GRPOFLOW_PAUSE_AT": f"write {run_dir}/iter-0002/generations.parquet",
    }
    child = subprocess.Popen(
        args,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 400
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"the run never reached its pause point (status {child.poll()})"
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
    deadline = time.monotonic() + 60  # Ray ends a dead driver's actors: their CPUs come back
    while ray.available_resources().get("CPU", 0) < free_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) >= free_before, "the killed flow's actors outlived it"
    first = {
        name: (run_dir / "iter-0001" / name).read_bytes()
        for name in ("generations.parquet", "rewards.parquet", "advantages.parquet")
    }
    assert not Manifest(run_dir / "iter-0002").is_done("generations.parquet")

    grpo_train(GRPOConfig(run_dir=run_dir, **settings))  # the same run folder again, in this process
    for name, payload in first.items():
        assert (run_dir / "iter-0001" / name).read_bytes() == payload, f"iteration 1's {name} was redone"
    manifest = Manifest(run_dir / "iter-0002")
    assert all(
        manifest.is_done(name)
        for name in ("generations.parquet", "rewards.parquet", "advantages.parquet", "checkpoint")
    )
    assert read_table(run_dir / "iter-0002" / "generations.parquet", GENERATIONS).num_rows == 12
