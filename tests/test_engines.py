"""The generation-engine interface (tasks/engines): the registry, and the contract every
engine keeps, run against each registered engine. vLLM's own tests (weight sync, flow,
resume, reproducibility) are in tests/test_engines_vllm.py; its contract runs here on the one
engine the whole test session shares (creating one costs ~30 s with its warm-up)."""

from __future__ import annotations

import math

import pytest
import torch

from tasks import engines
from tasks.engines import ENGINES, SamplingSettings, engine_for, pick, register_engine
from tasks.engines.hf import eos_ids
from tasks.model import live_policy


def test_registry_rejects_a_duplicate_and_names_the_known_engines():
    assert {"hf", "vllm"} <= set(ENGINES)
    with pytest.raises(ValueError, match="'hf' is registered already"):
        register_engine("hf", lambda: None)
    with pytest.raises(ValueError, match="unknown generation engine 'sglang'; known: hf, vllm"):
        pick("sglang")


def test_a_missing_optional_engine_is_reported_before_the_run(monkeypatch):
    import importlib.util

    from tasks.engines import check_available

    check_available("hf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="generation engine 'vllm' needs the 'vllm' package: make install-vllm"):
        check_available("vllm")


@pytest.fixture(params=["hf", pytest.param("vllm", marks=[pytest.mark.optional, pytest.mark.slow])])
def engine_name(request):
    if request.param == "vllm":
        from tests.conftest import require

        require("vllm", "vllm")
    return request.param


def _prompts(tokenizer) -> list[list[int]]:
    texts = ["12+34=", "7+5=", "99+1=", "3+3="]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _forward_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
    """log softmax(logits / T)[token] of each completion token, one unpadded sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()  # (C, V)
    return (
        torch.log_softmax(logits / temperature, -1)
        .gather(-1, torch.tensor(completion).unsqueeze(-1))
        .squeeze(-1)
        .tolist()
    )


# Numerical agreement of the sampler's log-probs with a transformers fp32 forward: the HF
# engine's come from generate's KV-cache logits of the same model; vLLM's from its own kernels.
TOLERANCE = {"hf": 1e-4, "vllm": 1e-3}


def test_engine_contract(engine_name, tiny_model_dir):
    """G samples per prompt, group members adjacent, finish reasons that agree with the
    tokens, the sampler's log-probs equal to a forward pass, greedy = argmax."""
    policy = live_policy(str(tiny_model_dir), "cpu", "float32")
    engine = engine_for(engine_name, str(tiny_model_dir), policy)
    prompts = _prompts(policy.tokenizer)
    stops = eos_ids(policy.model, policy.tokenizer)
    settings = SamplingSettings(max_new_tokens=6, temperature=0.8, batch_size=5)
    samples = engine.sample(prompts, 3, settings, seed=11)
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for s in samples:
        assert 1 <= len(s.completion_ids) <= 6
        if s.finish_reason == "eos":
            assert s.completion_ids[-1] in stops and not set(s.completion_ids[:-1]) & set(stops)
        else:
            assert s.finish_reason == "length" and len(s.completion_ids) == 6 and not set(s.completion_ids) & set(stops)
        assert len(s.logprobs) == len(s.completion_ids) and all(math.isfinite(x) and x <= 0 for x in s.logprobs)
        want = _forward_logprobs(policy.model, prompts[s.prompt_index], s.completion_ids, 0.8)
        assert s.logprobs == pytest.approx(want, abs=TOLERANCE[engine_name])

    greedy = engine.sample(prompts, 1, SamplingSettings(max_new_tokens=4, greedy=True, with_logprobs=False))
    for s, prompt in zip(greedy, prompts, strict=True):
        assert s.logprobs is None
        seq = list(prompt)
        for tok in s.completion_ids:  # every greedy token is the argmax after the ones before it
            with torch.no_grad():
                assert tok == int(policy.model(torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(tok)


def test_with_top_p_the_sampler_logprobs_are_of_the_nucleus(engine_name, tiny_model_dir):
    """top_p < 1: every engine records the log-prob under the renormalised nucleus it drew
    from (what it really sampled), and never draws outside it."""
    from transformers import TopPLogitsWarper

    policy = live_policy(str(tiny_model_dir), "cpu", "float32")
    engine = engine_for(engine_name, str(tiny_model_dir), policy)
    prompts = _prompts(policy.tokenizer)
    nucleus = TopPLogitsWarper(top_p=0.6)
    for s in engine.sample(prompts, 3, SamplingSettings(max_new_tokens=5, temperature=0.9, top_p=0.6), seed=4):
        seq = prompts[s.prompt_index] + s.completion_ids
        with torch.no_grad():
            logits = (
                policy.model(torch.tensor([seq])).logits[0, len(prompts[s.prompt_index]) - 1 : -1].float() / 0.9
            )  # (C, V)
        want = (
            torch.log_softmax(nucleus(None, logits), -1)
            .gather(-1, torch.tensor(s.completion_ids).unsqueeze(-1))
            .squeeze(-1)
        )
        assert torch.isfinite(want).all()  # inside the nucleus
        assert s.logprobs == pytest.approx(want.tolist(), abs=TOLERANCE[engine_name])


def test_engine_follows_the_updated_policy(engine_name, tiny_model_dir):
    """After the live policy changes (a new path for the same model object, as the update
    stage leaves it), `engine_for` syncs the engine: greedy output follows the new weights."""
    policy = live_policy(str(tiny_model_dir), "cpu", "float32")
    prompts = _prompts(policy.tokenizer)
    greedy = SamplingSettings(max_new_tokens=5, greedy=True, with_logprobs=False)
    before = [s.completion_ids for s in engine_for(engine_name, str(tiny_model_dir), policy).sample(prompts, 1, greedy)]
    with torch.no_grad():
        policy.model.lm_head.weight.add_(torch.randn_like(policy.model.lm_head.weight) * 2.0)  # tied: the embedding too
    after = [
        s.completion_ids
        for s in engine_for(engine_name, str(tiny_model_dir) + "@updated", policy).sample(prompts, 1, greedy)
    ]
    for prompt, got in zip(prompts, after, strict=True):  # the engine samples from the changed weights
        with torch.no_grad():
            assert got[0] == int(policy.model(torch.tensor([prompt])).logits[0, -1].argmax())
    assert after != before


def test_hf_engine_is_reproducible_per_seed(tiny_model_dir):
    policy = live_policy(str(tiny_model_dir), "cpu", "float32")
    engine = engine_for("hf", str(tiny_model_dir), policy)
    prompts = _prompts(policy.tokenizer)
    settings = SamplingSettings(max_new_tokens=6)
    runs = [
        [(s.completion_ids, s.logprobs) for s in engine.sample(prompts, 4, settings, seed=seed)] for seed in (3, 3, 4)
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_changed_engine_options_rebuild_the_engine(tiny_model_dir, monkeypatch):
    made = []

    class Counting(engines.Engine):
        def __init__(self, **options):
            made.append(options)

        def load(self, model, tokenizer):
            pass

        def sync(self, weights):
            pass

        def sample(self, prompt_ids, num_samples, settings, seed=None, desc="generate"):
            return []

    monkeypatch.setitem(ENGINES, "counting", Counting)
    policy = live_policy(str(tiny_model_dir), "cpu", "float32")
    for options in ({"a": 1}, {"a": 1}, {"a": 2}):
        engine_for("counting", str(tiny_model_dir), policy, options)
    engines._ACTIVE.pop("counting")
    assert made == [{"a": 1}, {"a": 2}]
