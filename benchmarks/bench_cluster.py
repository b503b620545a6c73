"""Seconds per stage and per iteration of the GRPO flow in one process (`--cluster local`)
against the same flow on a local Ray cluster with 1 and with 2 training ranks / generation
workers (flows/cluster/ray_cluster.py), same model, prompts, seeds and settings.

    python benchmarks/bench_cluster.py                                   # tiny model
    python benchmarks/bench_cluster.py --model smollm2 --prompts 4 --group-size 4 --max-new-tokens 32 --per-round 1

Sides, each a fresh process (interleaved round by round, so they share the machine's load):
  local   the flow as always: every stage in the flow process
  ray-1   Ray started inside the process (ray.init, 127.0.0.1), 1 training rank, 1 generation worker
  ray-2   the same with 2 gloo training ranks (DDP) and 2 generation workers
Every side's first iteration (actor start-up, model loads) is a warm-up and is not counted.
Stage seconds are those the run folder's manifests record for each stage (what `grpo inspect`
shows), so they include the work each stage hands to Ray. On a machine with 2 cores the
2-worker side cannot be faster than 2x and, with the flow process, Ray's own processes and
other users' jobs on the same cores, usually is not faster at all: the figures measure the
overhead of the cluster path honestly, not the speed-up of a real cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (sets the offline/quiet environment and sys.path)
from common import ROOT, fmt, machine_info, summary

SIDES = {"local": (0, 0), "ray-1": (1, 1), "ray-2": (2, 2)}  # (training ranks, generation workers); 0 = no Ray
STAGES = {
    "prompts.parquet": "select",
    "generations.parquet": "generate",
    "rewards.parquet": "score",
    "advantages.parquet": "advantages",
    "checkpoint": "update",
}


def worker(a: argparse.Namespace) -> dict:
    ranks, workers = SIDES[a.worker]
    if ranks:
        import ray

        started = time.perf_counter()
        ray.init(num_cpus=a.ray_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        ray_start = time.perf_counter() - started
    from flows.config import GRPOConfig
    from flows.train import grpo_train

    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-cluster-{a.worker}-", dir=a.scratch))
    cluster = (
        dict(cluster="auto", training_ranks=ranks, generation_workers=workers, generation_shard_prompts=a.shard_prompts)
        if ranks
        else {}
    )
    config = GRPOConfig(
        run_dir=run_dir,
        model=a.model_path,
        dataset=a.dataset,
        task=a.task,
        rewards={a.reward: 1.0},
        use_chat_template=a.chat_template,
        iterations=a.per_round + 1,
        prompts_per_iteration=a.prompts,
        group_size=a.group_size,
        max_new_tokens=a.max_new_tokens,
        micro_batch_size=a.micro_batch,
        generation_batch_size=a.prompts * a.group_size,
        eval_every=0,
        eval_size=a.eval_size,
        seed=a.seed,
        **cluster,
    )
    grpo_train(config)
    out = {"side": a.worker, "ray_start_s": ray_start if ranks else 0.0, "iterations": []}
    for it in range(2, a.per_round + 2):  # iteration 1 is the warm-up
        folder = run_dir / f"iter-{it:04d}"
        entries = json.loads((folder / "_manifest.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
        out["iterations"].append(
            {"step_time": metrics["step_time"], **{STAGES[k]: v["seconds"] for k, v in entries.items() if k in STAGES}}
        )
    return out


def prepare(a: argparse.Namespace) -> None:
    a.scratch.mkdir(parents=True, exist_ok=True)
    if a.model == "tiny":
        a.model_path, a.dataset = None, None  # the built-in tiny model and arithmetic task
        a.task, a.reward, a.chat_template = None, "exact_answer", False
    else:  # smollm2
        from smollm2 import smollm2_hf_folder, write_gsm_symbolic_jsonl

        a.model_path = str(smollm2_hf_folder(a.scratch.parent / "smollm2-135m-instruct"))
        a.dataset = str(write_gsm_symbolic_jsonl(a.scratch / "gsm_symbolic.jsonl", 256, seed=0))
        from rewards import known_rewards

        a.reward = "math" if "math" in known_rewards() else "smollm2:final_number"
        a.task, a.chat_template = "math", True


def run_side(side: str, a: argparse.Namespace) -> dict:
    out = a.scratch / f"{side}-{time.time_ns()}.json"
    args = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--worker-out",
        str(out),
        "--model",
        a.model,
        "--prompts",
        str(a.prompts),
        "--group-size",
        str(a.group_size),
        "--max-new-tokens",
        str(a.max_new_tokens),
        "--micro-batch",
        str(a.micro_batch),
        "--per-round",
        str(a.per_round),
        "--eval-size",
        str(a.eval_size),
        "--shard-prompts",
        str(a.shard_prompts),
        "--ray-cpus",
        str(a.ray_cpus),
        "--scratch",
        str(a.scratch),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, env=env, cwd=ROOT, capture_output=not a.verbose, text=True, timeout=a.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"side {side} failed ({proc.returncode}): {(proc.stderr or '')[-2000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument(
        "--micro-batch", type=int, default=16, help="completions per forward/backward (dealt over the ranks)"
    )
    p.add_argument("--shard-prompts", type=int, default=4, help="prompts per generation shard (dealt over the workers)")
    p.add_argument(
        "--eval-size", type=int, default=16, help="held-out problems of the start and end evaluations (not timed)"
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--per-round", type=int, default=3, help="timed iterations per process, after one warm-up iteration")
    p.add_argument(
        "--ray-cpus", type=int, default=6, help="logical CPUs of the in-process Ray cluster (Ray does not pin cores)"
    )
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--scratch", type=Path, default=ROOT / "benchmarks" / "out" / "cluster")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--worker", choices=list(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    prepare(a)
    if a.worker:
        Path(a.worker_out).write_text(json.dumps(worker(a)))
        return
    print(json.dumps(machine_info()))
    results: dict[str, list[dict]] = {s: [] for s in a.sides}
    for r in range(a.rounds):
        for side in a.sides:
            res = run_side(side, a)
            results[side].append(res)
            print(
                f"round {r + 1} {side}: "
                + ", ".join(f"{i['step_time']:.2f}s" for i in res["iterations"])
                + f" per iteration (ray start {res['ray_start_s']:.1f}s); load average {os.getloadavg()}",
                flush=True,
            )
    base = summary([i["step_time"] for res in results.get("local", []) for i in res["iterations"]])
    print(
        f"\nmodel {a.model}, {a.prompts} prompts x {a.group_size} samples x {a.max_new_tokens} tokens; load average {os.getloadavg()}"
    )
    for side in a.sides:
        its = [i for res in results[side] for i in res["iterations"]]
        step = summary([i["step_time"] for i in its])
        ratio = f"  ({step['median'] / base['median']:.2f}x local)" if base.get("n") and step.get("n") else ""
        print(f"{side:6s} iteration {fmt(step)}{ratio}")
        for stage in STAGES.values():
            print(f"         {stage:10s} {fmt(summary([i[stage] for i in its if stage in i]))}")


if __name__ == "__main__":
    main()
