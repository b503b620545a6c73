"""Where each stage runs: the one place that decides it.

The flow body (flows/train.py) is the pipeline and calls `stages.generate`, `stages.score`
and `stages.update` with the same arguments whatever the cluster; the stage functions in
tasks/ stay plain. `--cluster local` (the default) runs everything in the flow process, as
always. A Ray address (`auto`, `ray://host:port`) runs the update on `training_ranks`
long-lived Ray actors forming one torch.distributed process group, the generation on
`generation_workers` long-lived actors holding the policy, and scoring as Ray tasks over the
cluster's CPUs (flows/cluster/ray_cluster.py; Ray is imported only then).
"""

from __future__ import annotations

from collections.abc import Callable

from flows.cluster.base import Stages
from flows.config import GRPOConfig
from tasks.generate import generate_task
from tasks.score import score_task
from tasks.update import update_task

__all__ = ["Stages", "stages_for"]


def _local(config: GRPOConfig) -> Stages:
    return Stages(generate_task, score_task, update_task, saves_in_background=True)


def _ray(config: GRPOConfig) -> Stages:
    from flows.cluster.ray_cluster import RayCluster  # the optional part: only imported when asked for

    return RayCluster.connect(config).stages()


CLUSTERS: dict[str, Callable[..., Stages]] = {"local": _local, "ray": _ray}


def cluster_kind(address: str) -> str:
    """`local`, or `ray` for `auto` and `ray://host:port` (validated in flows/config.py)."""
    return "local" if address == "local" else "ray"


def stages_for(config: GRPOConfig) -> Stages:
    return CLUSTERS[cluster_kind(config.cluster)](config)
