"""The update stage alone against the bare work it has to do, on a stored iteration of a real
run folder: is the update slower than forward + backward + AdamW, and by what?

    python benchmarks/bench_iteration.py --sides grpoflow --rounds 1     # leaves run folders in benchmarks/out/iteration
    python benchmarks/bench_update.py --run-dir benchmarks/out/iteration/bench-grpoflow-XXXX --iteration 3

Sides, interleaved rep by rep in this one process, same thread count (the first rep warms up):
  update        tasks.update.update_policy on the iteration's generations and advantages,
                checkpoint written (the stage as the flow runs it)
  update-nosave the same without writing the checkpoint (the flow's save_every > 1 iterations)
  bare          pack the same completions, one forward through the same log-prob function,
                mean log-prob backward, AdamW step: nothing read, nothing written
Each update continues from the weights the previous one left (the live policy), as in a run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (sets the offline/quiet environment and sys.path)
from common import fmt, set_threads, summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--run-dir", type=Path, required=True, help="a grpoflow run folder (e.g. one bench_iteration.py left)"
    )
    p.add_argument(
        "--iteration",
        type=int,
        default=3,
        help="its iteration whose artifacts are updated on (needs the previous checkpoint)",
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    set_threads(a.threads)
    import json

    import torch

    from data.schemas import GENERATIONS
    from data.store import read_table
    from flows.config import GRPOConfig
    from flows.settings import loss_settings
    from tasks.logprobs import completion_logprobs, pack
    from tasks.model import live_policy
    from tasks.update import update_policy

    it = a.run_dir / f"iter-{a.iteration:04d}"
    start = a.run_dir / f"iter-{a.iteration - 1:04d}" / "checkpoint"
    if not start.is_dir():
        raise SystemExit(f"{start}: no checkpoint to start from (choose an iteration whose previous one saved)")
    config = json.loads((a.run_dir / "config.json").read_text())["config"]
    loss = loss_settings(GRPOConfig.model_validate(config))
    scratch = Path(tempfile.mkdtemp(prefix="bench-update-"))
    rows = read_table(it / "generations.parquet", GENERATIONS).to_pylist()
    state = {"policy": str(start), "n": 0}

    def update(save: bool) -> float:
        out = scratch / f"ck{state['n']}"
        state["n"] += 1
        started = time.perf_counter()
        update_policy(
            str(it / "generations.parquet"),
            str(it / "advantages.parquet"),
            state["policy"],
            str(out),
            learning_rate=config["learning_rate"],
            loss=loss,
            micro_batch_size=config["micro_batch_size"],
            save=save,
            device="cpu",
            dtype="float32",
        )
        state["policy"] = str(out)
        return time.perf_counter() - started

    def bare() -> float:
        policy = live_policy(state["policy"])
        model, optimizer = policy.model, policy.optimizer
        started = time.perf_counter()
        model.train()
        batch = pack(
            [r["prompt_token_ids"] for r in rows],
            [r["completion_token_ids"] for r in rows],
            policy.tokenizer.pad_token_id,
            torch.device("cpu"),
        )
        logp = completion_logprobs(model, batch, 1.0)
        ((logp * batch.completion_mask).sum() / batch.completion_mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        return time.perf_counter() - started

    sides = {"update": lambda: update(True), "update-nosave": lambda: update(False), "bare": bare}
    seconds: dict[str, list[float]] = {k: [] for k in sides}
    for rep in range(a.reps + 1):
        for name, fn in sides.items():
            took = fn()
            if rep:  # rep 0 warms every path up
                seconds[name].append(took)
    tokens = sum(len(r["completion_token_ids"]) for r in rows)
    print(
        f"update benchmark: {it} ({len(rows)} completions, {tokens} completion tokens, micro-batch {config['micro_batch_size']}, "
        f"beta {config['beta']}), {a.threads} thread(s), {a.reps} interleaved reps (+1 warm-up)"
    )
    for name, values in seconds.items():
        print(f"  {name:14s} {fmt(summary(values), 's')}")
    for name in ("update", "update-nosave"):
        ratios = [x / y for x, y in zip(seconds[name], seconds["bare"])]
        print(f"  {name} / bare: median {statistics.median(ratios):.2f}x (per-rep {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
