"""The engine protocol: what the generate stage asks of whoever samples (tasks/engines/),
in a module of its own so the table (tasks/engines/__init__.py) and each engine import it
without importing each other."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample; the same meaning for every engine."""

    max_new_tokens: int
    temperature: float = 1.0  # log-probs everywhere are of softmax(logits / temperature)
    top_p: float = 1.0  # nucleus mass; 1.0 = off
    greedy: bool = False  # argmax decoding (held-out evaluation); temperature/top_p unused
    batch_size: int = 256  # sequences per forward batch where the engine batches itself (hf)
    with_logprobs: bool = True  # record the sampler's per-token log-probs
    top_k: int = 0  # sample among the k most likely tokens; 0 = off
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability; 0 = off
    repetition_penalty: float = 1.0  # CTRL's penalty on tokens already in prompt or completion; 1 = off
    stop: tuple[str, ...] = ()  # a completion ends with the token that completes one of these ("stop")


@dataclass
class Sample:
    prompt_index: int
    completion_ids: list[int]  # includes the EOS token when the model stopped by itself
    finish_reason: str  # "eos" | "stop" (a stop string) | "length"
    logprobs: list[float] | None = None  # the sampler's log-prob of every completion token


class Engine(ABC):
    """Samples completions from one policy. `load` once, `sync` after every update."""

    name: str = ""
    # True when the engine samples from the live policy object itself (hf): nothing to sync.
    samples_the_live_policy: bool = False

    @abstractmethod
    def load(self, model, tokenizer) -> None:
        """Take the policy to sample from (a transformers causal LM and its tokenizer)."""

    @abstractmethod
    def sync(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the sampler's weights with these (name, tensor) pairs, names as in the
        model's ``state_dict()`` (tasks.lora.merged_weights for a LoRA policy); the engine
        stays up."""

    @abstractmethod
    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        num_samples: int,
        settings: SamplingSettings,
        seed: int | None = None,
        desc: str = "generate",
    ) -> list[Sample]:
        """`num_samples` completions of every prompt (token ids, no padding), group members
        adjacent: prompt 0's samples first. `seed` makes the draw reproducible as far as the
        engine allows (see each engine's docstring)."""

    def close(self) -> None:
        """Free what the engine holds (a vLLM engine's weights and KV cache)."""
