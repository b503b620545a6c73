"""Writing AdamW's state: `torch.save` (the checkpoint's optimizer.pt, what tasks.model writes)
against safetensors (flat tensors, the param groups as JSON metadata), each followed by an fsync
as the checkpoint writer does. Asks whether the format is worth changing to shorten the write.

    python benchmarks/bench_checkpoint_format.py                 # the tiny model's and SmolLM2-135M's shapes

Sides, alternated rep by rep in this one process, same thread count (the first rep warms up):
  torch.save    the optimiser state_dict as tasks.model.save_checkpoint writes it
  safetensors   the same tensors, keyed state.<param>.<name>, via safetensors.torch.save_file
The states are AdamW's two moments (random values) with the shapes of the tiny demo model's
and of SmolLM2-135M's parameters, built from each model's config (no weights are loaded).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import common  # sets the offline/quiet environment and sys.path
from common import fmt, set_threads, summary

from data.store import _fsync_dir as fsync  # opens read-only and fsyncs: a file as well as a folder

# SmolLM2-135M's architecture (its config.json on the Hub; benchmarks/smollm2.py converts the same model).
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
)


def parameter_shapes(model: str) -> list[tuple[int, ...]]:
    """The shapes of `model`'s trained parameters, from a meta-device instance (no weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if model == "tiny":
        from tasks.tiny_model import build_model, build_tokenizer

        return [tuple(p.shape) for p in build_model(len(build_tokenizer()), seed=0).parameters()]
    with torch.device("meta"):
        lm = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    return [tuple(p.shape) for p in lm.parameters()]


def adamw_state(shapes: list[tuple[int, ...]]) -> dict:
    import torch

    state = {
        i: {"step": torch.tensor(5.0), "exp_avg": torch.randn(s), "exp_avg_sq": torch.rand(s)}
        for i, s in enumerate(shapes)
    }
    groups = [
        {
            "lr": 5e-5,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "weight_decay": 0.0,
            "amsgrad": False,
            "params": list(range(len(shapes))),
        }
    ]
    return {"state": state, "param_groups": groups}


def write_torch(state: dict, path: Path) -> None:
    import torch

    torch.save(state, path)
    fsync(path)


def write_safetensors(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {f"state.{i}.{name}": t for i, s in state["state"].items() for name, t in s.items()}
    save_file(tensors, path, metadata={"param_groups": json.dumps(state["param_groups"])})
    fsync(path)


SIDES = {"torch.save": write_torch, "safetensors": write_safetensors}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    p.add_argument("--reps", type=int, default=0, help="timed reps per side (0: 9 for tiny, 3 for smollm2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scratch", type=Path, default=common.ROOT / "benchmarks" / "out" / "checkpoint-format")
    a = p.parse_args()
    set_threads(a.threads)
    a.scratch.mkdir(parents=True, exist_ok=True)
    for model in a.models:
        state = adamw_state(parameter_shapes(model))
        mib = sum(t.numel() * t.element_size() for s in state["state"].values() for t in s.values()) / 2**20
        reps = a.reps or (9 if model == "tiny" else 3)
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        with tempfile.TemporaryDirectory(dir=a.scratch) as folder:
            for rep in range(reps + 1):
                for side, write in SIDES.items():
                    path = Path(folder) / f"{side}.bin"
                    started = time.perf_counter()
                    write(state, path)
                    if rep:  # the first rep warms up
                        times[side].append(time.perf_counter() - started)
                    path.unlink()
        base = summary(times["torch.save"])
        print(f"{model}: AdamW state {mib:,.1f} MiB, {reps} reps per side, {a.threads} thread(s)")
        for side in SIDES:
            s = summary(times[side])
            print(f"  {side:12s} {fmt(s)}   {s['median'] / base['median']:.2f}x torch.save")


if __name__ == "__main__":
    main()
