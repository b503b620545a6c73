"""Chunked log-probs (tasks/logprobs.py) against the whole-logits path: same values, same
gradients (1e-6, fp32), and no vocabulary-sized tensor larger than one chunk."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tasks.logprobs import batched_completion_logprobs, completion_logprobs, pack, plain_head
from tasks.update import set_activation_checkpointing

PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]]
COMPLETIONS = [[12, 13, 40], [14, 15, 16, 17, 90, 91], [18], [20, 21, 22, 23, 24]]
SIZES = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=32,
)


def _models():
    torch.manual_seed(0)
    yield "qwen2-tied", Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=True))
    torch.manual_seed(1)
    yield "llama-untied", LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=False))


def _loss_and_grads(model, batch, chunk_tokens, temperature):
    """A loss that weights every position differently, so a misplaced position would show."""
    model.zero_grad(set_to_none=True)
    logp, entropy = completion_logprobs(
        model, batch, temperature, with_entropy=True, chunk_tokens=chunk_tokens
    )  # (B, C)
    weights = torch.arange(1, logp.numel() + 1, dtype=torch.float32).reshape(logp.shape) / logp.numel()
    ((logp * weights * batch.completion_mask).sum() + (logp.exp() * batch.completion_mask).sum()).backward()
    return logp.detach(), entropy, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_chunked_values_and_gradients_equal_the_whole_logits_path(checkpointing):
    batch = pack(PROMPTS, COMPLETIONS, 0, torch.device("cpu"))
    real = batch.completion_mask > 0
    for name, model in _models():
        assert plain_head(model)
        model.train()
        set_activation_checkpointing(model, checkpointing)
        for temperature in (1.0, 0.7):
            ref_logp, ref_entropy, ref_grads = _loss_and_grads(model, batch, None, temperature)
            for chunk in (1, 4, 7, 10_000):
                logp, entropy, grads = _loss_and_grads(model, batch, chunk, temperature)
                torch.testing.assert_close(logp[real], ref_logp[real], atol=1e-6, rtol=0, msg=f"{name} chunk {chunk}")
                # entropy (~4.6 nats here) is a sum over the vocabulary: float rounding of a
                # different matmul shape reaches ~1.4e-6 absolute, so relative 1e-6 on top
                torch.testing.assert_close(
                    entropy[real], ref_entropy[real], atol=1e-6, rtol=1e-6, msg=f"{name} chunk {chunk}"
                )
                assert (logp[~real] == 0).all() and (entropy[~real] == 0).all()
                assert grads.keys() == ref_grads.keys()
                for key, g in grads.items():
                    torch.testing.assert_close(g, ref_grads[key], atol=1e-6, rtol=0, msg=f"{name} chunk {chunk} {key}")


def test_the_head_never_sees_more_than_one_chunk_of_positions():
    batch = pack(PROMPTS, COMPLETIONS, 0, torch.device("cpu"))
    _, model = next(_models())
    rows: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda m, i, out: rows.append(out.shape[0] * (out.dim() == 2))
    )
    try:
        model.train()
        logp = completion_logprobs(model, batch, 1.0, chunk_tokens=4)
        logp.sum().backward()  # recomputes each chunk in the backward pass
    finally:
        hook.remove()
    tokens = int(batch.completion_mask.sum())
    assert rows and max(rows) <= 4
    assert sum(rows) == 2 * tokens  # forward once and recomputed once per real completion token, never padding


def test_batched_reference_logprobs_match_unchunked():
    _, model = next(_models())
    model.eval()
    chunked = batched_completion_logprobs(model, PROMPTS, COMPLETIONS, 0, 1.0, batch_size=3, chunk_tokens=5)
    whole = batched_completion_logprobs(model, PROMPTS, COMPLETIONS, 0, 1.0, batch_size=3, chunk_tokens=None)
    assert [len(r) for r in chunked] == [len(c) for c in COMPLETIONS]
    for a, b in zip(chunked, whole, strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-6, rtol=0)


def test_a_model_with_scaled_logits_takes_the_whole_logits_path():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(**SIZES, head_dim=8, final_logit_softcapping=5.0))
    assert not plain_head(model)
    batch = pack(PROMPTS, COMPLETIONS, 0, torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
        expected = (
            torch.log_softmax(logits[:, -batch.completion_ids.shape[1] - 1 : -1].float(), -1)
            .gather(-1, batch.completion_ids.unsqueeze(-1))
            .squeeze(-1)
        )
        got = completion_logprobs(model, batch, 1.0, chunk_tokens=2)
    real = batch.completion_mask > 0
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


def test_the_config_default_chunk_is_the_stages_default():
    """`grpo run` without --logprob-chunk-tokens and a stage function called directly (tests,
    benchmarks, a Ray worker) must cut log-probs into the same chunks: flows/config.py keeps
    its own literal so that `grpo --help` does not import torch."""
    from flows.config import GRPOConfig
    from tasks.logprobs import DEFAULT_CHUNK_TOKENS

    assert GRPOConfig.model_fields["logprob_chunk_tokens"].default == DEFAULT_CHUNK_TOKENS
