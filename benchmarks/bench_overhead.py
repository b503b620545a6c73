"""Where a grpoflow iteration's time goes beyond the model work: Prefect (task runs, the API),
manifests and metrics files, Parquet reads and writes, checkpoint writes and model loads.
At the tiny size and at the real-model size (SmolLM2-135M on gsm_symbolic prompts).

    python benchmarks/bench_overhead.py --model tiny
    python benchmarks/bench_overhead.py --model smollm2 --per-round 2 --save-every 1000

The flow runs for real (`grpo_train`, one process, one Prefect API server for the benchmark);
benchmarks/instrument.py times the stage functions and their parts. Shares are of the median
iteration. "orchestration" is the iteration's wall time outside every stage function; the
first iteration of each process (model load, first-call warm-ups) is reported apart.
Checkpoints: every `--save-every` iterations and after the last; the last iteration of each
process therefore writes one, and its cost is reported on its own line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import bench_iteration
import common  # sets the offline/quiet environment and sys.path
from common import ROOT, machine_info

OVERHEAD = ["orchestration", "manifest", "parquet_io", "checkpoint_write", "model_load"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny or smollm2")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--per-round", type=int, default=5, help="iterations per process after the first")
    p.add_argument("--save-every", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--reward", default=None)
    p.add_argument("--task", default=None)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--scratch", type=Path, default=None)
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args()
    a.scratch = a.scratch or ROOT / "benchmarks" / "out" / f"overhead-{a.model}"
    bench_iteration.prepare(a)

    records, firsts, rss = [], [], []
    with common.PrefectServer(a.scratch / "prefect-home") as server:
        for r in range(a.rounds):
            started = time.perf_counter()
            res = bench_iteration.run_worker("grpoflow", a, a.beta)
            firsts.append(res["records"][0])
            records.extend(res["records"][1:])
            rss.append(res["peak_rss_mib"])
            print(
                f"  round {r + 1}: {len(res['records'])} iterations, walls "
                + ", ".join(f"{x['wall']:.2f}" for x in res["records"])
                + f"s ({time.perf_counter() - started:.0f}s with start-up)",
                flush=True,
            )
        server_rss = server.rss_mib()

    # Iterations that wrote a checkpoint versus those that did not.
    with_ckpt = [x for x in records if x["timers"].get("checkpoint_write", 0) > 0]
    without = [x for x in records if x["timers"].get("checkpoint_write", 0) == 0]
    print(
        f"\noverhead benchmark: model {a.model}, {a.prompts}x{a.group_size}, {a.max_new_tokens} new tokens, beta "
        f"{a.beta:g}, {a.threads} threads, save_every {a.save_every}; load {os.getloadavg()}"
    )
    report = {
        "machine": machine_info(),
        "args": {k: str(v) for k, v in vars(a).items()},
        "peak_rss_mib": max(rss),
        "prefect_server_rss_mib": server_rss,
    }
    for name, group in (
        ("iterations without a checkpoint write", without),
        ("iterations with a checkpoint write", with_ckpt),
    ):
        if not group:
            continue
        split = bench_iteration.stage_split(group)
        total = split["iteration"]
        overhead = sum(split.get(k, 0.0) for k in OVERHEAD)
        print(f"\n{name} (n={len(group)}): median {total:.3f}s")
        for k, v in split.items():
            if k != "iteration":
                print(f"  {k:20s} {v:8.3f}s {100 * v / total:6.1f}%")
        print(
            f"  => orchestration + I/O + checkpoints + model loads: {overhead:.3f}s = {100 * overhead / total:.1f}% of "
            "the iteration"
        )
        report[name] = {
            "split": split,
            "overhead_seconds": overhead,
            "overhead_share": overhead / total,
            "n": len(group),
        }
    first = bench_iteration.stage_split(firsts)
    print(
        f"\nfirst iteration of a process (policy load, warm-ups): median {first['iteration']:.3f}s, model_load "
        f"{first.get('model_load', 0):.3f}s"
    )
    print(f"peak RSS of the flow process {max(rss):.0f} MiB; Prefect API server {server_rss:.0f} MiB")
    report["first_iteration"] = first
    (a.scratch / "summary.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
