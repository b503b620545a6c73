"""Does GRPO learn? The default `grpo run` (built-in tiny model, 2-digit addition, reward
only) for several seeds, each from a cold model cache so the supervised warm-up is counted;
held-out greedy accuracy (500 problems never trained on) before, during and after; and an
SFT control: from the same warmed-up model, supervised training on the gold answers for the
same compute as the GRPO phase.

    python benchmarks/learning.py --seeds 0 1 2 --jobs 3

Compute is counted in CPU seconds of the process (all its threads): this machine is shared,
and wall time under other people's load says more about them than about the method. The flow
runs in-process (`grpo_train` with the CLI's defaults), so CPU time is read at the end of
every iteration. The wall time of one default run on a quiet machine is measured apart
(`--timing-run`).

Writes benchmarks/out/learning/summary.json and docs/learning_curve.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common  # sets the offline/quiet environment and sys.path
from common import ROOT, machine_info

PYTHON = sys.executable


def worker(seed: int, out: Path, sft_lr: float, sft_batch: int, threads: int) -> dict:
    """One seed: warm-up (cold cache), the default GRPO flow, then the SFT control."""
    # One thread per seed when seeds run side by side: oversubscribed OpenMP threads spin at
    # their barriers and burn CPU seconds without progress, which would blur the budget.
    common.set_threads(threads)
    os.environ["GRPOFLOW_CACHE"] = tempfile.mkdtemp(prefix=f"grpoflow-cache-{seed}-")
    from flows.cli import build_parser, config_from_args
    from flows.config import GRPOConfig
    from tasks.tiny_model import ensure_tiny_model

    run_dir = out / f"grpo-seed{seed}"
    config = config_from_args(build_parser().parse_args(["run", "--seed", str(seed), "--run-dir", str(run_dir)]))
    defaults = GRPOConfig()
    assert {k: v for k, v in config.model_dump().items() if k not in ("seed", "run_dir")} == {
        k: v for k, v in defaults.model_dump().items() if k not in ("seed", "run_dir")
    }, "learning.py must run the defaults"

    wall0, cpu0 = time.perf_counter(), time.process_time()
    model_dir = ensure_tiny_model(
        steps=config.tiny_model_sft_steps, seed=seed
    )  # what prepare-model does, timed on its own
    warmup = {"wall": time.perf_counter() - wall0, "cpu": time.process_time() - cpu0}

    import flows.train as train

    points: list[dict] = []
    original = train.write_metrics
    clock: dict = {}

    def write_metrics(run_dir_, iteration, metrics):
        original(run_dir_, iteration, metrics)
        if iteration == 0:  # the held-out evaluation before GRPO: the phase starts after it
            clock.update(wall=time.perf_counter(), cpu=time.process_time())
        points.append(
            {
                "iteration": iteration,
                "wall": time.perf_counter() - clock["wall"],
                "cpu": time.process_time() - clock["cpu"],
                "accuracy": metrics.get("held_out_accuracy"),
                "reward": metrics.get("reward"),
            }
        )

    train.write_metrics = write_metrics
    wall1 = time.perf_counter()
    train.grpo_train(config)
    flow_wall = time.perf_counter() - wall1
    grpo_cpu, grpo_wall = points[-1]["cpu"], points[-1]["wall"]
    curve = [p for p in points if p["accuracy"] is not None]

    sft = sft_control(str(model_dir), grpo_cpu, seed, sft_lr, sft_batch, eval_every=25)
    return {
        "seed": seed,
        "warmup": warmup,
        "flow_wall": flow_wall,
        "grpo_wall": grpo_wall,
        "grpo_cpu": grpo_cpu,
        "curve": curve,
        "rewards": [p["reward"] for p in points if p["iteration"] > 0],
        "before": curve[0]["accuracy"],
        "after": curve[-1]["accuracy"],
        "best": max(p["accuracy"] for p in curve),
        "sft": sft,
        "load": os.getloadavg(),
    }


def sft_control(model_dir: str, cpu_budget: float, seed: int, lr: float, batch_size: int, eval_every: int) -> dict:
    """Supervised training on gold answers from the warmed-up model for `cpu_budget` CPU
    seconds (held-out evaluations included in the budget, as in the GRPO phase)."""
    import torch

    from data import builtin
    from rewards.arithmetic import exact_answer
    from tasks.engines import SamplingSettings
    from tasks.engines.hf import HFEngine
    from tasks.model import load_model, load_tokenizer
    from tasks.tiny_model import _sft_batch

    torch.manual_seed(seed)
    model = load_model(model_dir, torch.device("cpu"), torch.float32)
    tok = load_tokenizer(model_dir)
    held = builtin.held_out_problems()
    held_ids = [tok.encode(p["prompt"]) for p in held]

    engine = HFEngine()
    engine.load(model, tok)
    greedy = SamplingSettings(max_new_tokens=8, greedy=True, batch_size=256, with_logprobs=False)

    def accuracy() -> float:
        samples = engine.sample(held_ids, 1, greedy, desc="evaluate")
        texts = tok.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
        return sum(exact_answer(t, p) for t, p in zip(texts, held, strict=True)) / len(held)

    # A stream of training problems different from the warm-up's; never held-out ones.
    problems = builtin.train_problems(100_000, seed + 1_000_003)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    curve = [{"step": 0, "cpu": 0.0, "accuracy": accuracy()}]
    step = 0
    while time.process_time() - cpu0 < cpu_budget:
        model.train()
        start = (step * batch_size) % (len(problems) - batch_size)
        model(**_sft_batch(tok, problems[start : start + batch_size])).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        step += 1
        if step % eval_every == 0:
            curve.append({"step": step, "cpu": time.process_time() - cpu0, "accuracy": accuracy()})
    if curve[-1]["step"] != step:
        curve.append({"step": step, "cpu": time.process_time() - cpu0, "accuracy": accuracy()})
    return {
        "steps": step,
        "cpu": time.process_time() - cpu0,
        "wall": time.perf_counter() - wall0,
        "curve": curve,
        "before": curve[0]["accuracy"],
        "after": curve[-1]["accuracy"],
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, r in enumerate(results):
        ax.plot(
            [p["cpu"] for p in r["curve"]],
            [100 * p["accuracy"] for p in r["curve"]],
            "-o",
            ms=3,
            color="tab:blue",
            alpha=0.85,
            label="GRPO from the reward only (grpo run defaults)" if k == 0 else None,
        )
        s = r["sft"]["curve"]
        ax.plot(
            [p["cpu"] for p in s],
            [100 * p["accuracy"] for p in s],
            "--",
            color="tab:gray",
            alpha=0.85,
            label="SFT control on the gold answers, same CPU time" if k == 0 else None,
        )
    ax.set_xlabel("CPU seconds after the supervised warm-up (evaluations included)")
    ax.set_ylabel("held-out greedy accuracy, 500 problems (%)")
    ax.set_title(f"Tiny model (1M params), 2-digit addition, {len(results)} seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def timing_run(out: Path) -> None:
    """One plain `grpo run` from a cold cache, timed by the wall clock, with the load around it."""
    env = {**os.environ, "GRPOFLOW_CACHE": tempfile.mkdtemp(prefix="grpoflow-cache-timing-")}
    load0 = os.getloadavg()
    started = time.perf_counter()
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [PYTHON, "-m", "flows.cli", "run", "--run-dir", str(out / f"timing-{int(time.time())}")],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    print(
        f"default `grpo run`, cold cache: {time.perf_counter() - started:.0f}s wall, {cpu:.0f} CPU seconds; load "
        f"before {load0}, after {os.getloadavg()}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="seeds at once (results are in CPU seconds, so this changes no figure but wall time)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per seed (the CPU-second figures are per process, all threads)",
    )
    p.add_argument("--sft-lr", type=float, default=1e-3, help="the warm-up recipe's learning rate")
    p.add_argument("--sft-batch", type=int, default=128, help="the warm-up recipe's batch size")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "learning")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "learning_curve.png")
    p.add_argument("--timing-run", action="store_true", help="only time one default `grpo run` from a cold cache")
    p.add_argument("--worker-seed", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    if args.timing_run:
        timing_run(args.out)
        return
    if args.worker_seed is not None:
        result = worker(args.worker_seed, args.out, args.sft_lr, args.sft_batch, args.threads)
        (args.out / f"seed{args.worker_seed}.json").write_text(json.dumps(result))
        return

    def launch(seed: int) -> dict:
        subprocess.run(
            [
                PYTHON,
                __file__,
                "--worker-seed",
                str(seed),
                "--out",
                str(args.out),
                "--sft-lr",
                str(args.sft_lr),
                "--sft-batch",
                str(args.sft_batch),
                "--threads",
                str(args.threads),
            ],
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )
        r = json.loads((args.out / f"seed{seed}.json").read_text())
        print(
            f"seed {seed}: warm-up {r['warmup']['cpu']:.0f} CPU-s; GRPO {r['grpo_cpu']:.0f} CPU-s "
            f"({r['grpo_wall']:.0f}s wall): held-out {r['before']:.1%} -> {r['after']:.1%} "
            f"({100 * (r['after'] - r['before']):+.1f} points, best {r['best']:.1%}); SFT control {r['sft']['steps']} "
            f"steps in {r['sft']['cpu']:.0f} CPU-s: {r['sft']['before']:.1%} -> {r['sft']['after']:.1%}",
            flush=True,
        )
        return r

    env_prefect = common.PrefectServer(args.out / "prefect-home") if args.jobs > 1 else None
    if env_prefect:  # parallel flows must not share the default ~/.prefect database
        env_prefect.__enter__()
    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(launch, args.seeds))
    finally:
        if env_prefect:
            env_prefect.__exit__(None, None, None)

    gains = [r["after"] - r["before"] for r in results]
    print(
        f"\nGRPO held-out gain: mean {100 * statistics.fmean(gains):+.1f} points over {len(gains)} seeds ("
        + ", ".join(f"{100 * g:+.1f}" for g in gains)
        + ")"
    )
    print("SFT control after the same CPU time: " + ", ".join(f"{r['sft']['after']:.1%}" for r in results))
    plot(results, args.png)
    (args.out / "summary.json").write_text(json.dumps({"machine": machine_info(), "results": results}, indent=2))
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
