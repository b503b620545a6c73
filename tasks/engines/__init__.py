"""Generation engines: who samples the completions. The generate and evaluate stages do not care.

One small interface, several implementations, picked by name from `ENGINES`::

    engine = make_engine("hf")                       # or "vllm" (optional extra: make install-vllm)
    engine.load(model, tokenizer)                    # the policy to sample from (kept, not copied, by hf)
    engine.sync(model.state_dict().items())          # after an update: the new weights, in place
    samples = engine.sample(prompt_ids, G, SamplingSettings(max_new_tokens=64), seed=7)
    samples[k].completion_ids, .finish_reason, .logprobs   # G samples per prompt, group members adjacent

`Sample.logprobs` are the sampler's own per-token log-probs of the tokens it drew (the
`sampler_logprobs` column of generations.parquet): log of the distribution it actually drew
from, softmax(logits / T) renormalised over the nucleus when top_p < 1 (so with top_p = 1
they stand on the trainer's footing, and every engine means the same thing by them). The update compares them with the
trainer's own log-probs (the train/inference mismatch metric and its correction,
tasks/objective.py).

Engines live for the whole flow run (creating a vLLM engine costs ~16 s on 2 CPU cores):
`engine_for(name, policy_path, policy)` returns this process's one engine of that kind,
loaded with, or synced to, the live policy checkpointed at `policy_path` (tasks/model.py).
A worker process that receives weights from elsewhere (a Ray actor, say) calls `load` once
and `sync` after every update itself.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

from tasks.engines.base import Engine, Sample, SamplingSettings

__all__ = ["Engine", "Sample", "SamplingSettings", "check_available", "engine_for", "pick"]


# name -> factory(**options): the options are the engine's own settings (vLLM's memory share).
ENGINES: dict[str, Callable[..., Engine]] = {}


# name -> (module it needs, how to install it), for engines that live in an optional extra.
REQUIREMENTS: dict[str, tuple[str, str]] = {}


def register_engine(name: str, factory: Callable[..., Engine], requires: tuple[str, str] | None = None) -> None:
    """Add an engine kind; a name can be registered once. `requires`: (module, install hint)."""
    if name in ENGINES:
        raise ValueError(f"generation engine '{name}' is registered already")
    ENGINES[name] = factory
    if requires is not None:
        REQUIREMENTS[name] = requires


def check_available(name: str) -> None:
    """Fail in one line, before any stage runs, for an unknown engine or one whose optional
    package is not installed (without importing it: importing vLLM takes seconds)."""
    import importlib.util

    pick(name)
    if name in REQUIREMENTS:
        module, hint = REQUIREMENTS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"generation engine '{name}' needs the '{module}' package: {hint}")


def pick(name: str) -> Callable[..., Engine]:
    """The factory of engine `name`, or a ValueError listing the known ones."""
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown generation engine '{name}'; known: {', '.join(ENGINES)}") from None


def make_engine(name: str, **options) -> Engine:
    return pick(name)(**options)


@dataclass
class _Active:
    engine: Engine
    options: dict
    model: weakref.ref  # the model object it was loaded from (weak: never keeps a dropped policy alive)
    synced: str  # the policy path whose weights it holds


# This process's engines, one per kind.
_ACTIVE: dict[str, _Active] = {}


def engine_for(name: str, policy_path: str, policy, options: dict | None = None) -> Engine:
    """This process's engine `name`, sampling from `policy` (a tasks.model.LivePolicy) as
    checkpointed at `policy_path`: created and loaded the first time (or when `options`
    changed), synced in place when the policy has been updated since (a new path for the
    same model object), re-loaded when the process holds another model object (a resumed
    run, another test)."""
    options = options or {}
    active = _ACTIVE.get(name)
    if active is not None and active.options != options:
        _ACTIVE.pop(name).engine.close()
        active = None
    if active is None:
        active = _Active(make_engine(name, **options), options, lambda: None, "")
    if active.model() is not policy.model:
        active.engine.load(policy.model, policy.tokenizer)
    elif active.synced != policy_path and not active.engine.samples_the_live_policy:
        from tasks.lora import merged_weights  # a LoRA policy's weights with the adapter merged in

        active.engine.sync(merged_weights(policy.model))
    active.model, active.synced = weakref.ref(policy.model), policy_path
    _ACTIVE[name] = active
    return active.engine


def close_engines() -> None:
    """Free every engine of this process (the end of a flow run's process, tests)."""
    while _ACTIVE:
        _ACTIVE.popitem()[1].engine.close()


def _hf() -> Engine:
    from tasks.engines.hf import HFEngine

    return HFEngine()


def _vllm(**options) -> Engine:
    # Imported on first use only: vLLM is an optional extra (make install-vllm).
    from tasks.engines.vllm import VLLMEngine

    return VLLMEngine(**options)


register_engine("hf", _hf)
register_engine("vllm", _vllm, requires=("vllm", "make install-vllm"))
