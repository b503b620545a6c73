"""The embedded default model: a ~1M-parameter Qwen2-style model with a character-level
tokenizer, given a short supervised warm-up on the built-in arithmetic task.

Nothing can be downloaded on our machines, so `grpo run` with no arguments builds this
model once (about a minute on 2 CPU cores) and caches it, keyed by every setting that shapes
it. The warm-up is deliberately short: it teaches the answer format and part of the skill,
leaving headroom for GRPO to improve held-out accuracy from the reward alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from data import builtin
from tasks.model import LivePolicy, save_checkpoint
from tasks.progress import progress

ESTIMATE_AFTER_STEPS = 3  # steps timed before the one log line that says how long the build takes

CHARS = list("0123456789+-*= ")
SPECIAL = ["<pad>", "<eos>"]
VERSION = 1  # bump when the architecture or the warm-up recipe changes: it re-keys the cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("GRPOFLOW_CACHE", Path.home() / ".cache" / "grpoflow"))


def build_tokenizer(chars: list[str] | str = CHARS) -> PreTrainedTokenizerFast:
    """One token per character of `chars` (default: the arithmetic task's), after <pad>, <eos>."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(chars))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    # One token per character: arithmetic is easiest to learn digit by digit.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(""), "isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def build_model(vocab_size: int, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,  # ~1M parameters: trains in seconds per step on 2 CPU cores
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        max_position_embeddings=64,  # prompts are 6 characters, answers at most 4
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return Qwen2ForCausalLM(config)


def _sft_batch(tokenizer, problems: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    # Right-padded "a+b=c<eos>"; the loss covers only the answer and EOS, as in GRPO's completions.
    ids, labels = [], []
    for p in problems:
        prompt = tokenizer.encode(p["prompt"])
        answer = tokenizer.encode(p["answer"]) + [tokenizer.eos_token_id]
        ids.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
    }


def warm_up(
    model,
    tokenizer,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    on_estimate: Callable[[float], None] | None = None,
) -> list[float]:
    """Supervised steps on training problems only (never the held-out set). A progress bar
    on a terminal; `on_estimate(seconds)` is told once, after the first few steps, how long
    the whole warm-up will take (a cold `make demo` was minutes of silence here)."""
    problems = builtin.train_problems(steps * batch_size, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    started = time.perf_counter()
    with progress("building the tiny model", total=steps) as bar:
        for step in range(steps):
            batch = _sft_batch(tokenizer, problems[step * batch_size : (step + 1) * batch_size])
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.advance()
            if on_estimate is not None and step + 1 == min(ESTIMATE_AFTER_STEPS, steps):
                on_estimate((time.perf_counter() - started) / (step + 1) * steps)
    model.eval()
    return losses


def ensure_tiny_model(
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    cache_dir: Path | None = None,
    say: Callable[[str], None] | None = None,
) -> Path:
    """The warmed-up tiny model's folder, building it on the first call for these settings;
    `say` gets one line, with the time the build will take, when it has to be built."""
    settings = {
        "version": VERSION,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "torch": torch.__version__,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = (cache_dir or default_cache_dir()) / "models" / f"tiny-arith-{digest}"
    if (folder / "config.json").exists():
        return folder
    random.seed(seed)
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        estimate = (
            None
            if say is None
            else (
                lambda seconds: say(
                    f"building the built-in tiny model once ({steps} supervised steps, about {seconds:.0f}s; "
                    f"cached in {folder})"
                )
            )
        )
        losses = warm_up(model, tokenizer, steps, batch_size, lr, seed, on_estimate=estimate)
    save_checkpoint(LivePolicy(model, tokenizer), folder)
    (folder / "warmup.json").write_text(json.dumps({**settings, "final_loss": losses[-1] if losses else None}))
    return folder
