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
top-p truncation, as in TRL; the update computes its ratio on the same footing. Sampling
settings that reshape the sampled distribution (top_p, top_k, min_p, repetition_penalty) are
therefore accepted only when no stored old-policy log-prob is used (mu = 1, one mini-batch:
the ratio is 1 by construction); the config refuses them otherwise (flows/config.py). Stop
strings only end a completion early (finish_reason "stop") and change no probability.

Prompts longer than `max_prompt_length` tokens (after the chat template) are cut to their
last tokens or left out (`prompt_overflow`), and counted in the stage's summary.

Whichever engine samples (`engine`: tasks/engines, hf or vllm), it also hands back its own
log-prob of every token it drew: stored as `sampler_logprobs`, they let the update measure
(and optionally correct, tasks/objective.py) the train/inference mismatch between the
sampler's numerics and the trainer's forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from data.errors import UserError
from data.schemas import GENERATIONS, PROMPTS
from data.store import read_table, write_table
from tasks.engines import SamplingSettings, engine_for
from tasks.logprobs import DEFAULT_CHUNK_TOKENS, batched_completion_logprobs
from tasks.lora import reference_weights
from tasks.model import live_policy, load_model, pick_dtype
from tasks.stage_settings import StageSettings


def render_prompt(row: dict, tokenizer, use_chat_template: bool) -> str:
    """The text fed to the model: chat prompts through the tokenizer's chat template; plain
    prompts as they are, or as one user turn when the tokenizer has a template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    messages = row.get("messages")
    if messages:
        if not has_template:
            raise UserError(f"prompt {row['prompt_id']} is a chat but the tokenizer has no chat template")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if use_chat_template and has_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
        )
    return row["prompt"]


def fit_prompts(
    prompt_ids: list[list[int]], max_length: int | None, overflow: str
) -> tuple[list[int], list[list[int]], int]:
    """Apply `max_prompt_length`: (indices of the prompts kept, their token ids, how many were
    longer). truncate_left keeps a long prompt's last `max_length` tokens; skip leaves it out."""
    if overflow not in ("truncate_left", "skip"):
        raise ValueError(f"unknown prompt_overflow '{overflow}'; known: truncate_left, skip")
    if max_length is None:
        return list(range(len(prompt_ids))), prompt_ids, 0
    over = sum(len(ids) > max_length for ids in prompt_ids)
    if overflow == "skip":
        kept = [i for i, ids in enumerate(prompt_ids) if len(ids) <= max_length]
        return kept, [prompt_ids[i] for i in kept], over
    return list(range(len(prompt_ids))), [ids[-max_length:] for ids in prompt_ids], over


def _unknown_token_id(tokenizer) -> int | None:
    """The id unknown text becomes: the tokenizer's unk token, else its backend model's (the
    tiny model's character vocabulary maps unknown characters to <pad> at that level only)."""
    if getattr(tokenizer, "unk_token_id", None) is not None:
        return tokenizer.unk_token_id
    backend = getattr(getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None), "unk_token", None)
    return tokenizer.convert_tokens_to_ids(backend) if backend else None


def tokenization_loss(tokenizer, texts: Sequence[str]) -> dict:
    """How many of `texts` do not survive encode -> decode (whitespace aside), and how many
    unknown tokens their encodings hold: a tokenizer that lacks a text's characters feeds the
    model something else (the tiny model's character tokenizer turns a GSM8K question into a
    few digits), silently unless someone looks."""
    unk = _unknown_token_id(tokenizer)
    lossy, unknown, example = 0, 0, None
    for k, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        unknown += sum(t == unk for t in ids) if unk is not None else 0
        back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if "".join(back.split()) != "".join(text.split()):
            lossy += 1
            example = example or (k, text, back)
    return {"prompts": len(texts), "lossy": lossy, "unknown_tokens": unknown, "example": example}


# (reference path, its weight files' sizes and times) -> the reference model a call left loaded
_KEPT_REFERENCES: dict[tuple, object] = {}

# A reference model whose weight files take at most this many bytes stays loaded between
# generate stages, even in the process that trains: at that size a reload costs its fixed
# part (from_pretrained's config and module set-up: 0.056 s, 2.9% of a tiny-model iteration
# at beta 0.04, benchmarks/RESULTS.md section 4) and keeping it costs under 10% of the
# ~700 MiB the flow process holds anyway. A larger one is reloaded every iteration so that the
# update holds the policy alone (at SmolLM2-135M, 540 MB: the margin under TRL's peak RSS).
KEEP_REFERENCE_MAX_BYTES = 64 * 2**20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def _weight_files(reference_path: str) -> tuple | None:
    """(name, size, mtime) of a local model folder's weight files, or None (a hub name, or
    no folder): what identifies the weights a kept reference was loaded from."""
    folder = Path(reference_path).expanduser()
    if not folder.is_dir():
        return None
    stats = [(p.name, p.stat()) for p in sorted(folder.iterdir()) if p.suffix in _WEIGHT_SUFFIXES and p.is_file()]
    return tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats) or None


def keeps_reference(reference_path: str, keep_reference: bool | None) -> tuple | None:
    """The key to keep the reference under, or None when it is loaded and freed each call:
    `keep_reference` True keeps any reference, False none, None (the default) a small local one."""
    files = _weight_files(reference_path)
    if keep_reference is False or (
        keep_reference is None and (files is None or sum(f[1] for f in files) > KEEP_REFERENCE_MAX_BYTES)
    ):
        return None
    return (reference_path, files)


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
    keep_reference: bool | None = None,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    stop: Sequence[str] = (),
    max_prompt_length: int | None = None,
    prompt_overflow: str = "truncate_left",
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
    `keep_reference` True keeps the reference model in this process for the next call instead:
    for a process that never runs the update (a Ray generation worker), where reloading it for
    every shard of every iteration is pure cost; None (the default) keeps it only when its
    weights are small (KEEP_REFERENCE_MAX_BYTES); False never.
    """
    policy = live_policy(policy_path, device, dtype)
    model, tokenizer = policy.model, policy.tokenizer
    rows = read_table(prompts_path, PROMPTS).to_pylist()
    texts = [render_prompt(r, tokenizer, use_chat_template) for r in rows]
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    lengths = [len(ids) for ids in prompt_ids]
    kept, prompt_ids, too_long = fit_prompts(prompt_ids, max_prompt_length, prompt_overflow)
    if not kept:
        raise UserError(
            f"{prompts_path}: all {len(rows)} prompts are longer than max_prompt_length={max_prompt_length} tokens "
            "(prompt_overflow skip); raise max_prompt_length or use prompt_overflow truncate_left"
        )
    if too_long and prompt_overflow == "truncate_left":  # the text column says what the model saw
        texts = [
            tokenizer.decode(ids, skip_special_tokens=False) if n > len(ids) else t
            for ids, n, t in zip(prompt_ids, lengths, texts, strict=True)
        ]
    rows, texts = [rows[i] for i in kept], [texts[i] for i in kept]
    settings = SamplingSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        stop=tuple(stop),
    )
    samples = engine_for(engine, policy_path, policy, engine_options).sample(
        prompt_ids, group_size, settings, seed=seed
    )
    sample_prompts = [prompt_ids[s.prompt_index] for s in samples]
    sample_completions = [s.completion_ids for s in samples]
    old_logprobs = [None] * len(samples)
    if with_old_logprobs:
        old_logprobs = batched_completion_logprobs(
            model,
            sample_prompts,
            sample_completions,
            tokenizer.pad_token_id,
            temperature,
            batch_size,
            logprob_chunk_tokens or None,
        )

    ref_logprobs = None
    if reference_from_base:
        # LoRA: the reference is the policy's own frozen base weights, adapter disabled;
        # nothing is loaded.
        with reference_weights(model):
            ref_logprobs = batched_completion_logprobs(
                model,
                sample_prompts,
                sample_completions,
                tokenizer.pad_token_id,
                temperature,
                batch_size,
                logprob_chunk_tokens or None,
            )
    elif reference_path is not None:
        ref_dtype = pick_dtype(dtype, model.device)
        key = keeps_reference(reference_path, keep_reference)
        key = (*key, str(model.device), str(ref_dtype)) if key is not None else None
        ref = _KEPT_REFERENCES.get(key) if key is not None else None
        if ref is None:
            ref = load_model(reference_path, model.device, ref_dtype).eval()
        ref_logprobs = batched_completion_logprobs(
            ref,
            sample_prompts,
            sample_completions,
            tokenizer.pad_token_id,
            temperature,
            batch_size,
            logprob_chunk_tokens or None,
        )
        if key is not None:
            _KEPT_REFERENCES.clear()  # one reference per process, like the live policy
            _KEPT_REFERENCES[key] = ref
        else:
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
        "prompts/truncated": too_long if prompt_overflow == "truncate_left" else 0,
        "prompts/skipped": too_long if prompt_overflow == "skip" else 0,
    }


def combined_summary(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One summary for a stage whose prompts were generated in shards (a Ray cluster's
    workers): counts add up, means are weighted by completions."""
    completions = sum(s["completions"] for s in summaries)
    tokens = sum(s["tokens"] for s in summaries)
    return {
        "completions": completions,
        "tokens": tokens,
        "mean_length": tokens / max(completions, 1),
        "clipped_ratio": sum(s["clipped_ratio"] * s["completions"] for s in summaries) / max(completions, 1),
        "prompts/truncated": sum(s.get("prompts/truncated", 0) for s in summaries),
        "prompts/skipped": sum(s.get("prompts/skipped", 0) for s in summaries),
    }


@dataclass(frozen=True)
class GenerateSettings(StageSettings):
    """`generate_completions`'s settings, the same for every iteration of a run."""

    group_size: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64
    reference_path: str | None = None
    reference_from_base: bool = False
    use_chat_template: bool = True
    with_old_logprobs: bool = True
    logprob_chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    max_prompt_length: int | None = None
    prompt_overflow: str = "truncate_left"
    engine: str = "hf"
    engine_options: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"


@task(name="generate", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def generate_task(prompts_path: str, out_path: str, policy_path: str, settings: GenerateSettings, seed: int) -> dict:
    return generate_completions(prompts_path, out_path, policy_path, **settings.keywords(), seed=seed)
