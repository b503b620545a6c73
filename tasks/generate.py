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

Whichever engine samples (`engine`: tasks/engines, hf or vllm), it also hands back its own
log-prob of every token it drew: stored as `sampler_logprobs`, they let the update measure
(and optionally correct, tasks/objective.py) the train/inference mismatch between the
sampler's numerics and the trainer's forward pass.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from data.schemas import GENERATIONS, PROMPTS
from data.store import read_table, write_table
from tasks.engines import SamplingSettings, engine_for
from tasks.logprobs import DEFAULT_CHUNK_TOKENS, batched_completion_logprobs
from tasks.lora import reference_weights
from tasks.model import live_policy, load_model, pick_dtype


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
    engine: str = "hf",
    engine_options: dict | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """Sample `group_size` completions per prompt with generation engine `engine`
    (tasks/engines, built with `engine_options`) and write the generations artifact.

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
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size)
    samples = engine_for(engine, policy_path, policy, engine_options).sample(prompt_ids, group_size, settings, seed=seed)
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
            "sampler_logprobs": [s.logprobs for s in samples],
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
