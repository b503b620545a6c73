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

About 61% of random pairs are coprime (6 / pi^2), so "always answer 1" is a strong shortcut:
after the run the base model and the final checkpoint are evaluated again on the held-out
set, split into gcd = 1 and gcd > 1, with the fraction of answers that are "1".

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

    return [{"prompt": x["question"], "answer": str(x["answer"]), "task": "math", "numbers": sorted(x["metadata"]["numbers"])}
            for x in reasoning_gym.create_dataset("gcd", size=size, seed=seed)]


def write_gcd_jsonl(train_path: Path, held_path: Path, train_size: int, held_size: int, seed: int = 0) -> tuple[Path, Path]:
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
    "generation_engine": "vllm", "rewards": {"math": 1.0}, "prompts_per_iteration": 8, "group_size": 8, "max_new_tokens": 64,
    "temperature": 0.7, "learning_rate": 1e-5, "beta": 0.0, "micro_batch_size": 8, "loss_aggregation": "dapo",
    "gradient_checkpointing": False,
    "eval_every": 3, "eval_size": 128, "save_every": 3, "dtype": "float32", "device": "cpu", "score_workers": 1,
}


def held_out_split(model_dir: str, held: Path, max_new_tokens: int) -> dict:
    """Greedy accuracy of `model_dir` on the held-out file, split by gcd = 1 / gcd > 1, and the
    fraction of answers that are 1 (the shortcut)."""
    from data.sources import normalise_row, read_source
    from rewards import make_reward
    from tasks.engines import SamplingSettings, engine_for
    from tasks.generate import render_prompt
    from tasks.model import live_policy

    rows = [normalise_row(r, data_source=str(held), row=i) for i, r in read_source(str(held))]
    policy = live_policy(model_dir, "cpu", "float32")
    ids = [policy.tokenizer(render_prompt(r, policy.tokenizer, True), add_special_tokens=False)["input_ids"] for r in rows]
    samples = engine_for("vllm", model_dir, policy).sample(ids, 1, SamplingSettings(max_new_tokens=max_new_tokens, greedy=True, with_logprobs=False))
    texts = policy.tokenizer.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
    reward = make_reward("math", None)
    solved = [reward(t, r) >= 1.0 for t, r in zip(texts, rows)]
    last = [re.findall(r"-?\d+", t) for t in texts]
    ones = [r for r in range(len(rows)) if rows[r]["answer"] == "1"]
    more = [r for r in range(len(rows)) if rows[r]["answer"] != "1"]
    return {
        "accuracy": sum(solved) / len(rows),
        "accuracy_gcd_1": sum(solved[i] for i in ones) / max(len(ones), 1),
        "accuracy_gcd_gt_1": sum(solved[i] for i in more) / max(len(more), 1),
        "problems": len(rows), "gcd_1_share": len(ones) / len(rows),
        "answers_1": sum(bool(x) and x[-1] == "1" for x in last) / len(rows),
        "mean_completion_tokens": sum(len(s.completion_ids) for s in samples) / len(samples),
    }


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rew = [(p["minutes"], p["reward"]) for p in points if p.get("reward") is not None]
    acc = [(p["minutes"], p["held_out_accuracy"]) for p in points if p.get("held_out_accuracy") is not None]
    ax.plot([m for m, _ in rew], [r for _, r in rew], "o-", color="tab:blue", alpha=0.6, label="training reward (mean of the iteration's samples)")
    ax.plot([m for m, _ in acc], [a for _, a in acc], "s-", color="tab:red", lw=2, label="held-out greedy accuracy")
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
    p.add_argument("--iterations", type=int, default=200, help="upper bound; the wall budget usually stops the run first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], help="recipe overrides, key=JSON value")
    p.add_argument("--run-dir", type=Path, default=None)
    p.add_argument("--skip-split", action="store_true", help="no before/after split evaluation")
    a = p.parse_args()
    from smollm2 import smollm2_hf_folder

    model = smollm2_hf_folder(ROOT / "benchmarks" / "out" / "smollm2-135m-instruct")
    train, held = write_gcd_jsonl(OUT / "gcd-train.jsonl", OUT / "gcd-held.jsonl", 4000, 128)
    recipe = RECIPE | {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    run_dir = a.run_dir or OUT / f"run-seed{a.seed}-{time.strftime('%H%M')}"
    config = recipe | {"run_dir": str(run_dir), "model": str(model), "dataset": str(train), "eval_dataset": str(held), "seed": a.seed,
                       "iterations": a.iterations}
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
    points = []
    for m in sorted(run_dir.glob("iter-*/metrics.json")):
        metrics = json.loads(m.read_text())
        points.append({"iteration": metrics["iteration"], "minutes": (m.stat().st_mtime - started) / 60, "reward": metrics.get("reward"),
                       "held_out_accuracy": metrics.get("held_out_accuracy"),
                       **{k: v for k, v in metrics.items() if k.startswith("sampling/") or k in ("step_time", "completions/mean_length")}})
    accs = [p for p in points if p.get("held_out_accuracy") is not None]
    summary = {"recipe": recipe, "seed": a.seed, "wall_minutes": wall / 60, "iterations_done": len(points) - 1, "points": points,
               "before": accs[0]["held_out_accuracy"] if accs else None, "after": accs[-1]["held_out_accuracy"] if accs else None,
               "best": max((p["held_out_accuracy"] for p in accs), default=None),
               "load_before": load_before, "load_after": os.getloadavg(), "machine": machine_info(), "run_dir": str(run_dir)}
    if accs and len(accs) > 1:
        title = (f"SmolLM2-135M-Instruct, reasoning-gym gcd, vLLM engine, seed {a.seed}: held-out {summary['before']:.1%} -> "
                 f"{summary['after']:.1%} in {wall / 60:.0f} min (load {load_before[0]:.1f}-{os.getloadavg()[0]:.1f})")
        plot(points, ROOT / "docs" / "gcd_curve.png", title)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("points", "machine")}, indent=2, default=str))
    if not a.skip_split:
        import glob

        last = sorted(glob.glob(str(run_dir / "iter-*" / "checkpoint")))
        split = {"before": held_out_split(str(model), held, recipe["max_new_tokens"])}
        if last:
            split["after"] = held_out_split(last[-1], held, recipe["max_new_tokens"])
        summary["split"] = split
        (OUT / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(json.dumps(split, indent=2))


if __name__ == "__main__":
    main()
