"""The model registry and its promotion gate (`--register-as NAME`, MLflow's model registry).

At the end of a flow run the final model is registered as a new version of NAME, with the
final iteration's metrics and a fingerprint of the held-out set they were measured on
(sha256 of ``dataset/eval.parquet``'s sorted prompt ids) as version tags. The version gets
the ``champion`` alias only when its ``promote_on`` metric is at least the current
champion's *and* both were measured on the same held-out set: numbers from different sets
are never compared; the version then stays registered, un-promoted, and the run says why in
one line. Every registration is also recorded in the run folder's tracking.json, so
``grpo inspect`` lists them without a server, and a re-run of a finished folder does not
register its model twice.

``grpo serve`` trains from the champion (`train_from`): `champion_start` finds its weights,
in this folder's checkpoints when it came from here (optimiser state included), else
downloaded from the registry.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.run_folder import CHECKPOINT, iteration_dir
from data.schemas import PROMPTS
from data.store import TMP_PREFIX, read_table
from flows.config import GRPOConfig
from flows.observe.inspection import CHAMPION
from flows.observe.state import read_state, update_state
from flows.observe.tracking import MlflowSink, Tracking, require_tracking, store_uri

log = logging.getLogger("grpoflow.registry")

TAG = "grpoflow."  # prefix of the version tags written here
LEFT_OUT = {"optimizer.pt"}  # training state, not part of the model a registry serves


def final_model_dir(run_dir: str | Path, iteration: int) -> Path:
    """The one place that says where a finished run's model files are: the run's exported
    ``final/`` folder (tasks/model.py: weights and tokenizer, a LoRA adapter merged in), else
    (a folder from before final/ existed) its last iteration's checkpoint."""
    from tasks.model import (
        final_model_dir as exported,
    )  # here: `grpo inspect` imports this module and must not load torch

    return exported(run_dir) or iteration_dir(run_dir, iteration) / CHECKPOINT


def heldout_fingerprint(run_dir: str | Path) -> str | None:
    """sha256 of the held-out set's prompt ids (sorted: the set, not its order), or None
    for a run without one."""
    path = Path(run_dir) / "dataset" / "eval.parquet"
    if not path.is_file():
        return None
    ids = sorted(read_table(path, PROMPTS, columns=["prompt_id"]).column("prompt_id").to_pylist())
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str


def gate(metric: str, value: float | None, fingerprint: str | None, champion: dict[str, Any] | None) -> Decision:
    """Promote a candidate with `value` of `metric` on the held-out set `fingerprint`?
    `champion`: the current champion's version tags plus "version", or None."""
    if value is None or not math.isfinite(value):
        return Decision(False, f"not promoted: the final iteration has no {metric} to compare")
    if fingerprint is None:
        return Decision(False, f"not promoted: the run has no held-out set, so its {metric} is comparable to nothing")
    if champion is None:
        return Decision(
            True, f"champion now: the first version with a {metric} ({value:.4g}, held-out set {fingerprint[:12]})"
        )
    theirs = champion.get(f"{TAG}heldout_sha256")
    if theirs != fingerprint:
        return Decision(
            False,
            f"not promoted: its held-out set (sha256 {fingerprint[:12]}) is not champion v{champion['version']}'s "
            f"({(theirs or 'none')[:12]}); metrics of different sets are not compared",
        )
    recorded = champion.get(f"{TAG}metric.{metric}")
    if recorded is None:
        return Decision(
            False, f"not promoted: champion v{champion['version']} has no recorded {metric} to compare with"
        )
    best = float(recorded)
    if value >= best:
        return Decision(
            True,
            (
                f"champion now: {metric} {value:.4g} >= v{champion['version']}'s {best:.4g} on the same held-out set "
                f"({fingerprint[:12]})"
            ),
        )
    return Decision(
        False,
        (
            f"not promoted: {metric} {value:.4g} < champion v{champion['version']}'s {best:.4g} on the same held-out "
            f"set ({fingerprint[:12]})"
        ),
    )


def champion_version(client, name: str) -> dict[str, Any] | None:
    """The champion's tags and version number, or None when NAME has no champion (or no versions)."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return {**version.tags, "version": version.version, "source": version.source}


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name, description="GRPO policies registered by grpoflow (flows/observe/registry.py)"
            )
        except MlflowException:
            client.get_registered_model(name)  # created meanwhile by another process; anything else raises here


def register_final_model(sink: MlflowSink, config: GRPOConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    """Register the run's final model as a new version of `config.register_as`, then apply
    the gate. Returns (and records in tracking.json) what happened."""
    client, name, run_dir = sink.client, config.register_as, Path(config.run_dir)
    iteration = int(metrics["iteration"])
    done = [
        e
        for e in read_state(run_dir).get("registry", [])
        if (e["tracking_uri"], e["name"], e["run_id"], e["iteration"]) == (sink.uri, name, sink.run_id, iteration)
    ]
    if done:
        log.info(
            f"{name} v{done[-1]['version']}: iteration {iteration} of this run is registered "
            f"already ({done[-1]['reason']})"
        )
        return done[-1]

    model_dir = final_model_dir(run_dir, iteration)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir}: no transformers model to register (a missing checkpoint, or a LoRA adapter "
            f"without the run's merged final/ export)"
        )
    artifact_path = f"model-iter-{iteration:04d}"
    for file in sorted(model_dir.iterdir()):
        if file.is_file() and file.name not in LEFT_OUT:
            client.log_artifact(sink.run_id, str(file), artifact_path)
    fingerprint = heldout_fingerprint(run_dir)
    measured = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and (k.startswith("held_out") or k == config.promote_on)
    }
    tags = {
        f"{TAG}run_dir": str(run_dir.resolve()),
        f"{TAG}iteration": str(iteration),
        f"{TAG}heldout_sha256": fingerprint or "none",
        f"{TAG}promote_on": config.promote_on,
        **{f"{TAG}metric.{k}": repr(v) for k, v in measured.items()},
    }
    _ensure_registered_model(client, name)
    source = f"{client.get_run(sink.run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source, run_id=sink.run_id, tags=tags)

    champion = champion_version(client, name)
    decision = gate(config.promote_on, measured.get(config.promote_on), fingerprint, champion)
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    client.set_model_version_tag(name, version.version, f"{TAG}gate", decision.reason)
    entry = {
        "tracking_uri": sink.uri,
        "name": name,
        "version": int(version.version),
        "run_id": sink.run_id,
        "iteration": iteration,
        "metric": config.promote_on,
        "value": measured.get(config.promote_on),
        "heldout_sha256": fingerprint,
        "promoted": decision.promoted,
        "reason": decision.reason,
        "source": source,
    }
    update_state(run_dir, "registry", lambda entries: [*(entries or []), entry])
    log.info(f"registered {name} v{version.version}, {decision.reason}")
    return entry


def champion_start(config: GRPOConfig) -> str | None:
    """The weights a scheduled run starts from when it trains from the champion: this
    folder's checkpoint of the champion's iteration when it is still there, else the
    champion's registered files, downloaded once into ``registry/<name>-v<N>/``. None when
    there is no champion or `train_from` is "latest"."""
    if config.register_as is None or config.train_from != "champion":
        return None
    require_tracking("mlflow")
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = store_uri(config.tracking_uri)
    champion = champion_version(MlflowClient(tracking_uri=uri, registry_uri=uri), config.register_as)
    if champion is None:
        return None
    run_dir = Path(config.run_dir)
    if champion.get(f"{TAG}run_dir") == str(run_dir.resolve()):
        checkpoint = iteration_dir(run_dir, int(champion[f"{TAG}iteration"])) / CHECKPOINT
        if checkpoint.is_dir():
            return str(checkpoint)
    local = run_dir / "registry" / f"{config.register_as}-v{champion['version']}"
    if not (local / "config.json").is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{local.name}.", dir=local.parent) as tmp:
            files = mlflow.artifacts.download_artifacts(artifact_uri=champion["source"], dst_path=tmp, tracking_uri=uri)
            shutil.rmtree(local, ignore_errors=True)  # a download cut short
            os.replace(files, local)
    return str(local)


def register(tracking: Tracking, config: GRPOConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    """At the end of a successful run: register the final model and apply the promotion
    gate, when the config asks for it ({} otherwise)."""
    if config.register_as is None or tracking.mlflow is None:
        return {}
    return {"registered": register_final_model(tracking.mlflow, config, metrics)}
