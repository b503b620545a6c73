"""Does the vLLM engine train the tiny default task as well as the HF engine? The default
`grpo run` (built-in tiny model, 2-digit addition, reward only) with `--generation-engine hf`
and `vllm`, same seeds, held-out greedy accuracy every few iterations; the vLLM curve should
lie within the HF seeds' spread.

    python benchmarks/engine_curves.py --seeds 0 1 2 --iterations 30      # needs make install-vllm

Runs are sequential, in the order hf/seed 0, vllm/seed 0, hf/seed 1, ... so both engines see
the same machine load. Each is a `grpo run` child process in its own run folder under --out;
a folder that already finished is read, not run again. Held-out evaluation uses the run's own
engine (the default, `--eval-engine` unset), so the curves compare sampling and evaluation
together. Writes <out>/summary.json and docs/engine_curves.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: F401  (sets the offline/quiet environment and sys.path)
from common import ROOT, machine_info

ENGINES = ("hf", "vllm")


def held_out_curve(run_dir: Path) -> dict[int, float]:
    """iteration -> held-out accuracy, from the run folder's per-iteration metrics."""
    curve = {}
    for path in sorted(run_dir.glob("iter-*/metrics.json")):
        metrics = json.loads(path.read_text())
        if metrics.get("held_out_accuracy") is not None:
            curve[metrics["iteration"]] = metrics["held_out_accuracy"]
    return curve


def run(engine: str, seed: int, a: argparse.Namespace) -> dict:
    run_dir = a.out / f"{engine}-seed{seed}"
    started = time.time()
    if not (run_dir / "final" / "config.json").exists():
        args = [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            "--run-dir",
            str(run_dir),
            "--seed",
            str(seed),
            "--generation-engine",
            engine,
            "--iterations",
            str(a.iterations),
            "--eval-every",
            str(a.eval_every),
            "--eval-size",
            str(a.eval_size),
        ]
        subprocess.run(
            args,
            cwd=ROOT,
            check=True,
            env=os.environ | {"GRPOFLOW_PROGRESS": "0"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL if not a.verbose else None,
        )
    return {"engine": engine, "seed": seed, "curve": held_out_curve(run_dir), "wall_s": time.time() - started}


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        its = sorted(r["curve"])
        ax.plot(
            its,
            [r["curve"][i] for i in its],
            "o-" if r["engine"] == "hf" else "s--",
            alpha=0.8,
            color="tab:blue" if r["engine"] == "hf" else "tab:red",
            label=f"{r['engine']} seed {r['seed']}",
        )
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out greedy accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("tiny default task: HF engine vs vLLM engine, same seeds", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-size", type=int, default=200, help="held-out problems per evaluation")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "engine_curves")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "engine_curves.png")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    runs = [run(engine, seed, a) for seed in a.seeds for engine in ENGINES]
    points = sorted(set.intersection(*(set(r["curve"]) for r in runs)))
    print(
        f"tiny default task, {len(a.seeds)} seeds, {a.iterations} iterations, {a.eval_size} held-out problems every "
        f"{a.eval_every}; load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(
        "iteration  " + "  ".join(f"{e}: mean (min-max)".ljust(26) for e in ENGINES) + "  vLLM mean within HF's range"
    )
    inside = []
    for it in points:
        stats = {e: [r["curve"][it] for r in runs if r["engine"] == e] for e in ENGINES}
        ok = min(stats["hf"]) <= statistics.mean(stats["vllm"]) <= max(stats["hf"])
        inside.append(ok)
        print(
            f"{it:9d}  "
            + "  ".join(f"{statistics.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})".ljust(26) for v in stats.values())
            + f"  {'yes' if ok else 'no'}"
        )
    for e in ENGINES:
        walls = [r["wall_s"] for r in runs if r["engine"] == e]
        print(f"{e}: wall per run {statistics.median(walls):.0f} s (median of {len(walls)})")
    summary = {
        "args": {k: str(v) for k, v in vars(a).items()},
        "runs": runs,
        "within_hf_range": inside,
        "machine": machine_info(),
    }
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(runs, a.png)


if __name__ == "__main__":
    main()
