"""Loading, holding and saving the policy.

The policy and its optimiser stay in memory for the whole flow run (DESIGN.md): stages pass
*checkpoint paths*, and `live_policy(path)` returns the model the update stage left under
that path instead of re-reading it from disk. Only a path that no stage of this process
produced is loaded with ``from_pretrained`` (a local folder or a hub name).

Checkpoints are written atomically: ``save_pretrained`` into a temp folder beside the final
one, every file fsynced, then one rename. A crash mid-write leaves no ``checkpoint/``; a
full disk is found before the write starts (the model's size against the free space) or,
failing that, reported as `DiskFull` naming the folder, never as torch's zip-writer error.

A checkpoint can also be written in the background (`save_in_background`: the local flow's
way for checkpoints of BACKGROUND_SAVE_MIN_BYTES and more): the weights it writes are the live policy's, which nothing changes until the next
update, so that update (`update_policy` calls `wait_for_saves` first) and the end of the flow
are the only places that wait for it. A failed write is raised there, naming the folder.

A run ends with ``<run_dir>/final/``: the trained weights and tokenizer (safetensors, no
optimiser state), the folder to hand to ``from_pretrained``, vLLM or a model registry.
`export_final_model` writes it and `final_model_dir` finds it.
"""

from __future__ import annotations

import contextvars
import gc
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from data.crash_points import pause_point
from data.store import TMP_PREFIX, DiskFull, check_free_space, disk_full, is_no_space
from tasks.lora import is_adapted, is_adapter_checkpoint, load_adapted, merged_copy

OPTIMIZER_FILE = "optimizer.pt"
FINAL = "final"  # <run_dir>/final/: the trained model of a run

# Our stages draw their own progress bars; transformers' per-load and per-save bars would
# interleave with them on every iteration.
hf_logging.disable_progress_bar()


class ModelLoadError(RuntimeError):
    pass


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 halves memory and doubles matmul speed on GPUs; CPUs are faster and exact in fp32.
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _looks_local(name: str) -> bool:
    # A hub name is "model" or "org/model"; anything else, or anything on disk, is a path.
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def check_model_source(name: str) -> None:
    """Fail at once for a local model folder that is not there (before any stage runs)."""
    if _looks_local(name) and not Path(name).expanduser().is_dir():
        raise ModelLoadError(f"model folder '{name}' does not exist")


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """`from_pretrained` on a local folder or a hub name, with a one-line error on failure."""
    name = str(path)
    check_model_source(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            Path(name).expanduser() if _looks_local(name) else name, dtype=dtype
        )
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"cannot load model '{name}': {first_line}") from None
    return model.to(device)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    name = str(path)
    try:
        tok = AutoTokenizer.from_pretrained(Path(name).expanduser() if _looks_local(name) else name)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load tokenizer of '{name}': {str(err).strip().splitlines()[0]}") from None
    if tok.pad_token is None:
        # Causal LMs often ship without a pad token; padding is masked out, so EOS serves.
        tok.pad_token = tok.eos_token
    return tok


@dataclass
class LivePolicy:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    optimizer: torch.optim.Optimizer | None = None
    trainer: torch.nn.Module | None = None  # the DDP wrapper (FSDP2: the model itself) on N > 1 ranks


_LIVE: dict[str, LivePolicy] = {}


def _key(path: str | Path) -> str:
    return os.path.abspath(os.path.expanduser(str(path))) if _looks_local(str(path)) else str(path)


def live_policy(path: str | Path, device: str = "auto", dtype: str = "auto") -> LivePolicy:
    """The policy checkpointed (or about to be) at `path`: from memory if this process
    holds it, else loaded from disk together with its optimiser state when saved."""
    key = _key(path)
    if key not in _LIVE:
        dev = pick_device(device)
        _LIVE.clear()  # one policy per process: a run never needs an older one in memory
        gc.collect()
        dt = pick_dtype(dtype, dev)
        # A LoRA checkpoint holds the adapter only: its base is loaded and the adapter put on it.
        model = (
            load_adapted(path, lambda base: load_model(base, dev, dt))
            if is_adapter_checkpoint(path)
            else load_model(path, dev, dt)
        )
        _LIVE[key] = LivePolicy(model, load_tokenizer(path))
    return _LIVE[key]


def holds_live_policy(path: str | Path) -> bool:
    """True when this process holds the weights checkpointed (or due) at `path` in memory."""
    return _key(path) in _LIVE


def move_live_policy(old_path: str | Path, new_path: str | Path) -> None:
    """After an in-place update the weights under `old_path` are those of `new_path`."""
    _LIVE[_key(new_path)] = _LIVE.pop(_key(old_path))


def forget_live_policies() -> None:
    _LIVE.clear()
    gc.collect()


def read_optimizer_state(checkpoint: str | Path) -> dict | None:
    """The optimiser state saved beside a checkpoint's weights, or None."""
    state_file = Path(checkpoint) / OPTIMIZER_FILE
    if not state_file.exists():
        return None
    return torch.load(state_file, map_location="cpu", weights_only=True)


def adopt_weights(
    new_path: str | Path, state_dict: dict[str, torch.Tensor], skeleton: str | Path | None = None
) -> bool:
    """The update to `new_path` ran in other processes (training ranks): this process's live
    policy takes its weights and is known as `new_path` from now on. Holding none, `skeleton`
    (a checkpoint of the same architecture) is loaded first; without one nothing happens."""
    if not _LIVE:
        if skeleton is None:
            return False
        live_policy(skeleton)
    ((key, policy),) = _LIVE.items()
    policy.model.load_state_dict(state_dict, strict=False)  # a tied weight may be listed under one name only
    _LIVE.clear()
    _LIVE[_key(new_path)] = policy
    return True


def checkpoint_bytes(policy: LivePolicy, with_optimizer: bool = True, merge_adapter: bool = False) -> int:
    """About what `save_checkpoint` writes: the weights (a LoRA adapter alone unless merged),
    and AdamW's two moments per trained weight when the optimiser state goes with them (the
    tokenizer's files are negligible)."""
    params = list(policy.model.parameters())
    adapter_only = is_adapted(policy.model) and not merge_adapter
    weights = sum(p.numel() * p.element_size() for p in params if p.requires_grad or not adapter_only)
    moments = (
        sum(p.numel() * p.element_size() * 2 for p in params if p.requires_grad)
        if with_optimizer and policy.optimizer
        else 0
    )
    return weights + moments


def save_checkpoint(
    policy: LivePolicy,
    final: str | Path,
    merge_adapter: bool = False,
    with_optimizer: bool = True,
    state_dict: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """``save_pretrained`` (safetensors + tokenizer) and, unless `with_optimizer` is false,
    the optimiser state, atomically. A LoRA policy saves its adapter (what a resume needs),
    or with `merge_adapter` the merged weights as a plain transformers folder (what a user
    deploys). `state_dict` / `optimizer_state`: the whole weights and optimiser state gathered
    from sharded ranks (FSDP2), written instead of the policy's own (which are shards).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    needed = checkpoint_bytes(policy, with_optimizer, merge_adapter)
    check_free_space(final, needed)  # say so now, not as a half-written zip file
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}.", dir=final.parent))
    try:
        (merged_copy(policy.model) if merge_adapter else policy.model).save_pretrained(
            tmp, safe_serialization=True, state_dict=state_dict
        )
        policy.tokenizer.save_pretrained(tmp)
        if with_optimizer and optimizer_state is None and policy.optimizer is not None:
            optimizer_state = policy.optimizer.state_dict()
        if with_optimizer and optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        for file in tmp.iterdir():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
        pause_point(f"write {final}")  # crash tests stop here: a complete temp folder, no rename yet
        if final.exists():  # re-running a stage replaces its own older output
            shutil.rmtree(final)
        os.replace(tmp, final)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_no_space(err):
            raise disk_full(final, needed) from err
        raise
    return final


class CheckpointNotSaved(RuntimeError):
    """A checkpoint written in the background failed (other than a full disk, which stays `DiskFull`)."""


# One writer thread: a write is I/O on weights that stay in memory, so it can overlap the next
# iteration's generation. It pays only where that generation runs long kernels that release
# the GIL: at SmolLM2-135M (1.6 GB checkpoint) the 5.5-7.1 s write overlapped whole (the next
# update never waited); with the 1M-parameter demo (12 MB) the writer's pickling and fsyncs
# slowed the Python-bound stages beside it more than the 0.08 s write costs (benchmarks/RESULTS.md
# section 4). Smaller checkpoints are written by the update itself.
# GRPOFLOW_BACKGROUND_SAVE_MIN_BYTES overrides it (the resume test writes the tiny model's in the background).
BACKGROUND_SAVE_MIN_BYTES = int(os.environ.get("GRPOFLOW_BACKGROUND_SAVE_MIN_BYTES", 256 * 2**20))
_SAVER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grpoflow-checkpoint")
_PENDING: list[tuple[str, Future]] = []  # (checkpoint path, a job for it) in submission order, not yet waited for


def save_in_background(policy: LivePolicy, final: str | Path) -> Future:
    """`save_checkpoint(policy, final)` on the writer thread; returns its future. The caller
    must not change the policy's weights or optimiser state until `wait_for_saves` returns."""
    wait_for_saves()
    future = _SAVER.submit(contextvars.copy_context().run, save_checkpoint, policy, final)
    _PENDING.append((_key(final), future))
    return future


def after_save(path: str | Path, then: Callable[[], None]) -> bool:
    """Run `then` on the writer thread once the background write of `path` has landed (not if
    it failed); `wait_for_saves` waits for it too. False when no write of `path` is pending."""
    writes = [f for k, f in _PENDING if k == _key(path)]
    if not writes:
        return False

    def job() -> None:
        if writes[0].exception() is None:  # done: the one writer thread runs jobs in order
            then()

    _PENDING.append((_key(path), _SAVER.submit(contextvars.copy_context().run, job)))
    return True


def wait_for_saves() -> None:
    """Block until the background checkpoint writes (and what runs after them) are done;
    raise a failed write: `DiskFull` as it is, anything else as `CheckpointNotSaved`
    naming the folder."""
    while _PENDING:
        path, future = _PENDING.pop(0)
        try:
            future.result()
        except DiskFull:
            _PENDING.clear()  # what ran after it did nothing
            raise
        except Exception as err:  # noqa: BLE001 - any failure of the write is reported the same way
            _PENDING.clear()
            raise CheckpointNotSaved(
                f"{path}: the checkpoint written in the background failed: {type(err).__name__}: {err}"
            ) from err


def export_final_model(policy: LivePolicy, run_dir: str | Path) -> Path:
    """Write ``<run_dir>/final/``: the policy's weights and tokenizer, without optimiser
    state (what a user deploys; resuming uses the iterations' checkpoints); a LoRA policy's
    adapter merged into the base weights, so final/ is a plain transformers folder. Atomic, like a
    checkpoint: a reader sees the previous final/ or the new one, never half of one."""
    return save_checkpoint(policy, Path(run_dir) / FINAL, merge_adapter=is_adapted(policy.model), with_optimizer=False)


def final_model_dir(run_dir: str | Path) -> Path | None:
    """The final model of a run folder (``<run_dir>/final``), or None when the run has not
    finished yet (or was made before final/ existed)."""
    folder = Path(run_dir) / FINAL
    return folder if (folder / "config.json").is_file() else None
