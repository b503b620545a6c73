"""Tokens per second of grpoflow's generate stage against a bare `model.generate` on the same
batch, same model object, same sampling settings and seed (so both sample the very same
tokens), same torch thread count, interleaved A/B in one process.

    python benchmarks/bench_generation.py                      # tiny model, 8 prompts x 8, 32 tokens
    python benchmarks/bench_generation.py --model smollm2 --reps 3

Sides:
  bare    model.generate(input_ids, attention_mask, do_sample, max_new_tokens), nothing else
  sample       grpoflow's HF engine `sample()`: the same `generate` call, cut at EOS into samples
  old_forward  the one forward pass the stage runs for the old-policy log-probs of those samples
  stage        the whole generate stage as the default run calls it (mu = 1, one mini-batch:
               no old-policy log-probs needed): read prompts.parquet, render and tokenize,
               `sample()`, decode, write generations.parquet (beta 0: no reference)
  stage_old    the same with the old-policy forward (what mu > 1 or several mini-batches need)
Tokens counted: completion tokens up to and including EOS, identical on every side.
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

SIDES = ["bare", "sample", "old_forward", "stage", "stage_old"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (untrained built-in), smollm2, or a model folder")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per side (after one warm-up each)")
    p.add_argument(
        "--sides",
        nargs="+",
        default=SIDES,
        choices=SIDES,
        help="in the order they run in each rep; bare and stage always run; "
        "sample, old_forward and stage_old are the diagnostics",
    )
    p.add_argument("--scratch", type=Path, default=ROOT / "benchmarks" / "out" / "generation")
    a = p.parse_args()
    set_threads(a.threads)
    a.sides = list(dict.fromkeys([*a.sides, "bare", "stage"]))  # the order given is the order run in each rep
    if "old_forward" in a.sides and ("sample" not in a.sides or a.sides.index("sample") > a.sides.index("old_forward")):
        p.error("old_forward times the forward pass over the `sample` side's completions: put sample before it")

    import torch

    from data.schemas import PROMPTS
    from data.sources import normalise_row, prompts_table
    from data.store import write_table
    from tasks.engines import SamplingSettings
    from tasks.engines.hf import HFEngine, eos_ids
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
    elif a.model == "smollm2":
        from smollm2 import smollm2_hf_folder, write_gsm_symbolic_jsonl

        model_path = smollm2_hf_folder(ROOT / "benchmarks" / "out" / "smollm2-135m-instruct")
        rows = [
            json.loads(x)
            for x in write_gsm_symbolic_jsonl(a.scratch / "gsm_symbolic.jsonl", 64).read_text().splitlines()
        ][: a.prompts]
    else:
        raise SystemExit("--model: tiny or smollm2")
    prompts_path = a.scratch / "prompts.parquet"
    write_table(
        prompts_table([normalise_row(r, data_source="bench", row=i) for i, r in enumerate(rows)]), prompts_path, PROMPTS
    )

    policy = live_policy(str(model_path), "cpu", "float32")  # the stage finds this very object
    model, tok = policy.model, policy.tokenizer
    model.eval()
    prompt_ids, jobs, ids, mask = common.bare_generate_inputs(rows, tok, a.group_size)
    width = ids.shape[1]
    eos = eos_ids(model, tok)
    batch = len(jobs)
    engine = HFEngine()  # the stage's engine, on the same model object
    engine.load(model, tok)
    settings = SamplingSettings(max_new_tokens=a.max_new_tokens, batch_size=batch)

    def count(new_tokens: torch.Tensor) -> int:
        total = 0
        for row in new_tokens.tolist():
            stop = next((t for t, x in enumerate(row) if x in eos), None)
            total += len(row) if stop is None else stop + 1
        return total

    @torch.no_grad()
    def bare(seed: int) -> int:
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=None,
            max_new_tokens=a.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
        )
        return count(out[:, width:])

    def sampled(seed: int) -> int:
        return sum(len(s.completion_ids) for s in engine.sample(prompt_ids, a.group_size, settings, seed=seed))

    out_dir = Path(tempfile.mkdtemp(prefix="gen-", dir=a.scratch))

    def stage(seed: int, with_old_logprobs: bool = False) -> int:
        return generate_completions(
            prompts_path,
            out_dir / f"g{seed}.parquet",
            str(model_path),
            group_size=a.group_size,
            max_new_tokens=a.max_new_tokens,
            batch_size=batch,
            seed=seed,
            device="cpu",
            dtype="float32",
            with_old_logprobs=with_old_logprobs,
        )["tokens"]

    from tasks.logprobs import batched_completion_logprobs

    last: dict = {}

    def sampled_keep(seed: int) -> int:
        last["samples"] = engine.sample(prompt_ids, a.group_size, settings, seed=seed)
        return sum(len(s.completion_ids) for s in last["samples"])

    def old_forward(seed: int) -> int:
        """The stage's one forward pass for the old-policy log-probs of the sampled tokens
        (timed on the samples of the `sample` side of the same rep)."""
        samples = last["samples"]
        batched_completion_logprobs(
            model,
            [prompt_ids[s.prompt_index] for s in samples],
            [s.completion_ids for s in samples],
            tok.pad_token_id,
            1.0,
            batch,
        )
        return sum(len(s.completion_ids) for s in samples)

    sides = {
        "bare": bare,
        "sample": sampled_keep,
        "old_forward": old_forward,
        "stage": stage,
        "stage_old": lambda seed: stage(seed, True),
    }
    sides = {name: sides[name] for name in a.sides}
    rates: dict[str, list[float]] = {k: [] for k in sides}
    seconds_of: dict[str, list[float]] = {k: [] for k in sides}
    tokens: dict[str, list[int]] = {k: [] for k in sides}
    for rep in range(a.reps + 1):
        for name, fn in sides.items():
            started = time.perf_counter()
            n = fn(1000 + rep)
            seconds = time.perf_counter() - started
            if rep > 0:  # the first round warms every path up
                rates[name].append(n / seconds)
                seconds_of[name].append(seconds)
                tokens[name].append(n)
    print(
        f"generation benchmark: model {a.model}, {batch} sequences ({a.prompts} prompts x {a.group_size}), "
        f"{a.max_new_tokens} new tokens, {a.threads} torch thread(s), {a.reps} interleaved reps; load {os.getloadavg()}"
    )
    report = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(a).items()}, "sides": {}}
    for name in sides:
        s = summary(rates[name])
        report["sides"][name] = {"tokens_per_second": s, "seconds": summary(seconds_of[name]), "tokens": tokens[name]}
        print(f"  {name:11s} {fmt(s, ' tok/s')}   median {statistics.median(seconds_of[name]):.3f}s per batch")
    same = all(tokens[name] == tokens["bare"] for name in sides if name != "old_forward")
    print(f"  same tokens sampled on every side: {same}")
    for name in [n for n in ("sample", "stage", "stage_old") if n in sides]:
        ratio = [x / y for x, y in zip(rates[name], rates["bare"], strict=True)]
        report["sides"][name]["ratio_to_bare"] = summary(ratio)
        print(
            f"  {name} / bare: median {statistics.median(ratio):.3f}x (per-rep ratios "
            f"{min(ratio):.3f}-{max(ratio):.3f})"
        )
    (a.scratch / f"summary-{a.model}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
