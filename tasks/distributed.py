"""The update stage on N ranks of one torch.distributed process group (gloo on CPU, NCCL on
GPU): DDP for a model that fits one device, FSDP2 (`fully_shard`) for one that does not.

Who starts the ranks and the process group is not decided here (flows/cluster/: Ray actors,
or any launcher that calls `torch.distributed.init_process_group`): with no process group the
update runs as one rank and nothing here changes it.

Why the step is the same whatever the number of ranks: the optimiser step's micro-batches are
cut exactly as on one rank and dealt out round-robin (rank r takes micro-batches r, r + N, ...),
so every micro-batch is the same tensor computation as on one rank, and the loss normalisers
(BatchTotals: B, sum |o_i|, M) stay those of the whole optimisation batch. Each rank's loss
share is multiplied by N because DDP and FSDP2 *average* gradients over ranks: the average of
N x (rank's sum) is the sum over every micro-batch, which is what one rank accumulates. Only
the order of the floating-point additions differs (about 1e-7 relative).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process's default group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def deal(items: list, rank: int, world: int, even: bool = False) -> list[tuple[object, bool]]:
    """This rank's share of `items` (round-robin), each with `counts`=True. Padding passes
    (items[0] with counts=False, run with zero weight) make collectives meet on every rank: one
    for a rank left with none (DDP: the gradient synchronisation); with `even`, as many as
    make every rank's share equally long (FSDP2: every forward all-gathers parameters)."""
    mine = [(item, True) for item in items[rank::world]]
    length = -(-len(items) // world) if even else max(len(mine), 1)
    return mine + [(items[0], False)] * (length - len(mine))


class CompletionLogprobs(torch.nn.Module):
    """The update's forward (tasks.logprobs.completion_logprobs) as one module call, so that
    DDP's and FSDP2's hooks run around all of it, whichever path it takes inside (whole
    logits, or the body and the head called separately, chunk by chunk)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, temperature: float, with_entropy: bool = False, chunk_tokens: int | None = None):
        from tasks.logprobs import completion_logprobs

        return completion_logprobs(self.model, batch, temperature, with_entropy=with_entropy, chunk_tokens=chunk_tokens)


def _ddp(model: torch.nn.Module) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    # Every trainable parameter gets a gradient from every micro-batch, so unused-parameter
    # search (an extra traversal per backward) is not needed.
    return DistributedDataParallel(
        CompletionLogprobs(model), device_ids=[device.index] if device.type == "cuda" else None
    )


def _fsdp2(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    # One FSDP unit per transformer block (transformers lists their classes in
    # _no_split_modules), then the root around the whole forward: the embeddings and the head
    # (tied or not) stay in the root unit, so a tied weight is one parameter.
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    return fully_shard(CompletionLogprobs(model))


@dataclass(frozen=True)
class Parallelism:
    wrap: Callable[[torch.nn.Module], torch.nn.Module]  # model -> the module whose call is the training forward
    sharded: bool  # parameters are DTensor shards (state dicts must be gathered)


PARALLELISMS: dict[str, Parallelism] = {
    "ddp": Parallelism(_ddp, sharded=False),
    "fsdp2": Parallelism(_fsdp2, sharded=True),
}


def pick_parallelism(name: str) -> Parallelism:
    if name not in PARALLELISMS:
        raise ValueError(f"unknown parallelism '{name}'; known: {', '.join(sorted(PARALLELISMS))}")
    return PARALLELISMS[name]


@contextlib.contextmanager
def gradient_sync(trainer: torch.nn.Module | None, last: bool) -> Iterator[None]:
    """Synchronise gradients across ranks only on the last micro-batch of a step (the others
    accumulate locally): DDP's no_sync, FSDP2's set_requires_gradient_sync."""
    if hasattr(trainer, "no_sync"):  # DDP
        with contextlib.nullcontext() if last else trainer.no_sync():
            yield
    elif hasattr(trainer, "set_requires_gradient_sync"):  # FSDP2
        trainer.set_requires_gradient_sync(last)
        yield
    else:  # one rank
        yield


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """clip_grad_norm_ over every parameter; with FSDP2 the norm is a DTensor reduced over ranks."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm.item())


def _reduce(values: list[float], op) -> list[float]:
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.cpu().tolist()


def max_over_ranks(values: list[float]) -> list[float]:
    """Each entry's maximum over every rank. No-op on one rank."""
    return list(values) if rank_and_world()[1] == 1 else _reduce(values, dist.ReduceOp.MAX)


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each key summed over every rank (float64, in a fixed key order). No-op on one rank."""
    if rank_and_world()[1] == 1:
        return dict(values)
    keys = sorted(values)
    return dict(zip(keys, _reduce([values[k] for k in keys], dist.ReduceOp.SUM)))


def full_state_dict(
    model: torch.nn.Module, trainer: torch.nn.Module | None, sharded: bool
) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on CPU, under the model's own names, on rank 0 (None
    elsewhere). With FSDP2 (`trainer` the sharded wrapper) every rank must call it (an
    all-gather)."""
    rank, _ = rank_and_world()
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(trainer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # A tied weight (lm_head = embeddings) comes back under both names as two tensors; keep
        # the first name only, as save_pretrained does for the one-process model.
        aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {
            n for n, _ in model.named_parameters()
        }
        state = {k.removeprefix("model."): v for k, v in state.items()}  # CompletionLogprobs holds the model as .model
        return {k: v for k, v in state.items() if k not in aliases} if rank == 0 else None
    if rank != 0:
        return None
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict | None:
    """The optimiser's state_dict in the one-process layout (state keyed by parameter index),
    so a checkpoint resumes on any number of ranks; on rank 0, None elsewhere. FSDP2: gathered."""
    rank, _ = rank_and_world()
    if not sharded:
        return optimizer.state_dict() if rank == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    by_name = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if rank != 0:
        return None
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    groups = [g | {"params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
    return {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, sharded: bool
) -> None:
    """Inverse of `full_optimizer_state` (every rank passes the same full state)."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    by_name = {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [g | {"params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
