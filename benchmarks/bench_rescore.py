"""Re-scoring throughput and memory: generations re-scored per second and peak RSS at
10k, 100k and 1M rows with the ``math`` reward.

For each size the script writes a synthetic iteration folder (prompts with integer gold
answers, G completions per prompt in the forms a math policy writes - ``\\boxed{}``,
``#### x``, "the answer is x", a bare last number, no number at all - half of them right,
with token-id and log-prob lists of realistic length, and an earlier ``rewards.parquet``
to compare with), then runs in a fresh process exactly what ``grpo rescore`` runs for an
iteration, minus Prefect: the score stage with the math reward (its worker pool), the
advantages stage, and the before/after comparison. A sampler in this process reads the
resident memory of that process and of its scoring workers every 50 ms.

Run: ``python benchmarks/bench_rescore.py [--sizes 10000,100000,1000000] [--repeat N]
[--workers N] [--group-size 8] [--keep DIR]``. Prints figures and the load average after
each run (and medians with ``--repeat``), asserts nothing. 1M rows take 9 to 15 minutes on
2 shared cores, depending on the load (most of it math-verify).
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
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.schemas import GENERATIONS, PROMPTS, REWARDS
from data.sources import normalise_row, prompts_table
from data.store import ParquetStreamWriter

WRITE_BATCH = 8192  # rows per synthetic write (the writer's own memory stays small too)


# --- synthetic data -----------------------------------------------------------------------------
def _completion(rng: np.random.Generator, gold: int, right: bool) -> str:
    value = gold if right else gold + int(rng.integers(1, 9))
    form = int(rng.integers(0, 5))
    steps = " ".join(
        f"Step {k}: we combine {int(rng.integers(2, 99))} and {int(rng.integers(2, 99))}."
        for k in range(1, int(rng.integers(2, 5)))
    )
    if form == 0:
        return f"{steps} So the result is $\\boxed{{{value}}}$."
    if form == 1:
        return f"{steps}\n#### {value:,}"
    if form == 2:
        return f"{steps} Therefore the answer is {value}."
    if form == 3:
        return f"{steps} That leaves {value}"
    return f"{steps} I am not sure how to finish this."


def _token_lists(rng: np.random.Generator, lengths: np.ndarray, vocab: int, dtype) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    if dtype == np.float32:
        values = pa.array(-rng.exponential(1.0, int(offsets[-1])).astype(np.float32))
    else:
        values = pa.array(rng.integers(0, vocab, int(offsets[-1])).astype(np.int32))
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def write_iteration(folder: Path, rows: int, group_size: int, seed: int = 0) -> None:
    """prompts.parquet, generations.parquet and an earlier rewards.parquet for `rows` rows."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n_prompts = rows // group_size
    golds = rng.integers(10, 100_000, n_prompts)
    with ParquetStreamWriter(folder / "prompts.parquet", PROMPTS) as out:
        for start in range(0, n_prompts, WRITE_BATCH):
            batch = [
                normalise_row(
                    {"prompt": f"Problem {i}: what is {int(g) - 7} plus 7?", "answer": str(int(g)), "task": "math"},
                    data_source="bench",
                    row=i,
                )
                for i, g in enumerate(golds[start : start + WRITE_BATCH], start)
            ]
            out.write(prompts_table(batch))
    prompt_ids = pq.read_table(folder / "prompts.parquet", columns=["prompt_id"]).column("prompt_id").to_pylist()
    names = ["reward/math", "error/math"]
    with (
        ParquetStreamWriter(folder / "generations.parquet", GENERATIONS) as gens,
        ParquetStreamWriter(folder / "rewards.parquet", REWARDS, REWARDS.with_family_columns(names)) as old,
    ):
        per_batch = max(WRITE_BATCH // group_size, 1)
        for first in range(0, n_prompts, per_batch):
            prompts = range(first, min(first + per_batch, n_prompts))
            right = rng.random(len(prompts) * group_size) < 0.5
            completions = [
                _completion(rng, int(golds[p]), bool(right[k * group_size + i]))
                for k, p in enumerate(prompts)
                for i in range(group_size)
            ]
            n = len(completions)
            lengths = np.array([max(len(c) // 3, 1) for c in completions])
            pid = [prompt_ids[p] for p in prompts for _ in range(group_size)]
            gens.write(
                pa.table(
                    {
                        "prompt_id": pid,
                        "sample_index": pa.array([i for _ in prompts for i in range(group_size)], pa.int32()),
                        "prompt_text": [
                            f"<|user|>Problem {p}<|assistant|>" for p in prompts for _ in range(group_size)
                        ],
                        "completion": completions,
                        "prompt_token_ids": _token_lists(rng, np.full(n, 40), 50_000, np.int32),
                        "completion_token_ids": _token_lists(rng, lengths, 50_000, np.int32),
                        "old_logprobs": _token_lists(rng, lengths, 0, np.float32),
                        "ref_logprobs": _token_lists(rng, lengths, 0, np.float32),
                        "finish_reason": ["eos"] * n,
                        "sampler_logprobs": pa.nulls(n, pa.list_(pa.float32())),
                    },
                    schema=GENERATIONS.schema,
                )
            )
            # The "previous scoring": right in 90% of the cases, so the comparison has changes to show.
            before = np.where(rng.random(n) < 0.9, right, ~right).astype(np.float64)
            old.write(
                pa.table(
                    {
                        "prompt_id": pid,
                        "sample_index": pa.array([i for _ in prompts for i in range(group_size)], pa.int32()),
                        "reward": before,
                        "reward/math": before,
                        "error/math": pa.nulls(n, pa.string()),
                    },
                    schema=old.schema,
                )
            )


# --- the measured process ----------------------------------------------------------------------
def child(folder: Path, workers: int | None, chunk_rows: int) -> None:
    """What `grpo rescore` does for one iteration, timed per stage; prints one JSON line
    with the process's own high-water mark after its imports and after scoring (the
    sampler's peak covers the advantages and the comparison too)."""
    from flows.rescore import compare_rewards
    from tasks.advantages import compute_advantages
    from tasks.score import score_generations

    def high_water_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    figures = {"imports_mb": high_water_mb()}
    started = time.perf_counter()
    score = score_generations(
        folder / "generations.parquet",
        folder / "prompts.parquet",
        folder / "rewards@bench.parquet",
        {"math": 1.0},
        workers=workers,
        chunk_rows=chunk_rows,
    )
    figures |= {"score_s": time.perf_counter() - started, "score_mb": high_water_mb()}
    t = time.perf_counter()
    compute_advantages(folder / "rewards@bench.parquet", folder / "advantages@bench.parquet")
    figures["advantages_s"] = time.perf_counter() - t
    t = time.perf_counter()
    comparison = compare_rewards(
        folder / "rewards.parquet", folder / "rewards@bench.parquet", folder / "generations.parquet"
    )
    figures["compare_s"] = time.perf_counter() - t
    figures["total_s"] = time.perf_counter() - started
    print(
        json.dumps(
            {
                **figures,
                "rows": score["rows"],
                "errored": score["errored"],
                "timeouts": score["timeouts"],
                "reward_mean": score["reward_mean"],
                "changed": comparison["changed"],
            }
        )
    )


def run_measured(folder: Path, workers: int | None, chunk_rows: int) -> dict:
    import psutil

    args = [sys.executable, __file__, "--child", str(folder), "--chunk-rows", str(chunk_rows)]
    if workers:
        args += ["--workers", str(workers)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    peaks = {"tree": 0, "main": 0, "worker": 0}
    done = threading.Event()

    def sample() -> None:
        # Sum of resident sets of the process and its scoring workers, every 50 ms.
        try:
            main = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    rss_main = main.memory_info().rss
                    workers_rss = [c.memory_info().rss for c in main.children(recursive=True)]
                except psutil.Error:
                    break
                peaks["main"] = max(peaks["main"], rss_main)
                peaks["worker"] = max([peaks["worker"], *workers_rss])
                peaks["tree"] = max(peaks["tree"], rss_main + sum(workers_rss))
                time.sleep(0.05)
        except psutil.NoSuchProcess:
            pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"the measured process failed ({proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    return result | {f"peak_{k}_mb": v / 2**20 for k, v in peaks.items()}


COLUMNS = [
    ("rows", 9, "{:>9}"),
    ("rows/s", 8, "{:>8.0f}"),
    ("score s", 8, "{:>8.1f}"),
    ("adv s", 6, "{:>6.1f}"),
    ("cmp s", 6, "{:>6.1f}"),
    ("wall s", 7, "{:>7.1f}"),
    ("peak RSS MB", 12, "{:>12.0f}"),
    ("main MB", 8, "{:>8.0f}"),
    ("imports", 8, "{:>8.0f}"),
    ("scoring", 8, "{:>8.0f}"),
    ("worker MB", 10, "{:>10.0f}"),
    ("changed", 8, "{:>8}"),
    ("timeouts", 8, "{:>8}"),
    ("load 1/5/15", 15, "{:>15}"),
]


def _line(values: list) -> str:
    return " ".join(fmt.format(v) for (_, _, fmt), v in zip(COLUMNS, values, strict=True))


def _figures(r: dict) -> list:
    return [
        r["rows"],
        r["rows"] / r["total_s"],
        r["score_s"],
        r["advantages_s"],
        r["compare_s"],
        r["wall_s"],
        r["peak_tree_mb"],
        r["peak_main_mb"],
        r["imports_mb"],
        r["score_mb"],
        r["peak_worker_mb"],
        r["changed"],
        r["timeouts"],
        r["load"],
    ]


def _median(column: tuple):
    if isinstance(column[0], int):
        return statistics.median_low(column)  # counts stay whole numbers
    return statistics.median(column) if isinstance(column[0], float) else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="rows (generations) per run, comma-separated")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per size; with more than one, medians are printed too"
    )
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="scoring workers (default: one per core)")
    parser.add_argument("--chunk-rows", type=int, default=4096, help="score stage chunk (its default)")
    parser.add_argument("--keep", type=Path, default=None, help="write the synthetic folders here and keep them")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.workers, args.chunk_rows)
        return

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-rescore-"))
    print(
        f"cores {os.cpu_count()}, Python {sys.version.split()[0]}, workers {args.workers or os.cpu_count()}, group "
        f"size {args.group_size}, load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())} before"
    )
    print(" ".join(f"{name:>{width}}" for name, width, _ in COLUMNS))
    runs: dict[int, list[dict]] = {}
    for rows in (int(s) for s in args.sizes.split(",")):
        folder = root / f"rows-{rows}"
        if not (folder / "rewards.parquet").exists():
            t = time.perf_counter()
            write_iteration(folder, rows, args.group_size)
            print(
                f"  (wrote {rows} synthetic rows in {time.perf_counter() - t:.0f}s, generations file "
                f"{(folder / 'generations.parquet').stat().st_size / 2**20:.0f} MB)"
            )
        for _ in range(args.repeat):
            for name in ("rewards@bench.parquet", "advantages@bench.parquet"):
                (folder / name).unlink(missing_ok=True)
            started = time.perf_counter()
            r = run_measured(folder, args.workers, args.chunk_rows)
            # The machine is shared: the load average when the run ends says how much of it
            # this run had (1 minute for short runs, 5 and 15 for the long ones).
            r |= {"wall_s": time.perf_counter() - started, "load": "/".join(f"{x:.1f}" for x in os.getloadavg())}
            runs.setdefault(rows, []).append(r)
            print(_line(_figures(r)), flush=True)
    if args.repeat > 1:
        print("medians:")
        for results in runs.values():
            figures = [_figures(r) for r in results]
            print(_line([_median(column) for column in zip(*figures, strict=True)]))
    if args.keep is None:
        import shutil

        shutil.rmtree(root)


if __name__ == "__main__":
    main()
