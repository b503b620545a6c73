"""Per-token log-probabilities of completions under a model, shared by the generation stage
(reference log-probs) and the update stage (current-policy log-probs).

Both use one batch layout, the same one ``generate`` sees, so the log-probs recorded at
sampling time and those recomputed in the update agree (the ratio starts at exactly 1)::

    [pad pad p1 p2 p3 | c1 c2 c3 pad]     attention_mask 0 for pads
    position_ids count real tokens only   (left padding must not shift positions)

The vocabulary-sized part (output head, log-softmax, entropy) runs on chunks of completion
positions taken from the final hidden states (`chunked_completion_logprobs`), so memory grows
with the chunk, not with batch x completion length x vocabulary: at SmolLM2-135M (49k
vocabulary) one (B, C, V) fp32 tensor is 0.2 GB per 1,000 completion tokens, and the
whole-logits backward held several (benchmarks/RESULTS.md, `bench_memory.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.utils.checkpoint


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, P + C)
    attention_mask: torch.Tensor  # (B, P + C)
    position_ids: torch.Tensor  # (B, P + C)
    completion_ids: torch.Tensor  # (B, C)
    completion_mask: torch.Tensor  # (B, C) 1.0 on real completion tokens


def pack(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> PackedBatch:
    """Left-pad prompts and right-pad completions into one batch."""
    width_p = max(len(p) for p in prompts)
    width_c = max(max((len(c) for c in completions), default=0), 1)
    batch = len(prompts)
    ids = torch.full((batch, width_p + width_c), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width_p + width_c), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, width_p - len(p) : width_p] = torch.as_tensor(p, dtype=torch.long)
        ids[i, width_p : width_p + len(c)] = torch.as_tensor(c, dtype=torch.long)
        mask[i, width_p - len(p) : width_p + len(c)] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return PackedBatch(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=position_ids.to(device),
        completion_ids=ids[:, width_p:].to(device),
        completion_mask=mask[:, width_p:].to(device, torch.float32),
    )


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T)[token], without materialising the (..., V) log-softmax twice."""
    logits = logits.float()  # (..., V)
    if temperature != 1.0:  # a division would be one more vocabulary-sized temporary
        logits = logits / temperature
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (...)


def token_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy of softmax(logits / T), no gradient (a metric).  (..., V) -> (...)"""
    with torch.no_grad():
        dist = torch.log_softmax(logits.float() / temperature, dim=-1)
        return -(dist.exp() * dist).sum(-1)


# Causal LMs whose logits are exactly ``lm_head(final hidden state)``: for them the head can
# run on chunks of positions. Others (soft-capped or scaled logits: Gemma 2, Cohere, Granite)
# take the whole-logits path, which is right for any model.
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {"llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mistral", "mixtral", "phi3", "olmo2", "smollm3"}
)

# 256 positions: at SmolLM2-135M (49k vocabulary) with 2 x 1,024-token completions the
# reference forward's peak went 1,462 -> 1,119 MiB from 1,024, and the update's (LoRA, with
# an allocator that returns freed memory) 2,159 -> 1,433 MiB, at the same time per update
# (benchmarks/RESULTS.md section 10). A chunk's head matmul (256 x hidden x vocabulary) is
# still large enough to keep the cores busy.
DEFAULT_CHUNK_TOKENS = 256


def causal_lm(model):
    """The transformers causal LM inside `model` (a peft wrapper hands back its base model,
    whose layers carry the adapters)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def plain_head(model) -> bool:
    lm = causal_lm(model)
    return getattr(lm.config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES and lm.get_output_embeddings() is not None


def _chunk_logprobs(head, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float, with_entropy: bool):
    """log pi and entropy of `n` positions from their final hidden states.  (n, H), (n,) -> (n,), (n,)"""
    logits = head(hidden)  # (n, V): the only vocabulary-sized tensor, one chunk's worth
    logp = token_logprobs(logits, tokens, temperature)
    return logp, (token_entropy(logits, temperature) if with_entropy else None)


def chunked_completion_logprobs(model, batch: PackedBatch, temperature: float, with_entropy: bool, chunk_tokens: int):
    """`completion_logprobs` computed `chunk_tokens` completion positions at a time from the
    final hidden states, so no (B, C, V) logits tensor ever exists.

    Only real completion tokens are computed (padding gets log-prob 0 and entropy 0; every
    consumer masks it). With gradients, each chunk runs under non-reentrant activation
    checkpointing: its logits are freed after the forward and recomputed, one chunk at a
    time, in the backward pass, so peak memory grows with the chunk, not with the sequence,
    for one more head forward per token. The arithmetic per position is that of the
    whole-logits path (same head, same fp32 log-softmax), so values and gradients agree
    (tests/test_logprobs.py).
    """
    lm = causal_lm(model)
    width_c = batch.completion_ids.shape[1]
    body = getattr(lm, lm.base_model_prefix)
    hidden = body(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state[:, -width_c - 1 : -1]  # (B, C, H): the state at t predicts token t + 1
    real = batch.completion_mask > 0  # (B, C)
    states, tokens = hidden[real], batch.completion_ids[real]  # (N, H), (N,)
    head = lm.get_output_embeddings()
    logp_parts, entropy_parts = [], []
    recompute = torch.is_grad_enabled() and states.requires_grad and states.shape[0] > chunk_tokens
    for start in range(0, states.shape[0], chunk_tokens):
        args = (
            head,
            states[start : start + chunk_tokens],
            tokens[start : start + chunk_tokens],
            temperature,
            with_entropy,
        )
        if recompute:
            logp, entropy = torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:  # one chunk (nothing to save by recomputing) or no graph (reference/old-policy forward)
            logp, entropy = _chunk_logprobs(*args)
        logp_parts.append(logp)
        entropy_parts.append(entropy)
    zeros = torch.zeros(real.shape, dtype=torch.float32, device=states.device)  # (B, C)
    logp = zeros.masked_scatter(real, torch.cat(logp_parts)) if logp_parts else zeros  # (B, C)
    if not with_entropy:
        return logp
    entropy = zeros.masked_scatter(real, torch.cat(entropy_parts)) if entropy_parts else zeros  # (B, C)
    return logp, entropy


def completion_logprobs(
    model,
    batch: PackedBatch,
    temperature: float,
    with_entropy: bool = False,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
):
    """log pi(c_t | prompt, c_<t) for every completion position: (B, C) (and entropy (B, C)).

    `chunk_tokens` set (and a model whose logits are a plain head over the last hidden state):
    the head and log-softmax run that many positions at a time (`chunked_completion_logprobs`);
    None: one forward returning the (B, C, V) logits, the reference the chunked path is
    tested against."""
    if chunk_tokens is not None and plain_head(model):
        return chunked_completion_logprobs(model, batch, temperature, with_entropy, chunk_tokens)
    width_c = batch.completion_ids.shape[1]
    # Only the C positions that predict completion tokens need logits: with a large vocabulary
    # that is most of the forward pass's memory.
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=width_c + 1,
        use_cache=False,
    ).logits[:, :-1]  # (B, C, V): logit at position t predicts token t + 1
    logp = token_logprobs(logits, batch.completion_ids, temperature)
    if not with_entropy:
        return logp
    return logp, token_entropy(logits, temperature)


@torch.no_grad()
def batched_completion_logprobs(
    model,
    prompts,
    completions,
    pad_id: int,
    temperature: float,
    batch_size: int,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> list[list[float]]:
    """`completion_logprobs` over many rows, `batch_size` at a time, unpadded per row."""
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        chunk_c = completions[start : start + batch_size]
        batch = pack(prompts[start : start + batch_size], chunk_c, pad_id, device)
        logp = completion_logprobs(model, batch, temperature, chunk_tokens=chunk_tokens).cpu()
        out.extend(logp[i, : len(c)].tolist() for i, c in enumerate(chunk_c))
    return out
