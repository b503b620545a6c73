"""Does a pretrained model learn? SmolLM2-135M-Instruct on reasoning-gym's `gcd`, trained with
the vLLM engine and a verifiable reward only (no gold completions), greedy accuracy on
held-out problems never trained on.

    python benchmarks/gcd.py --minutes 60            # under: flock /tmp/grpoflow-bench.lock

Data: reasoning-gym generates the problems offline ("Find the Greatest Common Divisor (GCD) of
these numbers: 780, 461. Give only the GCD as your final answer."); they are written as
TRL-layout JSONL rows (prompt + answer, task math) that the ingest stage reads. Held-out
problems are drawn with another seed, and any whose pair of numbers also occurs in the
training file is dropped. Reward: the registered `math` reward (the completion's last
number, \\boxed{} or "the answer is" compared by value with the gold), weight 1.

Small answers dominate reasoning-gym's gcd problems (measured in the files this script writes:
training 32% gcd 2, 21% gcd 1, 13% gcd 3; held-out 41% / 21% / 13%), so "always answer 2" scores
41% held-out without computing anything. The split evaluation after the run scores the base
model and the last checkpoint by gold answer (1, 2, 3 or more), with the share of answers that
are 1 and 2 and the constant-answer baseline, so that a learned shortcut is not mistaken for
learning gcd.

Writes benchmarks/out/gcd/summary.json and docs/gcd_curve.png (reward per iteration and
held-out accuracy against wall minutes, one PNG).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: F401  (sets the offline/quiet environment and sys.path)
from common import ROOT, machine_info

OUT = ROOT / "benchmarks" / "out" / "gcd"


def gcd_rows(size: int, seed: int) -> list[dict]:
    import reasoning_gym

    return [
        {
            "prompt": x["question"],
            "answer": str(x["answer"]),
            "task": "math",
            "numbers": sorted(x["metadata"]["numbers"]),
        }
        for x in reasoning_gym.create_dataset("gcd", size=size, seed=seed)
    ]


def write_gcd_jsonl(
    train_path: Path, held_path: Path, train_size: int, held_size: int, seed: int = 0
) -> tuple[Path, Path]:
    """Training and held-out JSONL files (prompt, answer, task); no pair of numbers in both."""
    train = gcd_rows(train_size, seed)
    seen = {tuple(r["numbers"]) for r in train}
    held = [r for r in gcd_rows(held_size * 2, seed + 1_000_003) if tuple(r["numbers"]) not in seen][:held_size]
    for path, rows in ((train_path, train), (held_path, held)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "answer", "task")}) + "\n" for r in rows))
    return train_path, held_path


RECIPE = {
    # What got there (benchmarks/RESULTS.md has what did not): vLLM samples, the update is fp32 on
    # CPU; no KL (beta 0 loads no reference model); one on-policy step per iteration.
    # 128 held-out problems: at 64 the standard error of an accuracy is ~6 points, too close to
    # the +10 target to tell learning from noise.
    # 64 new tokens: the model's step-by-step answers mostly do not fit, so the reward also
    # teaches it to answer briefly. Temperature 0.7: at 1.0 the 135M model's samples were
    # mostly incoherent (sampled reward 0-3% over the first iterations, most groups without
    # spread); 8 prompts x 8 because groups without spread cost only their generation (the
    # update skips them). Gradient checkpointing off: the update peaks ~5.6 GiB of 24 without
    # it, and it is ~30% faster.
    "generation_engine": "vllm",
    "rewards": {"math": 1.0},
    "prompts_per_iteration": 8,
    "group_size": 8,
    "max_new_tokens": 64,
    "temperature": 0.7,
    "learning_rate": 1e-5,
    "beta": 0.0,
    "micro_batch_size": 8,
    "loss_aggregation": "dapo",
    "gradient_checkpointing": False,
    "eval_every": 3,
    "eval_size": 128,
    "save_every": 3,
    "dtype": "float32",
    "device": "cpu",
    "score_workers": 1,
}


def held_out_split(model_dir: str, held: Path, max_new_tokens: int) -> dict:
    """Greedy accuracy of `model_dir` on the held-out file, split by the gold answer (1, 2,
    3 or more), the share of answers that are 1 and 2, and what always answering the most
    common gcd would score: the shortcuts a policy can learn instead of computing a gcd."""
    from collections import Counter

    from data.sources import normalise_row, read_source
    from rewards import make_reward
    from tasks.engines import SamplingSettings, engine_for
    from tasks.generate import render_prompt
    from tasks.model import live_policy

    rows = [normalise_row(r, data_source=str(held), row=i) for i, r in read_source(str(held))]
    policy = live_policy(model_dir, "cpu", "float32")
    ids = [
        policy.tokenizer(render_prompt(r, policy.tokenizer, True), add_special_tokens=False)["input_ids"] for r in rows
    ]
    samples = engine_for("vllm", model_dir, policy).sample(
        ids, 1, SamplingSettings(max_new_tokens=max_new_tokens, greedy=True, with_logprobs=False)
    )
    texts = policy.tokenizer.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
    reward = make_reward("math", None)
    solved = [reward(t, r) >= 1.0 for t, r in zip(texts, rows, strict=True)]
    last = [(re.findall(r"-?\d+", t) or [None])[-1] for t in texts]
    classes = {"gcd_1": lambda a: a == "1", "gcd_2": lambda a: a == "2", "gcd_3_or_more": lambda a: a not in ("1", "2")}
    split = {}
    for name, member in classes.items():
        chosen = [i for i, r in enumerate(rows) if member(r["answer"])]
        split[f"accuracy_{name}"] = sum(solved[i] for i in chosen) / max(len(chosen), 1)
        split[f"share_{name}"] = len(chosen) / len(rows)
    ((common_answer, count),) = Counter(r["answer"] for r in rows).most_common(1)
    return {
        "accuracy": sum(solved) / len(rows),
        **split,
        "problems": len(rows),
        "answers_1": sum(x == "1" for x in last) / len(rows),
        "answers_2": sum(x == "2" for x in last) / len(rows),
        "distinct_answers": len(set(last)),
        f"constant_answer_{common_answer}_accuracy": count / len(rows),
        "mean_completion_tokens": sum(len(s.completion_ids) for s in samples) / len(samples),
    }


def plot(points: list[dict], path: Path, title: str, constant: tuple[str, float] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rew = [(p["minutes"], p["reward"]) for p in points if p.get("reward") is not None]
    acc = [(p["minutes"], p["held_out_accuracy"]) for p in points if p.get("held_out_accuracy") is not None]
    ax.plot(
        [m for m, _ in rew],
        [r for _, r in rew],
        "o-",
        color="tab:blue",
        alpha=0.6,
        label="training reward (mean of the iteration's samples)",
    )
    ax.plot([m for m, _ in acc], [a for _, a in acc], "s-", color="tab:red", lw=2, label="held-out greedy accuracy")
    if constant is not None:  # what answering the most common gcd every time scores
        ax.axhline(constant[1], color="grey", ls="--", lw=1, label=f"always answering {constant[0]} (held-out)")
    ax.set_xlabel("wall minutes (generation, scoring, update and evaluations, 2 shared CPU cores)")
    ax.set_ylabel("fraction correct")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60, help="wall budget: no iteration starts after it")
    p.add_argument("--end-by", default=None, help="HH:MM (machine clock): the wall budget ends then at the latest")
    p.add_argument(
        "--iterations", type=int, default=200, help="upper bound; the wall budget usually stops the run first"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], help="recipe overrides, key=JSON value")
    p.add_argument("--run-dir", type=Path, default=None)
    p.add_argument("--skip-split", action="store_true", help="no before/after split evaluation")
    p.add_argument(
        "--split-only",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="only the split evaluation of the base model and RUN_DIR's last checkpoint, into its summary",
    )
    p.add_argument(
        "--started", type=float, default=None, help="with --split-only: when the run started (epoch seconds)"
    )
    a = p.parse_args()
    from smollm2 import smollm2_hf_folder

    model = smollm2_hf_folder(ROOT / "benchmarks" / "out" / "smollm2-135m-instruct")
    train, held = write_gcd_jsonl(OUT / "gcd-train.jsonl", OUT / "gcd-held.jsonl", 4000, 128)
    recipe = RECIPE | {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    if a.split_only:
        summary = json.loads((OUT / "summary.json").read_text()) if (OUT / "summary.json").exists() else {}
        if summary.get("run_dir") != str(
            a.split_only
        ):  # the run's own summary was not written (the driver was stopped)
            if a.started is None:
                raise SystemExit(
                    f"{OUT / 'summary.json'} is not {a.split_only}'s: give --started (the run's start, epoch seconds)"
                )
            finished = max(m.stat().st_mtime for m in a.split_only.glob("iter-*/metrics.json"))
            summary = summarise(a.split_only, a.started, finished - a.started, recipe, a.seed, [None, None, None])
        summary["split"] = split_evaluation(str(model), a.split_only, held, recipe["max_new_tokens"])
        (OUT / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        plot_summary(summary, held)
        print(json.dumps(summary["split"], indent=2))
        return
    run_dir = a.run_dir or OUT / f"run-seed{a.seed}-{time.strftime('%H%M')}"
    config = recipe | {
        "run_dir": str(run_dir),
        "model": str(model),
        "dataset": str(train),
        "eval_dataset": str(held),
        "seed": a.seed,
        "iterations": a.iterations,
    }
    args = ["run"]
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):  # argparse's BooleanOptionalAction: --x / --no-x
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    load_before = os.getloadavg()
    started = time.time()
    # The flow runs in a child process, stopped (SIGTERM) once the wall budget is spent: the
    # iterations it finished are in the run folder (checkpoints every eval_every iterations,
    # so the last evaluated policy is on disk for the split evaluation).
    # Prefect's temporary API gets 20 s to start by default: not enough on these cores under load.
    env = os.environ | {"GRPOFLOW_PROGRESS": "0", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    child = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env)
    deadline = started + a.minutes * 60
    if a.end_by:
        hour, minute = map(int, a.end_by.split(":"))
        now = time.localtime(started)
        deadline = min(deadline, time.mktime(now[:3] + (hour, minute, 0) + now[6:]))
    while child.poll() is None and time.time() < deadline:
        time.sleep(5)
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
    wall = time.time() - started
    summary = summarise(run_dir, started, wall, recipe, a.seed, load_before)
    accs = [p for p in summary["points"] if p.get("held_out_accuracy") is not None]
    if accs and len(accs) > 1:
        plot_summary(summary, held)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("points", "machine")}, indent=2, default=str))
    if not a.skip_split:
        summary["split"] = split_evaluation(str(model), run_dir, held, recipe["max_new_tokens"])
        (OUT / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(json.dumps(summary["split"], indent=2))


def summarise(run_dir: Path, started: float, wall: float, recipe: dict, seed: int, load_before) -> dict:
    """The run folder's per-iteration metrics as points against wall minutes from `started`."""
    points = []
    for m in sorted(run_dir.glob("iter-*/metrics.json")):
        metrics = json.loads(m.read_text())
        points.append(
            {
                "iteration": metrics["iteration"],
                "minutes": (m.stat().st_mtime - started) / 60,
                "reward": metrics.get("reward"),
                "held_out_accuracy": metrics.get("held_out_accuracy"),
                **{
                    k: v
                    for k, v in metrics.items()
                    if k.startswith("sampling/") or k in ("step_time", "completions/mean_length")
                },
            }
        )
    accs = [p for p in points if p.get("held_out_accuracy") is not None]
    return {
        "recipe": recipe,
        "seed": seed,
        "wall_minutes": wall / 60,
        "iterations_done": len(points) - 1,
        "points": points,
        "before": accs[0]["held_out_accuracy"] if accs else None,
        "after": accs[-1]["held_out_accuracy"] if accs else None,
        "best": max((p["held_out_accuracy"] for p in accs), default=None),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "machine": machine_info(),
        "run_dir": str(run_dir),
    }


def plot_summary(summary: dict, held: Path) -> None:
    load = (
        ""
        if summary["load_before"][0] is None
        else f" (load {summary['load_before'][0]:.1f}-{summary['load_after'][0]:.1f})"
    )
    title = (
        f"SmolLM2-135M-Instruct, reasoning-gym gcd, vLLM engine, seed {summary['seed']}: held-out "
        f"{summary['before']:.1%} -> {summary['after']:.1%} in {summary['wall_minutes']:.0f} min{load}"
    )
    plot(summary["points"], ROOT / "docs" / "gcd_curve.png", title, constant_answer(held))


def constant_answer(held: Path) -> tuple[str, float]:
    """The held-out file's most common gold answer and the accuracy of always giving it."""
    from collections import Counter

    answers = [json.loads(line)["answer"] for line in held.read_text().splitlines() if line.strip()]
    ((answer, count),) = Counter(answers).most_common(1)
    return answer, count / len(answers)


def split_evaluation(model: str, run_dir: Path, held: Path, max_new_tokens: int) -> dict:
    """`held_out_split` of the base model and of the run's last checkpoint."""
    split = {"before": held_out_split(model, held, max_new_tokens)}
    last = (
        [run_dir / "final"]
        if (run_dir / "final" / "config.json").exists()
        else sorted(run_dir.glob("iter-*/checkpoint"))[-1:]
    )
    if last:  # the run's final model, else (a stopped run) its newest checkpoint
        split["after"] = held_out_split(str(last[-1]), held, max_new_tokens) | {"checkpoint": str(last[-1])}
    return split


if __name__ == "__main__":
    main()
