"""The transformers engine: ``model.generate`` on the live policy itself (the default).

It samples with the very model the update trains, so `load` keeps a reference (no copy) and
`sync` has nothing to do for weights that already are that model's. Reproducible exactly:
the same seed, prompts, settings and machine give the same tokens (``torch.manual_seed``
before the first batch; batches run in order).

The sampler's log-probs are recorded while generating by a logits processor. transformers
runs custom processors after its own logits processors (repetition penalty...) and before
the sampling warpers (temperature, top-k, top-p), so it sees the logits the warpers start
from: at each step it keeps the log-probs of the distribution generate then samples from,
log softmax(top_p(scores / T)), (B, V), and gathers the drawn token's entry at the next
step (as vLLM's "processed_logprobs"). With top_p = 1 they are those of softmax(logits / T),
the footing the trainer's log-probs stand on. Memory is one (B, V)
float tensor, not the (B, T, V) of ``output_logits``. top_k and min_p are applied by the
recorder too, in transformers' order (temperature, top-k, top-p, min-p), and the repetition
penalty is a logits processor that runs before it: the recorded log-probs are those of the
distribution actually sampled, whatever the settings.

Stop strings: transformers' own ``stop_strings`` needs every token to decode after a letter
prefix, which a tokenizer without letters (the tiny model's) fails; `StopStrings` decodes the
last few new tokens instead, and `stop_index` cuts the completion after the token that
completed the string (finish_reason "stop"; the string stays in the completion).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    StoppingCriteria,
    StoppingCriteriaList,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tasks.engines.base import Engine, Sample, SamplingSettings
from tasks.progress import progress


class _RecordLogprobs(LogitsProcessor):
    """Records the log-prob of each sampled token under the distribution it was drawn from:
    log softmax(top_p(scores / T))[token], top-p applied by transformers' own warper."""

    def __init__(self, temperature: float, top_p: float, top_k: int = 0, min_p: float = 0.0):
        self.temperature = temperature
        # transformers' warper order: temperature, top-k, top-p, min-p
        self.warpers = [
            w
            for w in (
                TopKLogitsWarper(top_k=top_k) if top_k else None,
                TopPLogitsWarper(top_p=top_p) if top_p < 1 else None,
                MinPLogitsWarper(min_p=min_p) if min_p else None,
            )
            if w is not None
        ]
        self.last: torch.Tensor | None = None  # (B, V) log-probs of the previous step
        self.steps: list[torch.Tensor] = []  # one (B,) per generated token but the last

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.last is not None:  # input_ids now ends with the token drawn from `last`
            self.steps.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        scaled = scores.float() / self.temperature  # (B, V)
        for warper in self.warpers:
            scaled = warper(input_ids, scaled)  # -inf for the tokens it drops
        self.last = torch.log_softmax(scaled, dim=-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """(B, C) log-probs of `new_tokens` (B, C), the tokens generate returned."""
        steps = list(self.steps)
        if self.last is not None and len(steps) < new_tokens.shape[1]:
            steps.append(
                self.last.gather(-1, new_tokens[:, len(steps) : len(steps) + 1].to(self.last.device)).squeeze(-1)
            )
        return torch.stack(steps, dim=1).cpu() if steps else torch.zeros((new_tokens.shape[0], 0))


class StopStrings(StoppingCriteria):
    """Ends a sequence once the text of its last few new tokens contains one of `stop`."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_width: int):
        self.tokenizer, self.stop, self.width = tokenizer, list(stop), prompt_width
        self.tail = max(map(len, self.stop)) + 8  # a token is at least one character, special ones none

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:  # (b, T) -> (b,)
        new = input_ids[:, self.width :][:, -self.tail :].tolist()
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=False)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


def stop_index(tokenizer, tokens: Sequence[int], stop: Sequence[str]) -> int | None:
    """Index of the token with which the decoded `tokens` first contain one of `stop`, or
    None. Containment only grows with the prefix, so a binary search needs ~log2(C) decodes."""

    def contains(n: int) -> bool:
        text = tokenizer.decode(tokens[:n], skip_special_tokens=False)
        return any(s in text for s in stop)

    if not tokens or not contains(len(tokens)):
        return None
    low, high = 1, len(tokens)  # contains(high) holds; find the smallest such prefix
    while low < high:
        middle = (low + high) // 2
        if contains(middle):
            high = middle
        else:
            low = middle + 1
    return low - 1


def eos_ids(model, tokenizer) -> list[int]:
    # Chat models often end turns with a token other than the tokenizer's EOS (e.g.
    # <|im_end|>); their generation config lists every stop token.
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [tokenizer.eos_token_id, *configured] if i is not None})


class HFEngine(Engine):
    name = "hf"
    samples_the_live_policy = True

    def __init__(self) -> None:
        self._model = lambda: None
        self.tokenizer = None

    def load(self, model, tokenizer) -> None:
        # A weak reference: the engine outlives stages and must not keep a policy that the
        # process has dropped (tasks.model frees the old one before loading the next).
        self._model, self.tokenizer = weakref.ref(model), tokenizer

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the HF engine's policy was freed: load() it again")
        return model

    def sync(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Weights from elsewhere (a worker process) copied into the model it samples with."""
        own = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in weights:
                if own[name].data_ptr() != tensor.data_ptr():  # the live policy's own tensors are already in place
                    own[name].copy_(tensor)

    @torch.no_grad()
    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        num_samples: int,
        settings: SamplingSettings,
        seed: int | None = None,
        desc: str = "generate",
    ) -> list[Sample]:
        """`settings.batch_size` sequences per ``generate`` call, left-padded."""
        model, tokenizer = self.model, self.tokenizer
        if seed is not None:
            torch.manual_seed(seed)
        device = next(model.parameters()).device
        stop_ids = eos_ids(model, tokenizer)
        greedy = settings.greedy
        record = settings.with_logprobs and not greedy
        jobs = [i for i in range(len(prompt_ids)) for _ in range(num_samples)]  # group members adjacent
        out: list[Sample] = []
        model.eval()
        with progress(desc, total=len(jobs)) as bar:
            for start in range(0, len(jobs), settings.batch_size):
                chunk = jobs[start : start + settings.batch_size]
                width = max(len(prompt_ids[i]) for i in chunk)
                ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
                    ids[row, width - len(prompt_ids[i]) :] = torch.as_tensor(prompt_ids[i])
                    mask[row, width - len(prompt_ids[i]) :] = 1
                recorder = (
                    _RecordLogprobs(settings.temperature, settings.top_p, settings.top_k, settings.min_p)
                    if record
                    else None
                )
                result = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=not greedy,
                    temperature=settings.temperature if not greedy else None,
                    top_p=settings.top_p if not greedy else None,
                    top_k=settings.top_k
                    if settings.top_k and not greedy
                    else None,  # None, not generation_config's top_k=50
                    min_p=settings.min_p if settings.min_p and not greedy else None,
                    repetition_penalty=settings.repetition_penalty if settings.repetition_penalty != 1.0 else None,
                    stopping_criteria=StoppingCriteriaList([StopStrings(tokenizer, settings.stop, width)])
                    if settings.stop
                    else None,
                    max_new_tokens=settings.max_new_tokens,
                    eos_token_id=stop_ids,
                    pad_token_id=tokenizer.pad_token_id,
                    logits_processor=LogitsProcessorList([recorder]) if recorder is not None else None,
                )
                new_tokens = result[:, width:].cpu()  # (b, C)
                logprobs = recorder.finish(new_tokens) if recorder is not None else None  # (b, C)
                for row, i in enumerate(chunk):
                    tokens = new_tokens[row].tolist()
                    stop = next((t for t, tok in enumerate(tokens) if tok in stop_ids), None)
                    length, reason = (len(tokens), "length") if stop is None else (stop + 1, "eos")
                    at = stop_index(tokenizer, tokens[:length], settings.stop) if settings.stop else None
                    if at is not None and (reason == "length" or at < length - 1):
                        length, reason = at + 1, "stop"
                    lp = logprobs[row, :length].tolist() if logprobs is not None else None
                    out.append(Sample(i, tokens[:length], reason, lp))
                bar.advance(len(chunk))
        return out
