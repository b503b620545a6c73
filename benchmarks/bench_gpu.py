"""GPU check of the generation path: throughput of the generate stage against a bare
``model.generate`` on the same batch, and how far the log-probs stored at sampling time are
from those the update recomputes (the ratio's starting error), in fp32 and bf16.

The model has SmolLM2-135M's shape (Llama, 30 layers, hidden 576, vocabulary 49152) with
random weights: throughput depends on the shape, not on the weights, and no weights can be
downloaded here. Random weights almost never emit EOS, so every completion runs to
--new-tokens, which is what a throughput measurement wants.

    python benchmarks/bench_gpu.py --prompts 64 --group 8 --new-tokens 128 --repeats 5

Prints one line per measurement and a summary; runs on CPU too (slowly) when no GPU is there.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from data import builtin
from data.schemas import GENERATIONS, PROMPTS
from data.sources import normalise_row, prompts_table
from data.store import read_table, write_table
from tasks.generate import generate_completions
from tasks.logprobs import batched_completion_logprobs
from tasks.model import LivePolicy, forget_live_policies, live_policy, save_checkpoint


def smollm2_shaped(vocab: int, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def wide_char_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    chars = list("0123456789+-*= ")
    table = {t: i for i, t in enumerate(["<pad>", "<eos>", *chars])}
    table |= {f"<t{i}>": i for i in range(len(table), vocab)}  # ids a random model may sample
    core = Tokenizer(models.WordLevel(vocab=table, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(""), "isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bare_generate(model, tokenizer, prompts: list[str], group: int, new_tokens: int) -> float:
    batch = tokenizer([p for p in prompts for _ in range(group)], return_tensors="pt", padding=True).to(model.device)
    sync()
    start = time.perf_counter()
    model.generate(
        **batch,
        do_sample=True,
        temperature=1.0,
        top_k=None,
        top_p=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
    )
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    rows = [
        normalise_row(p, data_source="builtin", row=i) for i, p in enumerate(builtin.held_out_problems(args.prompts))
    ]
    prompts_path = write_table(prompts_table(rows), work / "prompts.parquet", PROMPTS)
    texts = [r["prompt"] for r in rows]
    sequences = args.prompts * args.group

    for dtype_name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        tokenizer = wide_char_tokenizer(49152)
        folder = work / f"model-{dtype_name}"
        save_checkpoint(LivePolicy(smollm2_shaped(len(tokenizer), dtype), tokenizer), folder)
        forget_live_policies()
        policy = live_policy(str(folder), device=device, dtype=dtype_name)
        settings = dict(
            group_size=args.group, max_new_tokens=args.new_tokens, batch_size=sequences, device=device, dtype=dtype_name
        )
        # Warm-up of both paths (CUDA kernels, allocator) before timing.
        generate_completions(prompts_path, work / "warm.parquet", str(folder), seed=0, **settings)
        bare_generate(policy.model, policy.tokenizer, texts, args.group, 8)
        stage_times, bare_times, tokens = [], [], 0
        for rep in range(args.repeats):  # interleaved: both sides see the same machine state
            sync()
            start = time.perf_counter()
            summary = generate_completions(prompts_path, work / "gen.parquet", str(folder), seed=rep, **settings)
            sync()
            stage_times.append(time.perf_counter() - start)
            tokens = summary["tokens"]
            bare_times.append(bare_generate(policy.model, policy.tokenizer, texts, args.group, args.new_tokens))
        bare_tokens = sequences * args.new_tokens
        stage_tps = [tokens / t for t in stage_times]
        bare_tps = [bare_tokens / t for t in bare_times]
        ratio = statistics.median(stage_tps) / statistics.median(bare_tps)
        print(
            f"{dtype_name}: generate stage {statistics.median(stage_tps):,.0f} tok/s (min {min(stage_tps):,.0f}, max "
            f"{max(stage_tps):,.0f}); bare generate {statistics.median(bare_tps):,.0f} tok/s (min "
            f"{min(bare_tps):,.0f}, max {max(bare_tps):,.0f}); ratio {ratio:.3f} [{sequences} sequences x "
            f"{args.new_tokens} tokens, {args.repeats} interleaved repeats]"
        )
        gens = read_table(work / "gen.parquet", GENERATIONS).to_pylist()
        again = batched_completion_logprobs(
            policy.model, [g["prompt_token_ids"] for g in gens], [g["completion_token_ids"] for g in gens], 0, 1.0, 64
        )
        diffs = [
            abs(a - b) for g, r in zip(gens, again, strict=True) for a, b in zip(g["old_logprobs"], r, strict=True)
        ]
        print(
            f"{dtype_name}: |stored old log-prob - recomputed| max {max(diffs):.2e}, mean {statistics.mean(diffs):.2e} "
            f"over {len(diffs):,} tokens"
        )
        forget_live_policies()
        if device == "cuda":
            print(f"{dtype_name}: peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
            torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
