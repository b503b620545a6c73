"""The generate stage with the vLLM engine, against bare vLLM and against HF generate, same
process, same model, same prompts, same thread count, interleaved reps; tokens/s medians with
their spread.

    flock /tmp/grpoflow-bench.lock python benchmarks/bench_engines.py --model smollm2 --threads 2

Sides (each rep runs all of them in this order; the first rep warms every path up):
  hf_generate  bare transformers: model.generate on the left-padded batch, nothing else
  vllm_bare    bare vLLM: llm.generate(token prompts, SamplingParams(n=G, ...)) on the engine's
               LLM, no log-probs, nothing else
  stage_vllm   grpoflow's generate stage, generation_engine vllm: render + tokenize prompts,
               sample with the sampler's log-probs, decode, write generations.parquet
  stage_hf     the same stage with the HF engine (the default)

Targets (issue 10): stage_vllm / vllm_bare >= 0.9; stage_vllm / hf_generate >= 2 at SmolLM2 size
on CPU. Tokens counted are completion tokens up to and including EOS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import common  # sets the offline/quiet environment and sys.path
from common import ROOT, fmt, machine_info, set_threads, summary

SIDES = ["hf_generate", "vllm_bare", "stage_vllm", "stage_hf"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", choices=["tiny", "smollm2"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sides", nargs="+", default=SIDES, choices=SIDES)
    p.add_argument("--scratch", type=Path, default=ROOT / "benchmarks" / "out" / "engines")
    a = p.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    set_threads(a.threads)
    import torch

    from data.schemas import PROMPTS
    from data.sources import normalise_row, prompts_table
    from data.store import write_table
    from tasks.engines import engine_for
    from tasks.engines.hf import eos_ids
    from tasks.generate import generate_completions
    from tasks.model import live_policy

    a.scratch.mkdir(parents=True, exist_ok=True)
    if a.model == "tiny":
        from tasks.model import LivePolicy, save_checkpoint
        from tasks.tiny_model import build_model, build_tokenizer

        model_path = a.scratch / "tiny-random"
        if not (model_path / "config.json").exists():
            tok = build_tokenizer()
            save_checkpoint(LivePolicy(build_model(len(tok), seed=0), tok), model_path)
        rows = [json.loads(x) for x in common.write_builtin_jsonl(a.scratch / "arith.jsonl").read_text().splitlines()][
            : a.prompts
        ]
    else:
        from gcd import write_gcd_jsonl
        from smollm2 import smollm2_hf_folder

        model_path = smollm2_hf_folder(ROOT / "benchmarks" / "out" / "smollm2-135m-instruct")
        train, _ = write_gcd_jsonl(a.scratch / "gcd-train.jsonl", a.scratch / "gcd-held.jsonl", 64, 8)
        rows = [json.loads(x) for x in train.read_text().splitlines()][: a.prompts]
    prompts_path = a.scratch / "prompts.parquet"
    write_table(
        prompts_table([normalise_row(r, data_source="bench", row=i) for i, r in enumerate(rows)]), prompts_path, PROMPTS
    )

    policy = live_policy(str(model_path), "cpu", "float32")  # the stage finds this very object
    model, tok = policy.model, policy.tokenizer
    model.eval()
    prompt_ids, jobs, ids, mask = common.bare_generate_inputs(rows, tok, a.group_size)
    width = ids.shape[1]
    stops = eos_ids(model, tok)
    # vLLM's CPU worker pins this process's OpenMP threads when it starts (and then refuses
    # torch.set_num_threads), which could handicap the HF sides measured beside it. Checked:
    # `--sides hf_generate stage_hf` builds no engine, and HF ran at 102 tok/s there against
    # 105-109 beside vLLM (SmolLM2, 2 threads), so the interleaved comparison is fair.
    build_seconds, sync_seconds, llm = 0.0, [], None
    if {"vllm_bare", "stage_vllm"} & set(a.sides):
        started = time.perf_counter()
        engine = engine_for("vllm", str(model_path), policy)  # built once, as in a flow run
        llm = engine.llm
        build_seconds = time.perf_counter() - started
        for _ in range(3):  # the in-place weight sync after each update (the same weights here)
            t0 = time.perf_counter()
            engine.sync(model.state_dict().items())
            sync_seconds.append(time.perf_counter() - t0)
    set_threads(a.threads)

    def count(new_tokens: torch.Tensor) -> int:
        total = 0
        for row in new_tokens.tolist():
            stop = next((t for t, x in enumerate(row) if x in stops), None)
            total += len(row) if stop is None else stop + 1
        return total

    @torch.no_grad()
    def hf_generate(seed: int) -> int:
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=None,
            max_new_tokens=a.max_new_tokens,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
        )
        return count(out[:, width:])

    def vllm_bare(seed: int) -> int:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        bare_params = SamplingParams(
            n=a.group_size,
            temperature=1.0,
            top_k=0,
            max_tokens=a.max_new_tokens,
            stop_token_ids=stops,
            detokenize=False,
        )
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], bare_params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    out_dir = Path(tempfile.mkdtemp(prefix="gen-", dir=a.scratch))

    def stage(engine: str):
        def run(seed: int) -> int:
            return generate_completions(
                prompts_path,
                out_dir / f"{engine}-{seed}.parquet",
                str(model_path),
                group_size=a.group_size,
                max_new_tokens=a.max_new_tokens,
                batch_size=len(jobs),
                seed=seed,
                device="cpu",
                dtype="float32",
                with_old_logprobs=False,
                engine=engine,
            )["tokens"]

        return run

    fns = {"hf_generate": hf_generate, "vllm_bare": vllm_bare, "stage_vllm": stage("vllm"), "stage_hf": stage("hf")}
    sides = {name: fns[name] for name in a.sides}
    rates: dict[str, list[float]] = {k: [] for k in sides}
    loads = []
    for rep in range(a.reps + 1):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            n = fn(1000 + rep)
            seconds = time.perf_counter() - t0
            if rep > 0:
                rates[name].append(n / seconds)
        loads.append(os.getloadavg()[0])
    print(
        f"engines benchmark: model {a.model}, {len(jobs)} sequences ({a.prompts} prompts x {a.group_size}), up to "
        f"{a.max_new_tokens} new tokens, {a.threads} torch thread(s), {a.reps} interleaved reps (+1 warm-up); vLLM "
        f"engine built in {build_seconds:.1f}s, weight sync {', '.join(f'{x:.2f}' for x in sync_seconds)}s; 1-min load "
        f"average per rep {', '.join(f'{x:.1f}' for x in loads)}"
    )
    report = {
        "machine": machine_info(),
        "args": {k: str(v) for k, v in vars(a).items()},
        "loads": loads,
        "build_seconds": build_seconds,
        "sync_seconds": sync_seconds,
        "sides": {},
    }
    for name in sides:
        report["sides"][name] = {"tokens_per_second": summary(rates[name])}
        print(f"  {name:12s} {fmt(summary(rates[name]), ' tok/s')}")
    for num, den in (
        ("stage_vllm", "vllm_bare"),
        ("stage_vllm", "hf_generate"),
        ("stage_vllm", "stage_hf"),
        ("vllm_bare", "hf_generate"),
    ):
        if num in sides and den in sides:
            ratio = [x / y for x, y in zip(rates[num], rates[den], strict=True)]
            report[f"{num}/{den}"] = summary(ratio)
            print(
                f"  {num} / {den}: median {statistics.median(ratio):.2f}x (per-rep {min(ratio):.2f}-{max(ratio):.2f})"
            )
    (a.scratch / f"summary-{a.model}-t{a.threads}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
