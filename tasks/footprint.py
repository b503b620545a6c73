"""What a run will hold in memory, known before it starts: the policy's shape from its config
alone (no weights loaded), the longest prompt in tokens, and an estimate of the update's
peak memory against what the machine has. `grpo run` prints these in its start block.

The estimate (`update_peak_bytes`) is the process's resident peak during the update:

    base (Python, torch, Prefect, pyarrow: ~0.75 GiB, the tiny demo's peak RSS)
  + weights + gradients + AdamW's two moments      (4 x trained params x dtype bytes;
                                                     frozen weights count once)
  + activations kept for the backward pass          per micro-batch token and layer,
        without checkpointing: (10 h + 4.5 I) values + attention probabilities (heads x seq)
        with checkpointing:    h values per layer, plus one layer's full set (recomputed)
  + logits of one chunk of completion positions     x vocabulary x 4 bytes x 3 (logits,
                                                     log-softmax, their gradient)

h = hidden size, I = MLP width. The two activation coefficients were fitted to SmolLM2-135M
on CPU (benchmarks/RESULTS.md section 6: micro-batch 8, 217-token rows, fp32): measured
peaks 5.4 GiB (5,565 MiB) without checkpointing and 3.3 GiB (3,333 MiB) with it; this
formula gives 5.7 and 3.1 GiB there, and 26 GiB at micro-batch 64, where the measured run was
OOM-killed at 20.4 GiB. It is an estimate for spotting a run that cannot fit, not a guarantee.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

BASE_BYTES = int(0.75 * 2**30)


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int


def model_shape(path: str | Path) -> ModelShape:
    """Parameter count and sizes of a model folder (or cached hub name), built on the meta
    device: nothing is allocated and no weight file is read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    return ModelShape(
        parameters=sum(p.numel() for p in model.parameters()),
        layers=int(getattr(config, "num_hidden_layers", 0) or 0),
        hidden=hidden,
        intermediate=int(getattr(config, "intermediate_size", 0) or 4 * hidden),
        heads=int(getattr(config, "num_attention_heads", 0) or 1),
        vocab=int(getattr(config, "vocab_size", 0) or 0),
    )


def update_peak_bytes(
    shape: ModelShape,
    *,
    micro_batch: int,
    sequence: int,
    completion: int,
    dtype_bytes: int,
    checkpointing: bool,
    logprob_chunk_tokens: int,
    trained_parameters: int | None = None,
) -> int:
    """The update's estimated peak resident memory (module docstring), in bytes."""
    trained = shape.parameters if trained_parameters is None else trained_parameters
    frozen = shape.parameters - trained
    static = (4 * trained + frozen) * dtype_bytes  # weights, gradients, AdamW exp_avg and exp_avg_sq
    tokens = micro_batch * sequence
    layer_values = 10 * shape.hidden + 4.5 * shape.intermediate + shape.heads * sequence  # per token
    if checkpointing:
        activations = tokens * (shape.layers * shape.hidden + layer_values) * dtype_bytes
    else:
        activations = tokens * shape.layers * layer_values * dtype_bytes
    positions = micro_batch * completion
    if logprob_chunk_tokens:
        positions = min(positions, logprob_chunk_tokens)
    logits = positions * shape.vocab * 4 * 3
    return int(BASE_BYTES + static + activations + logits)


def lora_trained_parameters(shape: ModelShape, rank: int) -> int:
    """About the adapter's size with peft's all-linear targets: rank x (inputs + outputs) of
    each block's q, k, v, o (h -> h, kv heads counted as h: an upper bound) and gate, up,
    down (h <-> I) projections."""
    return rank * shape.layers * (4 * 2 * shape.hidden + 3 * (shape.hidden + shape.intermediate))


def machine_memory_bytes(device: str) -> tuple[int, str]:
    """(bytes, what they are) of the memory the update runs in: the GPU's, or the RAM (the
    cgroup's limit when lower)."""
    if device.startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(torch.device(device))
        return props.total_memory, f"GPU memory ({props.name})"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = Path("/sys/fs/cgroup/memory.max")
    if limit.is_file() and limit.read_text().strip().isdigit():
        total = min(total, int(limit.read_text().strip()))
    return total, "RAM"


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"
