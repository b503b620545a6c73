"""Helpers shared by the benchmark scripts: quiet offline settings, the equal-settings TRL
trainer, the built-in prompts as a dataset both sides read, peak RSS and robust statistics.

Benchmarks print figures; nothing here asserts a timing.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # scripts run as `python benchmarks/x.py` from the repo root
    sys.path.insert(0, str(ROOT))

# Offline and quiet before anything imports transformers or Prefect.
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "WARNING",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "GRPOFLOW_PROGRESS": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "WANDB_DISABLED": "true",
}.items():
    os.environ.setdefault(key, value)


def set_threads(threads: int) -> None:
    """Both sides of a comparison run with the same torch thread count."""
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Reset the kernel's resident-memory high-water mark of this process (Linux >= 4.0), so
    `status_mib("VmHWM")` afterwards is the peak of what follows alone."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status in MiB: VmHWM (peak RSS since the last reset), VmRSS (now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def summary(values: list[float]) -> dict:
    """Median and spread (min, quartiles, max) of timings; the median is what we compare."""
    values = sorted(values)
    if not values:
        return {"n": 0}
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return {
        "n": len(values),
        "median": statistics.median(values),
        "q1": q[0],
        "q3": q[2],
        "min": values[0],
        "max": values[-1],
    }


def fmt(s: dict, unit: str = "s") -> str:
    if not s.get("n"):
        return "n/a"
    return (
        f"{s['median']:.3f}{unit} (IQR {s['q1']:.3f}-{s['q3']:.3f}, min {s['min']:.3f}, max {s['max']:.3f}, n={s['n']})"
    )


def machine_info() -> dict:
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average": os.getloadavg(),
    }
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    try:
        import prefect

        info["prefect"] = prefect.__version__
    except ImportError:
        pass
    return info


def digit_share(completion: str, example) -> float:
    """Fraction of the completion's characters that are digits: the tiny benchmarks' reward.
    An untrained model earns the exact-answer reward on no completion, so every advantage is
    0 and, with beta 0, the update has no gradient to compute (grpoflow then forwards
    nothing); this reward has spread within every group, so the update does real work."""
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


def write_builtin_jsonl(path: Path, held_out: bool = False, size: int = 500) -> Path:
    """The built-in arithmetic task as a TRL-layout JSONL (prompt + answer): both sides read
    the very same rows."""
    from data import builtin

    rows = builtin.held_out_problems(size) if held_out else builtin.all_train_problems()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"], "task": r["task"]}) + "\n" for r in rows)
    )
    return path


def trl_trainer(
    model_path: str,
    rows: list[dict],
    reward_fn,
    *,
    output_dir: str,
    prompts_per_step: int,
    group_size: int,
    max_completion_length: int,
    learning_rate: float,
    beta: float,
    seed: int,
    steps: int,
    gradient_checkpointing: bool,
    micro_batch: int | None = None,
    loss_type: str = "grpo",
    epsilon: float = 0.2,
    temperature: float = 1.0,
):
    """TRL's GRPOTrainer set to grpoflow's defaults, where TRL's own differ:

    - one optimiser step per generation batch of prompts_per_step x group_size completions
      (num_iterations 1), in micro-batches of `micro_batch` completions with gradient
      accumulation (default: all completions in one pass, no accumulation), as grpoflow's
      micro_batch_size;
    - constant learning rate (TRL/Trainer default: linear decay to 0);
    - loss_type "grpo" (TRL 1.x default: "dapo"), beta as given (TRL default 0);
    - fp32 on CPU (bf16 off), no checkpoint saving, no logging integrations;
    - top_k off on both sides (TRL: top_k=0; grpoflow: top_k=None), temperature 1, top_p 1.
    Gradient checkpointing is TRL's default (on); the caller says which it wants.
    """
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    completions = prompts_per_step * group_size
    micro_batch = micro_batch or completions
    if completions % micro_batch:
        raise ValueError(f"micro_batch {micro_batch} must divide the {completions} completions of a step")
    args = GRPOConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        # TRL generates per_device_train_batch_size x steps_per_generation (default: the
        # accumulation steps) completions at once: one generation batch per optimiser step.
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=completions // micro_batch,
        num_generations=group_size,
        num_iterations=1,
        max_completion_length=max_completion_length,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=beta,
        epsilon=epsilon,
        loss_type=loss_type,
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        max_steps=steps,
        seed=seed,
        data_seed=seed,
        gradient_checkpointing=gradient_checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return GRPOTrainer(model=model_path, reward_funcs=reward_fn, args=args, train_dataset=Dataset.from_list(rows))


def exact_answer_for_trl(completions, answer, **_):
    """grpoflow's `exact_answer` reward in TRL's calling convention (lists per batch)."""
    from rewards.arithmetic import exact_answer

    return [exact_answer(c, {"answer": a}) for c, a in zip(completions, answer, strict=True)]


class PrefectServer:
    """A local Prefect API for the benchmark's flow processes (`with PrefectServer(folder):`).

    Without one, every flow process starts a temporary API on the shared ~/.prefect SQLite
    database; processes of other runs on the same machine then contend for that file (we
    saw start-ups time out). One server in its own PREFECT_HOME serves every worker of a
    benchmark; its own memory is reported apart from the workers'.
    """

    def __init__(self, home: Path):
        self.home = Path(home)
        self.process = None
        self.url = None

    def __enter__(self) -> PrefectServer:
        import socket
        import subprocess
        import time
        import urllib.request

        self.home.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PREFECT_HOME": str(self.home)}
        env.pop("PREFECT_API_URL", None)
        self.log = open(self.home / "server.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{port}/api"
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"prefect server exited with status {self.process.returncode}; see {self.home / 'server.log'}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            raise RuntimeError(f"prefect server at {self.url} did not answer in 180 s; see {self.home / 'server.log'}")
        os.environ["PREFECT_API_URL"] = self.url  # inherited by every worker started from now on
        os.environ["PREFECT_HOME"] = str(self.home)
        return self

    def rss_mib(self) -> float:
        """Resident memory of the server and its children now."""
        import psutil

        proc = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20

    def __exit__(self, *exc) -> None:
        import subprocess

        os.environ.pop("PREFECT_API_URL", None)
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def bare_generate_inputs(rows: list[dict], tok, group_size: int):
    """What a bare `model.generate` baseline feeds the model: every prompt rendered as the
    generate stage renders it, repeated group_size times, left-padded into one batch.
    Returns (prompt_ids, jobs: the prompt index of each row, ids (B, P), mask (B, P))."""
    import torch

    from tasks.generate import render_prompt

    texts = [render_prompt(r | {"prompt_id": str(i)}, tok, True) for i, r in enumerate(rows)]
    prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, prompt_ids))
    jobs = [i for i in range(len(prompt_ids)) for _ in range(group_size)]
    ids = torch.full((len(jobs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, i in enumerate(jobs):
        ids[row, width - len(prompt_ids[i]) :] = torch.as_tensor(prompt_ids[i])
        mask[row, width - len(prompt_ids[i]) :] = 1
    return prompt_ids, jobs, ids, mask
