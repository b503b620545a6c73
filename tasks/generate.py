"""Generate stage: prompts.parquet -> generations.parquet (G completions per prompt).

Per completion we store what the update needs so that it never has to run the sampler or
the reference model again: the token ids, the sampling policy's per-token log-probs (when
the update needs them, see below), the reference model's per-token log-probs when beta > 0,
and why the completion ended.

The old-policy log-probs are needed only when the update takes more than one optimiser step
on these completions (mu > 1 or several mini-batches): with a single step, the policy that
the update differentiates *is* the sampling policy, so pi/pi_old = 1 by construction and the
update uses its own log-probs, detached (TRL does the same with num_iterations = 1). Skipping
them saves one forward pass per iteration, about a third of the stage's time on the tiny
model and on SmolLM2-135M (benchmarks/RESULTS.md).

When computed, they come from one forward pass over the finished sequences, in the
update's own batch layout, not from ``generate``'s per-step logits: in bf16 the incremental
(KV-cache) logits differ from a full forward by up to 2e-2 nats per token (measured on an
H100, benchmarks/bench_gpu.py), which would make the ratio start away from 1; and keeping
every step's logits costs B x T x V floats (50 GiB peak for 512 x 128 tokens of a 49k
vocabulary). The extra forward costs about one decoding step's worth of compute per token.

Log-probs are those of the temperature-scaled distribution softmax(logits / T), before
top-p truncation, as in TRL; the update computes its ratio on the same footing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from data.schemas import GENERATIONS, PROMPTS
from data.store import read_table, write_table
from tasks.logprobs import DEFAULT_CHUNK_TOKENS, batched_completion_logprobs
from tasks.lora import reference_weights
from tasks.model import live_policy, load_model, pick_dtype
from tasks.progress import progress


@dataclass
class Sample:
    prompt_index: int
    completion_ids: list[int]  # includes the EOS token when the model stopped by itself
    finish_reason: str  # "eos" | "length"


def render_prompt(row: dict, tokenizer, use_chat_template: bool) -> str:
    """The text fed to the model: chat prompts through the tokenizer's chat template; plain
    prompts as they are, or as one user turn when the tokenizer has a template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    messages = row.get("messages")
    if messages:
        if not has_template:
            raise ValueError(f"prompt {row['prompt_id']} is a chat but the tokenizer has no chat template")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if use_chat_template and has_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True)
    return row["prompt"]


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    greedy: bool = False,
    desc: str = "generate",
) -> list[Sample]:
    """`num_samples` completions of every prompt, `batch_size` sequences per ``generate``."""
    device = next(model.parameters()).device
    eos_ids = _eos_ids(model, tokenizer)
    jobs = [i for i in range(len(prompt_ids)) for _ in range(num_samples)]  # group members adjacent
    out: list[Sample] = []
    model.eval()
    with progress(desc, total=len(jobs)) as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            width = max(len(prompt_ids[i]) for i in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[row, width - len(prompt_ids[i]) :] = torch.as_tensor(prompt_ids[i])
                mask[row, width - len(prompt_ids[i]) :] = 1
            result = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=not greedy,
                temperature=temperature if not greedy else None,
                top_p=top_p if not greedy else None,
                top_k=None,  # generation_config defaults (top_k=50) would silently truncate sampling
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = result[:, width:].cpu()  # (b, C)
            for row, i in enumerate(chunk):
                tokens = new_tokens[row].tolist()
                stop = next((t for t, tok in enumerate(tokens) if tok in eos_ids), None)
                length = len(tokens) if stop is None else stop + 1
                out.append(Sample(i, tokens[:length], "length" if stop is None else "eos"))
            bar.advance(len(chunk))
    return out


def _eos_ids(model, tokenizer) -> list[int]:
    # Chat models often end turns with a token other than the tokenizer's EOS (e.g.
    # <|im_end|>); their generation config lists every stop token.
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [tokenizer.eos_token_id, *configured] if i is not None})


def generate_completions(
    prompts_path: str | Path,
    out_path: str | Path,
    policy_path: str,
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    reference_path: str | None = None,
    use_chat_template: bool = True,
    with_old_logprobs: bool = True,
    logprob_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    reference_from_base: bool = False,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """Sample `group_size` completions per prompt and write the generations artifact.

    `with_old_logprobs` false leaves ``old_logprobs`` null (the update then takes a single
    step and needs none). `reference_path` set (beta > 0) adds the reference model's
    per-token log-probs; that model is loaded only for this and freed before the stage
    returns, so the update stage holds the policy alone. `reference_from_base` (LoRA, beta >
    0) takes them from the policy's base weights with its adapter disabled instead.
    """
    policy = live_policy(policy_path, device, dtype)
    model, tokenizer = policy.model, policy.tokenizer
    rows = read_table(prompts_path, PROMPTS).to_pylist()
    texts = [render_prompt(r, tokenizer, use_chat_template) for r in rows]
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    torch.manual_seed(seed)
    samples = sample(model, tokenizer, prompt_ids, group_size, max_new_tokens, temperature, top_p, batch_size)
    sample_prompts = [prompt_ids[s.prompt_index] for s in samples]
    sample_completions = [s.completion_ids for s in samples]
    old_logprobs = [None] * len(samples)
    if with_old_logprobs:
        old_logprobs = batched_completion_logprobs(model, sample_prompts, sample_completions, tokenizer.pad_token_id, temperature, batch_size,
                                                  logprob_chunk_tokens or None)

    ref_logprobs = None
    if reference_from_base:
        # LoRA: the reference is the policy's own frozen base weights, adapter disabled;
        # nothing is loaded.
        with reference_weights(model):
            ref_logprobs = batched_completion_logprobs(model, sample_prompts, sample_completions, tokenizer.pad_token_id, temperature,
                                                       batch_size, logprob_chunk_tokens or None)
    elif reference_path is not None:
        ref = load_model(reference_path, model.device, pick_dtype(dtype, model.device)).eval()
        ref_logprobs = batched_completion_logprobs(ref, sample_prompts, sample_completions, tokenizer.pad_token_id, temperature, batch_size,
                                                  logprob_chunk_tokens or None)
        # Free its weights now, without gc.collect(): a full collection of this process's heap
        # (torch, transformers, Prefect) took 0.3-1.4 s per iteration, more than the reference
        # forward itself. Moving the weights to the meta device drops their storage at once.
        ref.to("meta")
        del ref

    completions = tokenizer.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
    table = pa.table(
        {
            "prompt_id": [rows[s.prompt_index]["prompt_id"] for s in samples],
            "sample_index": [k % group_size for k in range(len(samples))],
            "prompt_text": [texts[s.prompt_index] for s in samples],
            "completion": completions,
            "prompt_token_ids": [prompt_ids[s.prompt_index] for s in samples],
            "completion_token_ids": [s.completion_ids for s in samples],
            "old_logprobs": old_logprobs,
            "ref_logprobs": ref_logprobs if ref_logprobs is not None else [None] * len(samples),
            "finish_reason": [s.finish_reason for s in samples],
        },
        schema=GENERATIONS.schema,
    )
    write_table(table, out_path, GENERATIONS)
    lengths = [len(s.completion_ids) for s in samples]
    return {
        "completions": len(samples),
        "tokens": sum(lengths),
        "mean_length": sum(lengths) / max(len(lengths), 1),
        "clipped_ratio": sum(s.finish_reason == "length" for s in samples) / max(len(samples), 1),
    }


@task(name="generate", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def generate_task(prompts_path: str, out_path: str, policy_path: str, **settings) -> dict:
    return generate_completions(prompts_path, out_path, policy_path, **settings)
