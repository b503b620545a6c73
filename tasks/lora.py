"""LoRA adapters on the policy (peft; the optional `lora` extra: `make install-lora`).

With `lora_rank` R > 0 the policy is the frozen base model plus low-rank adapters
(Hu et al. 2021, arXiv:2106.09685): W x + (alpha / R) B A x, A (R x in) and B (out x R),
B = 0 at the start so the adapted policy starts equal to the base. Only A and B train, so
the update holds gradients and AdamW state for them alone (a few percent of the weights).

The reference model of the KL term is the base model, which is exactly the policy's own
frozen weights with the adapter switched off: `reference_weights(model)` is that view, so
no second copy is ever loaded (the generate stage loads none). A policy without an adapter
yet (the first iteration, before the update has put one on) *is* the base.

Checkpoints hold the adapter (`adapter_model.safetensors`, `adapter_config.json`, which
names the base folder), the tokenizer and the optimiser state: a resumed run loads the base,
puts the saved adapter on it, trainable, and continues exactly. `merged_copy` is
W + (alpha / R) B A as a plain transformers model (`final/`: tasks.model.save_checkpoint with
`merge_adapter`), loadable with no peft.

Dropout defaults to 0: in RL the log-probs of the update must be those of the policy that
sampled (ratio 1 at the first step); dropout in train mode would make them differ.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
# Every linear layer of the transformer blocks, never the output head (peft's "all-linear");
# the QLoRA paper (arXiv:2305.14314, sec. 4) found adapters on all of them needed to match
# full fine-tuning.
DEFAULT_TARGETS = "all-linear"


@dataclass(frozen=True)
class LoraSettings:
    rank: int  # R
    alpha: float | None = None  # scale alpha / R; None: 2 R (alpha / R = 2)
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None: every linear layer of the blocks

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1 (got {self.rank})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1) (got {self.dropout})")


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs peft: make install-lora (pip install -e '.[lora]')") from None
    return peft


def is_adapted(model) -> bool:
    """True for a peft model (a policy that carries an adapter)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def is_adapter_checkpoint(path: str | Path) -> bool:
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def add_adapter(model, settings: LoraSettings, base_path: str, seed: int = 0):
    """`model` with fresh LoRA adapters on `settings.target_modules`; base weights frozen.
    `base_path` is written into the adapter config, so a checkpoint names its base. A is
    drawn from its own generator seeded with `seed` (B = 0), so a run is reproducible
    whatever the global RNG has done before."""
    import torch

    peft = _peft()
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha if settings.alpha is not None else 2 * settings.rank,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules) if settings.target_modules else DEFAULT_TARGETS,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapted = peft.get_peft_model(model, config)
    adapted.peft_config["default"].base_model_name_or_path = _absolute(base_path)
    return adapted


def _absolute(path: str) -> str:
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def load_adapted(path: str | Path, load_base):
    """The base model named by the checkpoint's adapter config, with the saved adapter on it,
    trainable. `load_base(base_path)` loads the base (tasks.model.load_model's arguments bound)."""
    peft = _peft()
    config = peft.PeftConfig.from_pretrained(str(Path(path).expanduser()))
    base = load_base(config.base_model_name_or_path)
    return peft.PeftModel.from_pretrained(base, str(Path(path).expanduser()), is_trainable=True)


def reference_weights(model):
    """Context in which `model` computes the reference (base) policy: the adapter disabled.
    A model without an adapter is its own base."""
    return model.disable_adapter() if is_adapted(model) else nullcontext()


def trainable_parameters(model) -> list:
    """The parameters the optimiser steps: the adapters' with LoRA, every one without."""
    return [p for p in model.parameters() if p.requires_grad]


def merged_copy(model):
    """A plain transformers model with W + (alpha / R) B A in every adapted layer; `model`
    itself is left as it is (the live policy keeps training)."""
    if not is_adapted(model):
        return model
    return copy.deepcopy(model).merge_and_unload()


def merged_weights(model):
    """(name, tensor) of the merged weights under the base model's own names (W + (alpha / R)
    B A for adapted layers, the base weights otherwise), without copying the model: what an
    inference engine's in-place weight sync needs after each update. A model without an
    adapter yields its own state."""
    if not is_adapted(model):
        yield from model.state_dict().items()
        return
    import torch

    lm = model.get_base_model()
    adapted = {
        name: module
        for name, module in lm.named_modules()
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")
    }
    with torch.no_grad():
        for name, tensor in lm.state_dict().items():
            if "lora_" in name:
                continue
            owner, _, leaf = name.rpartition(".")
            clean = name.replace(".base_layer", "")
            layer = adapted.get(owner.removesuffix(".base_layer"))
            if layer is not None and leaf == "weight" and owner.endswith(".base_layer") and layer.active_adapters:
                tensor = tensor + sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
            yield clean, tensor
