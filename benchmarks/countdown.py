"""GRPO on a task whose verifier accepts many answers and whose data holds no solution:
countdown (data/countdown.py, rewards/countdown.py).

1. A tiny char-level model (same architecture as the demo's) gets a *format-only* warm-up:
   prompts "a b c:T=" followed by a random expression over a, b, c, where T is drawn at
   random and is unrelated to the expression. The model learns the syntax and to use the
   given numbers; it is never shown an expression that reaches its target.
2. `grpo run` with the countdown reward alone, held-out success (greedy, 500 problems never
   trained on) before, during and after.

    python benchmarks/countdown.py --iterations 150
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import common  # sets the offline/quiet environment and sys.path
from common import ROOT, machine_info

CHARS = "0123456789+-*/()=: "


def random_expression(numbers: list[int], rng: random.Random) -> str:
    a, b, c = rng.sample(numbers, 3)
    o1, o2 = rng.choice("+-*"), rng.choice("+-*")
    return rng.choice([f"{a}{o1}{b}{o2}{c}", f"({a}{o1}{b}){o2}{c}", f"{a}{o1}({b}{o2}{c})"])


def format_warmup(folder: Path, steps: int, batch_size: int, lr: float, seed: int) -> Path:
    import torch

    from data import countdown
    from tasks.model import LivePolicy, save_checkpoint
    from tasks.tiny_model import build_model, build_tokenizer

    if (folder / "config.json").exists():
        return folder
    rng = random.Random(seed)
    tok = build_tokenizer(CHARS)
    model = build_model(len(tok), seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _step in range(steps):
        ids, labels = [], []
        for _ in range(batch_size):
            numbers = [rng.randint(countdown.LOW, countdown.HIGH) for _ in range(countdown.COUNT)]
            target = rng.randint(countdown.TARGET_LOW, countdown.TARGET_HIGH)  # unrelated to the expression
            prompt = tok.encode(f"{' '.join(map(str, numbers))}:{target}=")
            answer = tok.encode(random_expression(numbers, rng)) + [tok.eos_token_id]
            ids.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(map(len, ids))
        batch = {
            "input_ids": torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
        }
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    save_checkpoint(LivePolicy(model, tok), folder)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "countdown")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "countdown_curve.png")
    p.add_argument(
        "--report-run",
        type=Path,
        help="summarise and plot an existing (possibly unfinished) run folder instead of training",
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from data import countdown

    train = args.out / "train.jsonl"
    held = args.out / "heldout.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in countdown.problems(5_000, args.seed)))
    held.write_text("".join(json.dumps(r) + "\n" for r in countdown.problems(500, 0, held_out=True)))
    started = time.perf_counter()
    model = format_warmup(
        args.out / f"model-format-{args.warmup_steps}-{args.seed}", args.warmup_steps, 128, 1e-3, args.seed
    )
    print(f"format-only warm-up: {time.perf_counter() - started:.0f}s", flush=True)
    if args.report_run:
        run_dir, seconds = args.report_run, None
    else:
        run_dir = args.out / f"run-{args.seed}-{int(time.time())}"
        cmd = [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            "--model",
            str(model),
            "--dataset",
            str(train),
            "--eval-dataset",
            str(held),
            "--task",
            "countdown",
            "--rewards",
            json.dumps({"countdown": 1.0}),
            "--max-new-tokens",
            "12",
            "--iterations",
            str(args.iterations),
            "--learning-rate",
            str(args.lr),
            "--eval-every",
            "10",
            "--seed",
            str(args.seed),
            "--run-dir",
            str(run_dir),
        ]
        started = time.perf_counter()
        with common.PrefectServer(args.out / "prefect-home"):  # not the shared ~/.prefect database
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
    metrics = [json.loads(f.read_text()) for f in sorted(run_dir.glob("iter-*/metrics.json"))]
    curve = [(m["iteration"], m["held_out_accuracy"]) for m in metrics if "held_out_accuracy" in m]
    rewards = [(m["iteration"], m["reward"]) for m in metrics if "reward" in m]
    print(
        f"grpo run: {len(rewards)} iterations"
        + (f", {seconds:.0f}s" if seconds else " (report of a run folder)")
        + f"; held-out success {curve[0][1]:.1%} -> {curve[-1][1]:.1%}"
    )
    print("held-out success by iteration: " + ", ".join(f"{i}: {a:.1%}" for i, a in curve))
    first, last = rewards[:10], rewards[-10:]
    print(
        f"training batch success: first 10 iterations {sum(r for _, r in first) / len(first):.1%}, last 10 "
        f"{sum(r for _, r in last) / len(last):.1%}"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(
        [i for i, _ in rewards],
        [100 * r for _, r in rewards],
        color="tab:blue",
        alpha=0.3,
        lw=0.8,
        label="training batch success (sampled)",
    )
    ax.plot(
        [i for i, _ in curve],
        [100 * a for _, a in curve],
        "-o",
        color="tab:blue",
        ms=3,
        label="held-out success, greedy (500 problems)",
    )
    ax.set_xlabel("GRPO iteration")
    ax.set_ylabel("success rate (%)")
    ax.set_title(
        "Countdown with a verifier only (no solutions anywhere): tiny model after a format-only warm-up", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=120)
    (args.out / "summary.json").write_text(
        json.dumps(
            {
                "machine": machine_info(),
                "load_after": os.getloadavg(),
                "args": {k: str(v) for k, v in vars(args).items()},
                "seconds": seconds,
                "held_out": curve,
                "rewards": rewards,
                "run_dir": str(run_dir),
            },
            indent=2,
        )
    )
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
