"""Does GRPO learn? The default `grpo run` (built-in tiny model, 2-digit addition, reward
only) for several seeds, each from a cold cache so the supervised warm-up is timed too;
held-out greedy accuracy (500 problems never trained on) before and after; and an SFT
control: from the same warmed-up model, supervised training on the gold answers for the
same wall time as the GRPO phase.

    python benchmarks/learning.py --seeds 0 1 2

Writes benchmarks/out/learning/summary.json and docs/learning_curve.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (sets the offline/quiet environment and sys.path)
from common import ROOT, machine_info

PYTHON = sys.executable


def grpo_run(seed: int, out: Path, extra: list[str]) -> dict:
    """`grpo run` with its defaults (and `extra` flags), in a cold model cache; returns the
    held-out accuracy curve against seconds since GRPO started."""
    run_dir = out / f"grpo-seed{seed}"
    cache = Path(tempfile.mkdtemp(prefix=f"grpoflow-cache-{seed}-"))
    env = {**os.environ, "GRPOFLOW_CACHE": str(cache)}
    started = time.perf_counter()
    subprocess.run([PYTHON, "-m", "flows.cli", "run", "--seed", str(seed), "--run-dir", str(run_dir), *extra], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    total = time.perf_counter() - started
    model_dir = next((cache / "models").iterdir())
    iters = sorted(run_dir.glob("iter-*/metrics.json"))
    metrics = [json.loads(p.read_text()) for p in iters]
    curve, clock = [], 0.0
    for m in metrics:
        clock += m.get("step_time", 0.0)
        if "held_out_accuracy" in m:
            curve.append({"iteration": m["iteration"], "seconds": clock, "accuracy": m["held_out_accuracy"], "reward": m.get("reward")})
    warmup = json.loads((model_dir / "warmup.json").read_text())
    return {"seed": seed, "total_seconds": total, "grpo_seconds": clock, "model_dir": str(model_dir), "warmup": warmup, "curve": curve,
            "before": curve[0]["accuracy"], "after": curve[-1]["accuracy"], "rewards": [m.get("reward") for m in metrics if m["iteration"] > 0]}


def sft_control(model_dir: str, seconds: float, seed: int, threads: int, lr: float, batch_size: int, eval_every: int) -> dict:
    """Supervised training on gold answers from the warmed-up model for `seconds` of wall
    time (held-out evaluations included in the budget, as in the GRPO phase)."""
    import torch

    from data import builtin
    from rewards.arithmetic import exact_answer
    from tasks.generate import sample
    from tasks.model import load_model, load_tokenizer
    from tasks.tiny_model import _sft_batch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = load_model(model_dir, torch.device("cpu"), torch.float32)
    tok = load_tokenizer(model_dir)
    held = builtin.held_out_problems()
    held_ids = [tok.encode(p["prompt"]) for p in held]

    def accuracy() -> float:
        samples = sample(model, tok, held_ids, 1, 8, 1.0, 1.0, 256, greedy=True, desc="evaluate")
        texts = tok.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
        return sum(exact_answer(t, p) for t, p in zip(texts, held)) / len(held)

    # Fresh problems (a different stream from the warm-up's), never held-out ones.
    problems = builtin.train_problems(200_000, seed + 1_000_003)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    curve = [{"step": 0, "seconds": 0.0, "accuracy": accuracy()}]
    started, step = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        model.train()
        batch = _sft_batch(tok, problems[(step * batch_size) % len(problems) :][:batch_size])
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        step += 1
        if step % eval_every == 0:
            curve.append({"step": step, "seconds": time.perf_counter() - started, "accuracy": accuracy()})
    if curve[-1]["step"] != step:
        curve.append({"step": step, "seconds": time.perf_counter() - started, "accuracy": accuracy()})
    return {"seed": seed, "steps": step, "seconds": time.perf_counter() - started, "curve": curve, "before": curve[0]["accuracy"], "after": curve[-1]["accuracy"]}


def plot(grpo: list[dict], sft: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, r in enumerate(grpo):
        ax.plot([p["seconds"] for p in r["curve"]], [100 * p["accuracy"] for p in r["curve"]], "-o", ms=3, color="tab:blue",
                alpha=0.85, label="GRPO, reward only (grpo run defaults)" if k == 0 else None)
    for k, r in enumerate(sft):
        ax.plot([p["seconds"] for p in r["curve"]], [100 * p["accuracy"] for p in r["curve"]], "--", color="tab:gray",
                alpha=0.85, label="SFT control on gold answers, same wall time" if k == 0 else None)
    ax.set_xlabel("seconds after the supervised warm-up (2 CPU cores)")
    ax.set_ylabel("held-out greedy accuracy, 500 problems (%)")
    ax.set_title(f"Tiny model (1M params), 2-digit addition: {len(grpo)} seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2, help="torch threads of the SFT control (grpo run uses torch's default: all cores)")
    p.add_argument("--sft-lr", type=float, default=1e-3, help="the warm-up recipe's learning rate")
    p.add_argument("--sft-batch", type=int, default=128, help="the warm-up recipe's batch size")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "learning")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "learning_curve.png")
    p.add_argument("--grpo-args", default="", help="extra flags for grpo run, e.g. '--iterations 50'")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    info = machine_info()
    grpo, sft = [], []
    for seed in args.seeds:
        r = grpo_run(seed, args.out, args.grpo_args.split())
        grpo.append(r)
        print(f"seed {seed}: grpo run {r['total_seconds']:.0f}s in all (GRPO phase {r['grpo_seconds']:.0f}s): "
              f"held-out {r['before']:.1%} -> {r['after']:.1%} ({100 * (r['after'] - r['before']):+.1f} points)", flush=True)
        s = sft_control(r["model_dir"], r["grpo_seconds"], seed, args.threads, args.sft_lr, args.sft_batch, eval_every=25)
        sft.append(s)
        print(f"seed {seed}: SFT control {s['steps']} steps in {s['seconds']:.0f}s: held-out {s['before']:.1%} -> {s['after']:.1%}", flush=True)

    gains = [r["after"] - r["before"] for r in grpo]
    print(f"\nGRPO gain: mean {100 * statistics.fmean(gains):+.1f} points over {len(gains)} seeds "
          f"({', '.join(f'{100 * g:+.1f}' for g in gains)}); run time " + ", ".join(f"{r['total_seconds']:.0f}s" for r in grpo))
    print("SFT control after the same time: " + ", ".join(f"{s['after']:.1%}" for s in sft))
    plot(grpo, sft, args.png)
    (args.out / "summary.json").write_text(json.dumps({"machine": info, "load_after": os.getloadavg(), "grpo": grpo, "sft": sft}, indent=2))
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
