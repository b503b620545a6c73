"""What the Prefect API costs one `grpo run`: wall time of a one-iteration run of a tiny random
model, whole command, with each way of getting an API, interleaved, medians with spread.

    own       the CLI starts the API as its child before importing torch (the default)
    prefect   Prefect's own temporary server, started when the flow is called
              (GRPOFLOW_OWN_PREFECT_SERVER=0, the behaviour before)
    server    a long-lived `prefect server start` (PREFECT_API_URL set; its start-up not counted)

Usage: flock /tmp/grpoflow-bench.lock .venv/bin/python benchmarks/bench_startup.py --repeat 5
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
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _prepare(work: Path) -> tuple[Path, Path]:
    from data import builtin
    from tasks.model import LivePolicy, save_checkpoint
    from tasks.tiny_model import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = work / "model"
    save_checkpoint(LivePolicy(build_model(len(tokenizer), seed=0), tokenizer), model)
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in builtin.train_problems(16, seed=1)))
    return model, data


def _one_run(mode: str, work: Path, model: Path, data: Path, env: dict, k: int) -> float:
    env = dict(env)
    if mode == "prefect":
        env["GRPOFLOW_OWN_PREFECT_SERVER"] = "0"
    elif mode != "server":
        env.pop("PREFECT_API_URL", None)
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "--run-dir",
        str(work / f"run-{mode}-{k}"),
        "--model",
        str(model),
        "--dataset",
        str(data),
        "--iterations",
        "1",
        "--prompts-per-iteration",
        "2",
        "--group-size",
        "2",
        "--max-new-tokens",
        "2",
        "--score-workers",
        "1",
    ]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--modes", default="own,prefect,server")
    args = parser.parse_args()
    modes = args.modes.split(",")
    work = Path(tempfile.mkdtemp(prefix="grpoflow-bench-startup-"))
    model, data = _prepare(work)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": str(work / "prefect"),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "GRPOFLOW_PROGRESS": "0",
    }
    server = None
    if "server" in modes:
        port = 4399
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        for _ in range(1800):
            try:
                with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
    try:
        print(f"load before: {os.getloadavg()}")
        _one_run(modes[0], work, model, data, env, -1)  # warm the page cache and PREFECT_HOME's database; not counted
        times: dict[str, list[float]] = {m: [] for m in modes}
        for k in range(args.repeat):
            for mode in modes if k % 2 == 0 else modes[::-1]:  # interleaved, order alternating
                times[mode].append(_one_run(mode, work, model, data, env, k))
        for mode in modes:
            t = sorted(times[mode])
            print(f"{mode:8s} median {statistics.median(t):6.2f}s  min {t[0]:6.2f}s  max {t[-1]:6.2f}s  (n={len(t)})")
        base = statistics.median(times[modes[1]]) if len(modes) > 1 else None
        if base:
            for mode in modes:
                print(f"{mode:8s} / {modes[1]}: {statistics.median(times[mode]) / base:.2f}x")
        print(f"load after: {os.getloadavg()}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
