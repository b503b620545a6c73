"""What one training forward keeps for its backward pass, LoRA against full fine-tuning, with
and without activation checkpointing: the bytes of every distinct tensor storage autograd saves
(weights excluded), counted by `torch.autograd.graph.saved_tensors_hooks`.

    python benchmarks/saved_tensors.py --model smollm2 --tokens 512

This counts live tensors, independent of the allocator: where bench_memory.py's RSS peaks of
LoRA and full fine-tuning differ by more than this does, the difference is memory the
allocator kept after it was freed (benchmarks/RESULTS.md section 10). The forward is the
transformer body plus one position's logits (`logits_to_keep=1`), so the head's chunks, which
both sides compute alike, do not count.
"""

from __future__ import annotations

import argparse

import common  # noqa: F401  (sets the offline/quiet environment and sys.path)
from common import ROOT, set_threads


def saved_bytes(model, input_ids) -> int:
    import torch

    seen: set[tuple[int, int]] = set()
    total = 0

    def pack(tensor):
        nonlocal total
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen and not isinstance(tensor, torch.nn.Parameter):
            seen.add(key)
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=input_ids, logits_to_keep=1)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 or a local model folder")
    p.add_argument("--tokens", type=int, default=512, help="sequence length of the one forward")
    p.add_argument("--lora-rank", type=int, default=16)
    a = p.parse_args()
    set_threads(1)

    import torch

    from tasks.lora import LoraSettings, add_adapter
    from tasks.model import load_model
    from tasks.update import set_activation_checkpointing

    if a.model == "smollm2":
        from smollm2 import smollm2_hf_folder

        path = str(smollm2_hf_folder(ROOT / "benchmarks" / "out" / "smollm2-135m-instruct"))
    else:
        path = a.model
    input_ids = torch.randint(0, 1000, (1, a.tokens), generator=torch.Generator().manual_seed(0))
    for lora in (False, True):
        for checkpointing in (False, True):
            model = load_model(path, torch.device("cpu"), torch.float32)
            if lora:
                model = add_adapter(model, LoraSettings(rank=a.lora_rank), path)
            model.train()
            set_activation_checkpointing(model, checkpointing)
            mib = saved_bytes(model, input_ids) / 2**20
            print(
                f"{'LoRA r' + str(a.lora_rank) if lora else 'full':8s} checkpointing "
                f"{'on ' if checkpointing else 'off'}: {mib:7.0f} MiB saved for backward ({a.tokens} tokens)"
            )


if __name__ == "__main__":
    main()
