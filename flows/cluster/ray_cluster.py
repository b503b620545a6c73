"""The stages on a Ray cluster (`--cluster auto` or `ray://host:port`); see flows/cluster/.

* Training ranks: `training_ranks` long-lived actors, one torch.distributed process group
  (gloo on CPU, NCCL on GPUs) made once per flow run; each runs tasks.update.update_policy,
  which deals every step's micro-batches over the ranks (tasks/distributed.py). They keep the
  policy and optimiser in memory across iterations, as the flow process does on one machine.
* Weights: after each update rank 0's full state dict goes into Ray's object store once; the
  flow process (evaluation) and every generation worker load it from there, never from the
  checkpoint folder (which may not even be written: save_every).
* Generation: the iteration's prompts are cut into shards of `generation_shard_prompts`
  prompts, each sampled with a seed of its own (the stage's seed and the shard's index), and
  dealt over `generation_workers` long-lived actors; the shards are joined in shard order, so
  the artifact is the same whatever the number of workers.
* Scoring: the generations are cut into one slice per cluster CPU, each scored by a Ray task
  with tasks.score.score_generations; the slices are joined in order and the error fraction
  is checked over the whole file.

A worker that dies fails its stage; the stage's Prefect retry starts a new worker (given the
latest weights from the object store) and redoes the stage from its input files, so the
artifact comes out the same, no row missing or doubled. A training rank that dies fails the
update (no retry: the process group is gone with the rank's optimiser state); the whole group
is ended and the run resumes from its last checkpoint when started again. Every actor is
owned by the flow process: `close()` ends them, and Ray ends them too if the flow process
dies, so no process of ours outlives the run.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from data.crash_points import PAUSE_AT_ENV, PAUSE_MARKER_ENV
from data.schemas import GENERATIONS, PROMPTS, REWARDS
from data.store import TMP_PREFIX, read_table, write_table
from flows.cluster.base import Stages
from tasks.generate import GenerateSettings, combined_summary, generate_completions
from tasks.model import adopt_weights, live_policy
from tasks.score import ScoreSettings, TooManyRewardErrors, score_failure_is_transient, score_generations
from tasks.update import UpdateSettings, UpdateStep, update_policy

# What the workers need of the flow process's environment (offline hub, caches, progress bars).
_PASSED_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HOME",
    "GRPOFLOW_CACHE",
    "GRPOFLOW_PROGRESS",
    "TOKENIZERS_PARALLELISM",
    "OMP_NUM_THREADS",
    "PYTHONPATH",
    PAUSE_AT_ENV,
    PAUSE_MARKER_ENV,
)  # the last two: crash tests reach workers
_PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)


class ClusterError(RuntimeError):
    pass


class TrainingRankDied(RuntimeError):
    pass


def _runtime_env() -> dict:
    return {"env_vars": {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}}


def _set_threads(cpus: float) -> None:
    torch.set_num_threads(max(1, int(cpus)))


@ray.remote(num_cpus=0, max_retries=0)
def _read_probe(path: str) -> tuple[str, str | None]:
    """(this node's host name, the probe file's text or None when it cannot be read)."""
    try:
        return socket.gethostname(), Path(path).read_text()
    except OSError:
        return socket.gethostname(), None


def check_shared_storage(run_dir: Path) -> None:
    """Every alive node of the cluster must see the run folder (the stages read and write only
    files there): a probe file written here is read back on each node."""
    probe = run_dir / f"{TMP_PREFIX}cluster-probe-{secrets.token_hex(4)}"
    token = secrets.token_hex(16)
    probe.write_text(token)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        answers = ray.get(
            [
                _read_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                    str(probe)
                )
                for n in nodes
            ]
        )
    finally:
        probe.unlink(missing_ok=True)
    for node, (host, text) in zip(nodes, answers, strict=True):
        if text != token:
            raise ClusterError(
                f"run folder {run_dir} is not visible from Ray node {node.get('NodeManagerAddress', host)} ({host}): "
                "the run folder must be on storage shared by every node"
            )


@ray.remote
class TrainingRank:
    """One rank of the update's process group; holds the policy and optimiser across iterations."""

    def __init__(self, cpus: float):
        _set_threads(cpus)

    def address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def join(self, host: str, port: int, rank: int, world: int) -> int:
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray makes the actor's GPU(s) the only visible ones
        dist.init_process_group(
            backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world, timeout=_PROCESS_GROUP_TIMEOUT
        )
        return os.getpid()

    def update(self, *args: Any, **kwargs: Any) -> dict:
        return update_policy(*args, **kwargs)

    def weights(self, path: str, parallelism: str) -> dict[str, torch.Tensor] | None:
        from tasks.distributed import full_state_dict, pick_parallelism, rank_and_world

        sharded = pick_parallelism(parallelism).sharded and rank_and_world()[1] > 1
        policy = live_policy(path)
        return full_state_dict(policy.model, policy.trainer, sharded)


@ray.remote
class GenerationWorker:
    """Holds the policy (in memory across iterations) and samples shards of prompts."""

    def __init__(self, cpus: float):
        _set_threads(cpus)

    def pid(self) -> int:
        return os.getpid()

    def sync(self, path: str, weights: dict[str, torch.Tensor], skeleton: str) -> None:
        adopt_weights(path, weights, skeleton=skeleton)

    def generate(self, prompts_path: str, out_path: str, policy_path: str, **settings: Any) -> dict:
        # This process never trains, so it keeps the reference model between shards and iterations.
        return generate_completions(prompts_path, out_path, policy_path, **settings | {"keep_reference": True})


@ray.remote(max_retries=0)
def _score_slice(
    generations_path: str, first: int, count: int, prompts_path: str, scratch: str, settings: dict
) -> tuple[pa.Table, dict]:
    """Score rows [first, first + count) of the generations file; the rewards rows and summary."""
    gens = read_table(generations_path, GENERATIONS).slice(first, count)
    slice_gens, slice_out = Path(f"{scratch}-{first}-gens.parquet"), Path(f"{scratch}-{first}-rewards.parquet")
    try:
        write_table(gens, slice_gens, GENERATIONS)
        summary = score_generations(
            str(slice_gens), prompts_path, str(slice_out), **settings | {"max_error_fraction": 1.0, "workers": 1}
        )
        return read_table(slice_out, REWARDS), summary
    finally:
        slice_gens.unlink(missing_ok=True)
        slice_out.unlink(missing_ok=True)


class RayCluster:
    """The flow run's actors and where each stage's work goes."""

    def __init__(self, config):
        self.config = config
        self.trainers: list = []
        self.generators: list = []
        self.weights: tuple[str, ray.ObjectRef] | None = (
            None  # (checkpoint path, rank 0's state dict) of the last update
        )
        self.skeleton: str | None = None  # a checkpoint on disk with the policy's architecture (the first policy seen)

    @classmethod
    def connect(cls, config) -> RayCluster:
        if not ray.is_initialized():
            ray.init(address=config.cluster, log_to_driver=False)
        check_shared_storage(Path(config.run_dir))
        return cls(config)

    def stages(self) -> Stages:
        @task(name="generate", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
        def generate(
            prompts_path: str, out_path: str, policy_path: str, settings: GenerateSettings, seed: int
        ) -> dict[str, Any]:
            return self.generate(prompts_path, out_path, policy_path, seed=seed, **settings.keywords())

        @task(
            name="score",
            retries=2,
            retry_delay_seconds=1,
            retry_condition_fn=score_failure_is_transient,
            cache_policy=NO_CACHE,
        )
        def score(generations_path: str, prompts_path: str, out_path: str, settings: ScoreSettings) -> dict[str, Any]:
            return self.score(generations_path, prompts_path, out_path, **settings.keywords())

        @task(name="update", retries=0, cache_policy=NO_CACHE)
        def update(
            generations_path: str | list[str],
            advantages_path: str,
            policy_path: str,
            out_checkpoint: str,
            settings: UpdateSettings,
            step: UpdateStep,
        ) -> dict[str, Any]:
            return self.update(
                generations_path, advantages_path, policy_path, out_checkpoint, **step.keywords(settings)
            )

        return Stages(generate, score, update, close=self.close)

    # --- actors ----------------------------------------------------------------------------
    def _options(self) -> dict:
        return dict(
            num_cpus=self.config.cpus_per_worker, num_gpus=self.config.gpus_per_worker, runtime_env=_runtime_env()
        )

    def _start_trainers(self) -> list:
        world = self.config.training_ranks
        ranks = [TrainingRank.options(**self._options()).remote(self.config.cpus_per_worker) for _ in range(world)]
        host, port = ray.get(ranks[0].address.remote())
        ray.get([r.join.remote(host, port, k, world) for k, r in enumerate(ranks)])
        return ranks

    def _generators(self) -> list:
        alive = []
        for w in self.generators:
            try:
                ray.get(w.pid.remote())
                alive.append(w)
            except RayActorError:
                pass  # died since the last stage: replaced below
        while len(alive) < self.config.generation_workers:
            worker = GenerationWorker.options(**self._options()).remote(self.config.cpus_per_worker)
            if self.weights is not None:
                worker.sync.remote(self.weights[0], self.weights[1], self.skeleton)
            alive.append(worker)
        self.generators = alive
        return alive

    def close(self) -> None:
        for actor in self.trainers + self.generators:
            ray.kill(actor)
        self.trainers, self.generators, self.weights = [], [], None

    # --- stages ----------------------------------------------------------------------------
    def generate(self, prompts_path: str, out_path: str, policy_path: str, *, seed: int = 0, **settings: Any) -> dict:
        self.skeleton = self.skeleton or policy_path
        prompts = read_table(prompts_path, PROMPTS)
        size = self.config.generation_shard_prompts
        shards = [(k, prompts.slice(start, size)) for k, start in enumerate(range(0, prompts.num_rows, size))]
        workers = self._generators()
        scratch = Path(out_path).parent / f"{TMP_PREFIX}{Path(out_path).stem}"
        paths = [(Path(f"{scratch}-{k:05d}-prompts.parquet"), Path(f"{scratch}-{k:05d}.parquet")) for k, _ in shards]
        try:
            for (prompt_file, _), (_, table) in zip(paths, shards, strict=True):
                write_table(table, prompt_file, PROMPTS)
            calls = [
                workers[k % len(workers)].generate.remote(
                    str(p), str(g), policy_path, seed=seed * 1_000_003 + k, **settings
                )
                for k, (p, g) in enumerate(paths)
            ]
            summaries = ray.get(calls)
            table = (
                pa.concat_tables([read_table(g, GENERATIONS) for _, g in paths])
                if paths
                else GENERATIONS.schema.empty_table()
            )
            write_table(table, out_path, GENERATIONS)
        finally:
            for p, g in paths:
                p.unlink(missing_ok=True)
                g.unlink(missing_ok=True)
        return combined_summary(summaries) | {"generation_workers": len(workers)}

    def score(
        self,
        generations_path: str,
        prompts_path: str,
        out_path: str,
        *,
        max_error_fraction: float = 0.05,
        **settings: Any,
    ) -> dict:
        started = time.monotonic()
        settings.pop("workers", None)  # one scoring process per Ray task; the cluster's CPUs are the workers
        total = read_table(generations_path, GENERATIONS, columns=["prompt_id"]).num_rows
        free = int(ray.available_resources().get("CPU", 0))  # what the workers' reservations leave
        if free < 1 and total:
            raise ClusterError(
                "no CPU of the Ray cluster is left for scoring: every CPU is reserved by training ranks and generation "
                "workers (lower cpus_per_worker or add CPUs)"
            )
        slices = max(1, min(total, free))
        size = math.ceil(total / slices) if total else 0
        scratch = str(Path(out_path).parent / f"{TMP_PREFIX}{Path(out_path).stem}")
        parts = (
            ray.get(
                [
                    _score_slice.remote(generations_path, first, size, prompts_path, scratch, settings)
                    for first in range(0, total, size or 1)
                ]
            )
            if total
            else []
        )
        table = pa.concat_tables([t for t, _ in parts]) if parts else None
        if table is None:
            return score_generations(
                generations_path, prompts_path, out_path, max_error_fraction=max_error_fraction, **settings
            )
        errored = int(pc.sum(pc.is_nan(table["reward"])).as_py() or 0)
        if errored > math.floor(max_error_fraction * total):
            raise TooManyRewardErrors(
                f"more than max_error_fraction={max_error_fraction:.0%} of the {total} rows in {generations_path} "
                f"could not be scored ({errored})"
            )
        write_table(table, out_path, REWARDS)
        seconds = time.monotonic() - started
        summary = {
            "rows": total,
            "errored": errored,
            "reward_mean": pc.mean(pc.drop_null(_not_nan(table["reward"]))).as_py(),
        }
        for name in (c.removeprefix("reward/") for c in table.column_names if c.startswith("reward/")):
            # As tasks/score.py counts them: a value with an error text is scored (the candidate's
            # failure, explained); only NaN means the row could not be scored.
            column = table[f"reward/{name}"]
            summary[f"reward/{name}_mean"] = pc.mean(pc.drop_null(_not_nan(column))).as_py()
            summary[f"error/{name}_rows"] = int(pc.sum(pc.is_nan(column)).as_py() or 0)
        summary |= {
            "timeouts": sum(s["timeouts"] for _, s in parts),
            "worker_deaths": sum(s["worker_deaths"] for _, s in parts),
            "seconds": seconds,
            "rows_per_s": total / seconds if seconds > 0 else math.nan,
            "score_slices": len(parts),
        }
        return {k: (math.nan if v is None else v) for k, v in summary.items()}

    def update(
        self, generations_path, advantages_path: str, policy_path: str, out_checkpoint: str, **settings: Any
    ) -> dict:
        self.skeleton = self.skeleton or policy_path
        parallelism = self.config.parallelism
        live_policy(
            policy_path, settings.get("device", "auto"), settings.get("dtype", "auto")
        )  # the flow's copy, for evaluation
        try:
            if not self.trainers:
                self.trainers = self._start_trainers()
            results = ray.get(
                [
                    r.update.remote(
                        generations_path,
                        advantages_path,
                        policy_path,
                        out_checkpoint,
                        parallelism=parallelism,
                        **settings,
                    )
                    for r in self.trainers
                ]
            )
            refs = [r.weights.remote(out_checkpoint, parallelism) for r in self.trainers]
            ray.get(refs[1:])
        except (RayActorError, RayTaskError) as err:
            for r in self.trainers:
                ray.kill(r)
            self.trainers = []
            cause = getattr(err, "cause", None)  # a rank's own exception (RayTaskError), else the rank died
            what = (
                f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"
                if cause
                else type(err).__name__
            )
            raise TrainingRankDied(
                f"a training rank failed during the update to {out_checkpoint} ({what}): the process group "
                "is ended; run the same command again to resume from the last checkpoint"
            ) from None
        self.weights = (out_checkpoint, refs[0])
        adopt_weights(out_checkpoint, ray.get(refs[0]))
        for w in self.generators:
            w.sync.remote(out_checkpoint, refs[0], self.skeleton)
        return results[0] | {"update/training_ranks": len(self.trainers)}


def _not_nan(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.if_else(pc.is_nan(column), None, column)
