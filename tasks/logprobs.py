"""Per-token log-probabilities of completions under a model, shared by the generation stage
(reference log-probs) and the update stage (current-policy log-probs).

Both use one batch layout, the same one ``generate`` sees, so the log-probs recorded at
sampling time and those recomputed in the update agree (the ratio starts at exactly 1)::

    [pad pad p1 p2 p3 | c1 c2 c3 pad]     attention_mask 0 for pads
    position_ids count real tokens only   (left padding must not shift positions)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, P + C)
    attention_mask: torch.Tensor  # (B, P + C)
    position_ids: torch.Tensor  # (B, P + C)
    completion_ids: torch.Tensor  # (B, C)
    completion_mask: torch.Tensor  # (B, C) 1.0 on real completion tokens


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> PackedBatch:
    """Left-pad prompts and right-pad completions into one batch."""
    width_p = max(len(p) for p in prompts)
    width_c = max(max((len(c) for c in completions), default=0), 1)
    batch = len(prompts)
    ids = torch.full((batch, width_p + width_c), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width_p + width_c), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
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
    """log softmax(logits / T)[token], without materialising the (B, C, V) log-softmax twice."""
    logits = logits.float() / temperature  # (B, C, V)
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, C)


def completion_logprobs(model, batch: PackedBatch, temperature: float, with_entropy: bool = False):
    """log pi(c_t | prompt, c_<t) for every completion position: (B, C) (and entropy (B, C))."""
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
    with torch.no_grad():
        dist = torch.log_softmax(logits.float() / temperature, dim=-1)
        entropy = -(dist.exp() * dist).sum(-1)  # (B, C)
    return logp, entropy


@torch.no_grad()
def batched_completion_logprobs(model, prompts, completions, pad_id: int, temperature: float, batch_size: int) -> list[list[float]]:
    """`completion_logprobs` over many rows, `batch_size` at a time, unpadded per row."""
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        chunk_c = completions[start : start + batch_size]
        batch = pack(prompts[start : start + batch_size], chunk_c, pad_id, device)
        logp = completion_logprobs(model, batch, temperature).cpu()
        out.extend(logp[i, : len(c)].tolist() for i, c in enumerate(chunk_c))
    return out
