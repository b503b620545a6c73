"""Parity with TRL: the same warmed-up tiny model, task, prompts, group size, learning rate,
loss type, beta and seeds in grpoflow (the real `grpo run` flow, Prefect and artifacts
included) and in TRL's GRPOTrainer; mean reward per step for both, several seeds, one PNG.

    python benchmarks/parity_trl.py --steps 100 --seeds 0 1 2 --jobs 2

Each (side, seed) runs in its own process with --threads torch threads; --jobs of them at
once. The agreement test printed at the end: for every block of 10 steps, the difference of
the two sides' seed-mean rewards against the spread between seeds (the pooled standard
error of that difference).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common  # sets the offline/quiet environment and sys.path
from common import ROOT, exact_answer_for_trl, machine_info, set_threads, trl_trainer, write_builtin_jsonl

PYTHON = sys.executable


def run_trl(args: argparse.Namespace, seed: int, out: Path) -> None:
    """One TRL run; writes {"reward": [...], "kl": [...], "seconds": [...]} to `out`."""
    set_threads(args.threads)
    from transformers import PrinterCallback

    from data import builtin
    from tasks.tiny_model import ensure_tiny_model

    model = str(ensure_tiny_model(steps=args.warmup_steps, seed=args.model_seed))
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in builtin.all_train_problems()]
    trainer = trl_trainer(
        model,
        rows,
        exact_answer_for_trl,
        output_dir=str(out.parent / f"trl-{seed}"),
        prompts_per_step=args.prompts,
        group_size=args.group_size,
        max_completion_length=args.max_new_tokens,
        learning_rate=args.lr,
        beta=args.beta,
        seed=seed,
        steps=args.steps,
        gradient_checkpointing=False,
    )
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    out.write_text(
        json.dumps(
            {
                "reward": [h["reward"] for h in logs],
                "kl": [h.get("kl", 0.0) for h in logs],
                "wall_seconds": time.perf_counter() - started,
            }
        )
    )


def run_grpoflow(args: argparse.Namespace, seed: int, out: Path) -> None:
    """One `grpo run` (the CLI, so the flow, Prefect and every artifact are in the loop)."""
    set_threads(args.threads)
    from tasks.tiny_model import ensure_tiny_model

    model = str(ensure_tiny_model(steps=args.warmup_steps, seed=args.model_seed))
    run_dir = out.parent / f"grpoflow-{seed}"
    cmd = [
        PYTHON,
        "-m",
        "flows.cli",
        "run",
        "--model",
        model,
        "--dataset",
        str(args.dataset),
        "--task",
        "arithmetic",
        "--run-dir",
        str(run_dir),
        "--iterations",
        str(args.steps),
        "--prompts-per-iteration",
        str(args.prompts),
        "--group-size",
        str(args.group_size),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--learning-rate",
        str(args.lr),
        "--beta",
        str(args.beta),
        "--seed",
        str(seed),
        "--micro-batch-size",
        str(args.prompts * args.group_size),
        "--save-every",
        str(args.steps),
    ]
    started = time.perf_counter()
    subprocess.run(
        cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    )
    metrics = [json.loads((run_dir / f"iter-{i:04d}" / "metrics.json").read_text()) for i in range(1, args.steps + 1)]
    out.write_text(
        json.dumps(
            {
                "reward": [m["reward"] for m in metrics],
                "kl": [m["kl"] for m in metrics],
                "wall_seconds": time.perf_counter() - started,
            }
        )
    )


# Two-sided 95% Student t quantiles by degrees of freedom: with 3 seeds per side the spread
# itself is uncertain, and 2 standard errors would claim more than the data show.
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 8: 2.31, 10: 2.23, 20: 2.09}


def _t95(df: float) -> float:
    return next((v for k, v in sorted(_T95.items()) if k >= df), 1.96) if df >= 1 else math.inf


def agreement(curves: dict[str, list[list[float]]], block: int) -> list[dict]:
    """Per block of steps: each side's seed-mean reward and their difference, against two
    yardsticks of the spread between seeds: the 95% interval of the difference (Welch,
    Student t) and the range of the other side's seeds."""
    rows = []
    steps = min(len(c) for side in curves.values() for c in side)
    for start in range(0, steps - block + 1, block):
        per_seed = {side: [statistics.fmean(c[start : start + block]) for c in runs] for side, runs in curves.items()}
        a, b = per_seed["grpoflow"], per_seed["trl"]
        m_a, m_b = statistics.fmean(a), statistics.fmean(b)
        va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
        se = math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else math.inf
        half = _t95(df) * se
        rows.append(
            {
                "steps": f"{start + 1}-{start + block}",
                "grpoflow": m_a,
                "trl": m_b,
                "diff": m_a - m_b,
                "se": se,
                "ci95": half,
                "within": abs(m_a - m_b) <= half,
                "in_trl_seed_range": min(b) <= m_a <= max(b),
                "grpoflow_seeds": a,
                "trl_seeds": b,
            }
        )
    return rows


def plot(curves: dict[str, list[list[float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = {"grpoflow": "tab:blue", "trl": "tab:orange"}
    for side, runs in curves.items():
        for c in runs:
            ax.plot(range(1, len(c) + 1), c, color=colours[side], alpha=0.25, lw=0.8)
        steps = min(map(len, runs))
        mean = [statistics.fmean(c[i] for c in runs) for i in range(steps)]
        smooth = [statistics.fmean(mean[max(0, i - 9) : i + 1]) for i in range(steps)]
        ax.plot(
            range(1, steps + 1),
            smooth,
            color=colours[side],
            lw=2.2,
            label=f"{side}: mean of {len(runs)} seeds (10-step moving average)",
        )
    ax.set_xlabel("step (one generation batch, one optimiser step)")
    ax.set_ylabel("mean reward of the batch")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--warmup-steps", type=int, default=250)
    p.add_argument("--model-seed", type=int, default=0, help="seed of the shared warmed-up starting model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each with --threads threads)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "parity")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "parity_trl.png")
    p.add_argument(
        "--report-only", action="store_true", help="re-print the comparison and the plot from the runs saved in --out"
    )
    p.add_argument("--worker", choices=["trl", "grpoflow"], help=argparse.SUPPRESS)
    p.add_argument("--worker-seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dataset", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        out = args.out / f"{args.worker}-{args.worker_seed}.json"
        (run_trl if args.worker == "trl" else run_grpoflow)(args, args.worker_seed, out)
        return

    args.out.mkdir(parents=True, exist_ok=True)
    dataset = write_builtin_jsonl(args.out / "train.jsonl")
    # Build the shared starting model once, before workers race to build it.
    from tasks.tiny_model import ensure_tiny_model

    ensure_tiny_model(steps=args.warmup_steps, seed=args.model_seed)
    common_flags = [
        "--steps",
        str(args.steps),
        "--prompts",
        str(args.prompts),
        "--group-size",
        str(args.group_size),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--lr",
        str(args.lr),
        "--beta",
        str(args.beta),
        "--warmup-steps",
        str(args.warmup_steps),
        "--model-seed",
        str(args.model_seed),
        "--threads",
        str(args.threads),
        "--out",
        str(args.out),
        "--dataset",
        str(dataset),
    ]
    # Interleave the sides: seed order grpoflow-0, trl-0, grpoflow-1, ... so both see the same load.
    jobs = [(side, seed) for seed in args.seeds for side in ("grpoflow", "trl")]

    def launch(job):
        side, seed = job
        started = time.perf_counter()
        subprocess.run(
            [PYTHON, __file__, "--worker", side, "--worker-seed", str(seed), *common_flags], check=True, cwd=ROOT
        )
        print(f"  {side} seed {seed}: {time.perf_counter() - started:.0f}s", flush=True)

    if not args.report_only:
        print(
            f"parity: {len(jobs)} runs of {args.steps} steps, {args.jobs} at a time, {args.threads} thread(s) each",
            flush=True,
        )
        with common.PrefectServer(args.out / "prefect-home"), ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(launch, jobs))

    curves = {
        side: [json.loads((args.out / f"{side}-{s}.json").read_text())["reward"] for s in args.seeds]
        for side in ("grpoflow", "trl")
    }
    walls = {
        side: [json.loads((args.out / f"{side}-{s}.json").read_text())["wall_seconds"] for s in args.seeds]
        for side in ("grpoflow", "trl")
    }
    rows = agreement(curves, block=10)
    print(
        "\nmean reward per block of 10 steps (mean of the seeds; 95% interval of the difference from the between-seed "
        "spread)"
    )
    print(f"{'steps':>8} {'grpoflow':>9} {'trl':>7} {'diff':>7} {'+-95%':>7}  within  grpoflow in TRL's seed range")
    for r in rows:
        print(
            f"{r['steps']:>8} {r['grpoflow']:9.3f} {r['trl']:7.3f} {r['diff']:+7.3f} {r['ci95']:7.3f}  "
            f"{'yes' if r['within'] else 'NO':6s}  {'yes' if r['in_trl_seed_range'] else 'no'}"
        )
    overall = {side: [statistics.fmean(c) for c in runs] for side, runs in curves.items()}
    print("\nmean reward over all steps, per seed:")
    for side, vals in overall.items():
        print(f"  {side:9s} " + "  ".join(f"{v:.3f}" for v in vals) + f"   (mean {statistics.fmean(vals):.3f})")
    print(
        f"blocks whose difference is within its 95% interval: {sum(r['within'] for r in rows)}/{len(rows)}; blocks "
        f"where grpoflow's mean lies in TRL's seed range: {sum(r['in_trl_seed_range'] for r in rows)}/{len(rows)}"
    )
    print("wall seconds per run: " + ", ".join(f"{s} {statistics.fmean(v):.0f}" for s, v in walls.items()))
    title = (
        f"grpoflow vs TRL GRPOTrainer: tiny model, 2-digit addition, {args.prompts}x{args.group_size}, lr {args.lr:g}, "
        f"beta {args.beta:g}, loss grpo, seeds {' '.join(map(str, args.seeds))}"
    )
    plot(curves, args.png, title)
    (args.out / "summary.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "blocks": rows,
                "overall": overall,
                "walls": walls,
                "machine": machine_info(),
            },
            indent=2,
        )
    )
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
