"""Peak memory of the update (and of the reference forward) on long completions: grpoflow's
update stage with log-probs in chunks of positions (the default), with the whole-logits path,
with gradient checkpointing, with LoRA, against one training step of TRL's GRPOTrainer at
its defaults, on the very same batch.

    python benchmarks/bench_memory.py --model smollm2 --completion-tokens 1024 --sequences 4 --micro-batch 2

Every side runs in a fresh process, one after the other (memory, not time, is compared, so
they need not be interleaved). The batch: `--sequences` copies of gsm_symbolic prompts
(chat template), each with a completion of exactly `--completion-tokens` random token ids
(no EOS: what a policy that runs to its length limit produces; token identity does not
change memory), advantages +-1, beta 0.04. Peak RSS is read from the kernel's high-water
mark (VmHWM in /proc/self/status), reset (writing 5 to /proc/self/clear_refs) just before
the phase it measures, so each phase's figure is its own peak, weights and optimiser state
included:

  reference  the no-grad log-prob forward over the batch (grpoflow: in the generate stage,
             reference model loaded for it; TRL: its reference model's fused head forward)
  update     one optimiser step over the batch in micro-batches of --micro-batch (grpoflow:
             `update_policy`, the real stage function, reading the artifacts, no checkpoint
             written; TRL: `training_step` per micro-batch (its compute_loss + backward, the
             model prepared by accelerate) then the AdamW step)

Sides:
  grpoflow          update stage defaults: chunked log-probs (logprob_chunk_tokens --chunk-tokens,
                    default 256), no gradient checkpointing
  grpoflow-gc       the same with gradient checkpointing (TRL's default)
  grpoflow-whole    whole-logits path (logprob_chunk_tokens 0), no gradient checkpointing
  grpoflow-whole-gc whole-logits path with gradient checkpointing
  grpoflow-lora[-gc] LoRA rank --lora-rank on the default target modules (needs the lora extra)
  trl               GRPOTrainer at TRL's defaults (gradient checkpointing on, its fused LM head,
                    reference model held in memory) with grpoflow's loss settings (common.trl_trainer)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (sets the offline/quiet environment and sys.path)
from common import ROOT, machine_info, reset_peak_rss, set_threads, status_mib

PYTHON = sys.executable
SIDES = ["grpoflow", "grpoflow-gc", "grpoflow-whole", "grpoflow-whole-gc", "grpoflow-lora", "grpoflow-lora-gc", "trl"]
BETA = 0.04


def synthetic_batch(a: argparse.Namespace, tokenizer) -> tuple[list[list[int]], list[list[int]], list[float]]:
    """Prompt ids (chat template), completions of exactly a.completion_tokens ids, advantages."""
    rows = [json.loads(line) for line in Path(a.dataset).read_text().splitlines() if line.strip()]
    rng = random.Random(a.seed)
    special = set(tokenizer.all_special_ids)
    vocab = [t for t in range(len(tokenizer)) if t not in special]
    prompts, completions = [], []
    for i in range(a.sequences):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": rows[i // a.group_size]["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        completions.append([rng.choice(vocab) for _ in range(a.completion_tokens)])
    advantages = [1.0 if i % 2 == 0 else -1.0 for i in range(a.sequences)]
    return prompts, completions, advantages


def worker_grpoflow(a: argparse.Namespace, gradient_checkpointing: bool, chunk_tokens: int, lora_rank: int) -> dict:
    import pyarrow as pa
    import torch

    from data.schemas import ADVANTAGES, GENERATIONS
    from data.store import write_table
    from tasks.logprobs import batched_completion_logprobs
    from tasks.model import load_model, load_tokenizer
    from tasks.objective import LossSettings
    from tasks.update import update_policy

    tok = load_tokenizer(a.model_path)
    prompts, completions, advantages = synthetic_batch(a, tok)
    work = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=a.scratch))
    out = {"after_imports_mib": status_mib("VmRSS")}

    # The generate stage's reference forward: reference model loaded, log-probs, freed.
    ref = load_model(a.model_path, torch.device("cpu"), torch.float32).eval()
    reset_peak_rss()
    started = time.perf_counter()
    ref_logprobs = batched_completion_logprobs(
        ref, prompts, completions, tok.pad_token_id, 1.0, a.micro_batch, chunk_tokens or None
    )
    out["reference_seconds"] = time.perf_counter() - started
    out["reference_peak_mib"] = status_mib("VmHWM")
    ref.to("meta")
    del ref

    n = len(prompts)
    write_table(
        pa.table(
            {
                "prompt_id": [str(i // a.group_size) for i in range(n)],
                "sample_index": [i % a.group_size for i in range(n)],
                "prompt_text": [""] * n,
                "completion": [""] * n,
                "prompt_token_ids": prompts,
                "completion_token_ids": completions,
                "old_logprobs": [None] * n,
                "ref_logprobs": ref_logprobs,
                "finish_reason": ["length"] * n,
                "sampler_logprobs": [None] * n,
            },
            schema=GENERATIONS.schema,
        ),
        work / "generations.parquet",
        GENERATIONS,
    )
    write_table(
        pa.table(
            {
                "prompt_id": [str(i // a.group_size) for i in range(n)],
                "sample_index": [i % a.group_size for i in range(n)],
                "reward": advantages,
                "group_mean": [0.0] * n,
                "group_std": [1.0] * n,
                "advantage": advantages,
                "kept": [True] * n,
                "drop_reason": [None] * n,
            },
            schema=ADVANTAGES.schema,
        ),
        work / "advantages.parquet",
        ADVANTAGES,
    )
    settings = dict(
        learning_rate=1e-6,
        loss=LossSettings(beta=BETA),
        micro_batch_size=a.micro_batch,
        gradient_checkpointing=gradient_checkpointing,
        logprob_chunk_tokens=chunk_tokens,
        save=False,
        device="cpu",
        dtype="float32",
    )
    if lora_rank:
        from tasks.lora import LoraSettings

        settings["lora"] = LoraSettings(rank=lora_rank)
    # The policy is loaded here, as the flow's first update would (live_policy), before the peak is reset.
    from tasks.model import live_policy

    live_policy(a.model_path, "cpu", "float32")
    out["before_update_rss_mib"] = status_mib("VmRSS")
    reset_peak_rss()
    started = time.perf_counter()
    metrics = update_policy(
        work / "generations.parquet", work / "advantages.parquet", a.model_path, str(work / "checkpoint"), **settings
    )
    out["update_seconds"] = time.perf_counter() - started
    out["update_peak_mib"] = status_mib("VmHWM")
    out["loss"] = metrics["policy_loss"]
    out["trained_parameters"] = sum(
        p.numel() for p in live_policy(str(work / "checkpoint")).model.parameters() if p.requires_grad
    )
    return out


def worker_trl(a: argparse.Namespace) -> dict:
    import torch
    from common import trl_trainer

    from tasks.model import load_tokenizer
    from tasks.update import set_activation_checkpointing

    tok = load_tokenizer(a.model_path)
    prompts, completions, advantages = synthetic_batch(a, tok)
    out = {"after_imports_mib": status_mib("VmRSS")}
    rows = [{"prompt": "x", "answer": "0"}] * a.sequences
    trainer = trl_trainer(
        a.model_path,
        rows,
        lambda completions, **kw: [0.0] * len(completions),
        output_dir=tempfile.mkdtemp(dir=a.scratch),
        prompts_per_step=a.sequences // a.group_size,
        group_size=a.group_size,
        max_completion_length=a.completion_tokens,
        learning_rate=1e-6,
        beta=BETA,
        seed=a.seed,
        steps=1,
        gradient_checkpointing=True,
        micro_batch=a.micro_batch,
    )
    # What Trainer.train() does before its first step: checkpointing as TRL sets it
    # (use_reentrant False), the model prepared by accelerate, the optimiser created.
    set_activation_checkpointing(trainer.model, True)
    trainer.model_wrapped = trainer.model = trainer.accelerator.prepare(trainer.model)
    trainer.create_optimizer()
    width_p = max(len(p) for p in prompts)
    prompt_ids = torch.tensor([[tok.pad_token_id] * (width_p - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor(completions)
    completion_mask = torch.ones_like(completion_ids)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    reset_peak_rss()
    started = time.perf_counter()
    with torch.no_grad():
        ref_logps = torch.cat(
            [
                trainer._get_per_token_logps_and_entropies(
                    trainer.ref_model,
                    input_ids[s : s + a.micro_batch],
                    attention_mask[s : s + a.micro_batch],
                    a.completion_tokens,
                )[0]
                for s in range(0, a.sequences, a.micro_batch)
            ]
        )
    out["reference_seconds"] = time.perf_counter() - started
    out["reference_peak_mib"] = status_mib("VmHWM")
    trainer._prepare_inputs = lambda inputs: inputs  # the batch is given: no generation
    trainer.current_gradient_accumulation_steps = a.sequences // a.micro_batch  # set by Trainer's loop per step
    out["before_update_rss_mib"] = status_mib("VmRSS")
    reset_peak_rss()
    started = time.perf_counter()
    losses = []
    for s in range(0, a.sequences, a.micro_batch):
        inputs = {
            "prompt_ids": prompt_ids[s : s + a.micro_batch],
            "prompt_mask": prompt_mask[s : s + a.micro_batch],
            "completion_ids": completion_ids[s : s + a.micro_batch],
            "completion_mask": completion_mask[s : s + a.micro_batch],
            "advantages": torch.tensor(advantages[s : s + a.micro_batch]),
            "old_per_token_logps": None,
            "ref_per_token_logps": ref_logps[s : s + a.micro_batch],
            "num_items_in_batch": int(completion_mask.sum()),
        }
        losses.append(trainer.training_step(trainer.model, inputs, None).item())
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    out["update_seconds"] = time.perf_counter() - started
    out["update_peak_mib"] = status_mib("VmHWM")
    out["loss"] = sum(losses)
    out["trained_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return out


def run_worker(side: str, a: argparse.Namespace) -> dict:
    out = a.scratch / f"{side}-{time.time_ns()}.json"
    cmd = [
        PYTHON,
        __file__,
        "--worker",
        side,
        "--worker-out",
        str(out),
        "--model-path",
        a.model_path,
        "--dataset",
        a.dataset,
        "--completion-tokens",
        str(a.completion_tokens),
        "--sequences",
        str(a.sequences),
        "--group-size",
        str(a.group_size),
        "--micro-batch",
        str(a.micro_batch),
        "--lora-rank",
        str(a.lora_rank),
        "--chunk-tokens",
        str(a.chunk_tokens),
        "--threads",
        str(a.threads),
        "--scratch",
        str(a.scratch),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        return {
            "error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1],
            "returncode": proc.returncode,
        }
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 or a local model folder")
    p.add_argument("--completion-tokens", type=int, default=1024)
    p.add_argument("--sequences", type=int, default=4, help="completions in the optimiser step")
    p.add_argument("--group-size", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument(
        "--chunk-tokens",
        type=int,
        default=256,
        help="logprob_chunk_tokens of the chunked sides (the product's default: 256); the -whole sides use 0",
    )
    p.add_argument("--sides", default="grpoflow,grpoflow-gc,grpoflow-whole,grpoflow-whole-gc,trl")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scratch", type=Path, default=ROOT / "benchmarks" / "out" / "memory")
    p.add_argument("--worker")
    p.add_argument("--worker-out", type=Path)
    p.add_argument("--model-path")
    p.add_argument("--dataset")
    a = p.parse_args()

    if a.worker:
        set_threads(a.threads)
        side = a.worker
        if side == "trl":
            result = worker_trl(a)
        else:
            result = worker_grpoflow(
                a,
                gradient_checkpointing=side.endswith("-gc"),
                chunk_tokens=0 if "whole" in side else a.chunk_tokens,
                lora_rank=a.lora_rank if "lora" in side else 0,
            )
        a.worker_out.write_text(json.dumps(result))
        return

    a.scratch.mkdir(parents=True, exist_ok=True)
    if a.model == "smollm2":
        from smollm2 import smollm2_hf_folder, write_gsm_symbolic_jsonl

        a.model_path = str(smollm2_hf_folder(a.scratch.parent / "smollm2-135m-instruct"))
        a.dataset = str(write_gsm_symbolic_jsonl(a.scratch.parent / "gsm_symbolic.jsonl", 512, seed=0))
    else:
        from smollm2 import write_gsm_symbolic_jsonl

        a.model_path = a.model
        a.dataset = str(write_gsm_symbolic_jsonl(a.scratch.parent / "gsm_symbolic.jsonl", 512, seed=0))
    sides = [s for s in a.sides.split(",") if s]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        raise SystemExit(f"unknown sides {unknown}; known: {', '.join(SIDES)}")
    print(
        f"model {a.model_path}; {a.sequences} completions x {a.completion_tokens} tokens, micro-batch "
        f"{a.micro_batch}, beta {BETA}, "
        f"{a.threads} thread(s), log-prob chunks of {a.chunk_tokens} positions"
    )
    results = {}
    for side in sides:
        results[side] = run_worker(side, a) | {"load_average_after": os.getloadavg()}
        r = results[side]
        if "error" in r:
            print(f"{side:18s} FAILED: {r['error']}")
            continue
        print(
            f"{side:18s} update peak {r['update_peak_mib']:8.0f} MiB ({r['update_seconds']:6.1f} s, before "
            f"{r['before_update_rss_mib']:6.0f} MiB)"
            f"  reference peak {r['reference_peak_mib']:7.0f} MiB ({r['reference_seconds']:5.1f} s)  trained params "
            f"{r['trained_parameters']:,}"
            f"  load {' '.join(f'{x:.2f}' for x in r['load_average_after'])}"
        )
    base = results.get("trl", {}).get("update_peak_mib")
    if base:
        for side, r in results.items():
            if "update_peak_mib" in r and side != "trl":
                print(f"{side:18s} update peak / TRL's: {r['update_peak_mib'] / base:.2f}x")
    (a.scratch / "summary.json").write_text(
        json.dumps(
            {"machine": machine_info(), "args": {k: str(v) for k, v in vars(a).items()}, "results": results}, indent=1
        )
    )


if __name__ == "__main__":
    main()
