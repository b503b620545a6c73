"""The vLLM engine (optional: make install-vllm) on CPU: weight sync, a flow run, a kill in the
middle of its generation, and exactly what is and is not reproducible.

Every test here samples through `engine_for("vllm", ...)`, so the whole test session shares
one engine (building one costs ~16 s, its first generate ~14 s more, on 2 quiet cores); the
kill test's child process builds its own, as a resumed run would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import require

require("vllm", "vllm")

from data import builtin  # noqa: E402
from data.run_folder import iteration_dir
from data.schemas import ARTIFACTS, GENERATIONS  # noqa: E402
from data.store import TMP_PREFIX, Manifest, read_table  # noqa: E402
from flows.config import GRPOConfig  # noqa: E402
from tasks.engines import SamplingSettings, engine_for  # noqa: E402
from tasks.model import live_policy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def prefers_short(completion: str, example) -> float:
    """A reward with spread on a random model, so the updates really move the weights."""
    return -float(len(completion))


def _prompts(tokenizer, texts=("12+34=", "7+5=", "99+1=", "3+3=")) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _forward_logprobs(model, prompt, completion, temperature=1.0) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()  # (C, V)
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)


def test_synced_weights_give_the_trainers_logprobs_with_tied_embeddings(tiny_model_dir):
    """Every weight changed in the trainer (the tied embedding/output head included), synced
    in place: the engine's log-probs equal a transformers fp32 forward of the new weights
    (before the re-tie, the head kept the old embedding: 14-22 nats off)."""
    policy = live_policy(str(tiny_model_dir), "cpu", "float32")
    assert (
        policy.model.config.tie_word_embeddings
        and policy.model.lm_head.weight is policy.model.get_input_embeddings().weight
    )
    engine = engine_for("vllm", str(tiny_model_dir), policy)
    prompts = _prompts(policy.tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    started = time.perf_counter()
    engine.sync(policy.model.named_parameters())
    took = time.perf_counter() - started
    worst = 0.0
    for s in engine.sample(prompts, 4, SamplingSettings(max_new_tokens=8), seed=1):
        worst = max(
            worst,
            (_forward_logprobs(policy.model, prompts[s.prompt_index], s.completion_ids) - torch.tensor(s.logprobs))
            .abs()
            .max()
            .item(),
        )
    assert worst <= 1e-3, f"max |engine - transformers| log-prob difference {worst:.2e} after a sync of {took:.2f}s"


def test_a_lora_policy_is_synced_with_its_adapter_merged(tiny_model_dir):
    """A LoRA policy (peft) goes into the engine as W + (alpha / R) B A under the base model's
    names (tasks.lora.merged_weights): the engine's log-probs are the adapted model's."""
    require("peft", "lora")
    from tasks.lora import LoraSettings, add_adapter
    from tasks.model import LivePolicy

    base = live_policy(str(tiny_model_dir), "cpu", "float32")
    adapted = add_adapter(base.model, LoraSettings(rank=4), str(tiny_model_dir), seed=0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B = 0 at creation: give the adapter an effect
    policy = LivePolicy(adapted, base.tokenizer)
    engine = engine_for("vllm", str(tiny_model_dir) + "@lora", policy)
    prompts = _prompts(policy.tokenizer)
    worst = 0.0
    for s in engine.sample(prompts, 3, SamplingSettings(max_new_tokens=6), seed=2):
        worst = max(
            worst,
            (_forward_logprobs(adapted, prompts[s.prompt_index], s.completion_ids) - torch.tensor(s.logprobs))
            .abs()
            .max()
            .item(),
        )
    assert worst <= 1e-3


def test_what_is_and_is_not_reproducible(tiny_model_dir):
    """With per-request seeds unusable on the CPU backend, the engine re-seeds its sampler
    before every generate. Reproducible: the same weights, prompts, settings and seed give the
    same tokens and log-probs. Not reproducible: a prompt's completions when the other
    prompts of the call change (one random stream for the batch), and the HF engine's draws."""
    policy = live_policy(str(tiny_model_dir), "cpu", "float32")
    engine = engine_for("vllm", str(tiny_model_dir), policy)
    prompts = _prompts(policy.tokenizer)
    settings = SamplingSettings(max_new_tokens=8)

    def draw(ps, seed, eng=engine):
        return [(s.prompt_index, s.completion_ids) for s in eng.sample(ps, 4, settings, seed=seed)]

    first = engine.sample(prompts, 4, settings, seed=5)
    again = engine.sample(prompts, 4, settings, seed=5)
    assert [(s.completion_ids, s.logprobs) for s in first] == [(s.completion_ids, s.logprobs) for s in again]
    assert draw(prompts, 6) != draw(prompts, 5)
    alone = draw(prompts[:1], 5)  # prompt 0 without the others: another draw
    assert alone != [d for d in draw(prompts, 5) if d[0] == 0]
    hf = engine_for("hf", str(tiny_model_dir), policy)
    assert draw(prompts, 5, hf) != draw(prompts, 5)


def test_interrupted_generation_leaves_no_request_behind(tiny_model_dir, monkeypatch):
    """An exception in the middle of vLLM's generate (a retried stage) must not leave requests
    in the engine: the next call would return them among its own."""
    from tasks.engines import vllm as vllm_engine

    policy = live_policy(str(tiny_model_dir), "cpu", "float32")
    engine = engine_for("vllm", str(tiny_model_dir), policy)
    prompts = _prompts(policy.tokenizer)

    def boom(self, n=1):
        raise KeyboardInterrupt("interrupted mid-generation")

    with monkeypatch.context() as patch:
        patch.setattr(vllm_engine._Ticker, "update", boom)
        with pytest.raises(KeyboardInterrupt):
            engine.sample(prompts, 3, SamplingSettings(max_new_tokens=30), seed=1)
    assert not engine.llm.llm_engine.has_unfinished_requests()
    samples = engine.sample(prompts[:2], 2, SamplingSettings(max_new_tokens=4), seed=1)
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1]


def _settings(run_dir: Path, model: Path, dataset: Path, iterations: int) -> dict:
    return dict(
        run_dir=run_dir,
        model=str(model),
        dataset=str(dataset),
        task="arithmetic",
        iterations=iterations,
        prompts_per_iteration=4,
        group_size=3,
        max_new_tokens=4,
        micro_batch_size=6,
        beta=0.04,
        learning_rate=0.01,
        seed=3,
        score_workers=1,
        rewards={"tests.test_engines_vllm:prefers_short": 1.0},
        generation_engine="vllm",
        mismatch_correction="token_truncate",
    )


@pytest.fixture()
def dataset(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in builtin.train_problems(40, seed=3)))
    return path


def _check_artifacts(run: Path, iterations: int) -> None:
    """Every artifact of every iteration reads with its declared schema; the sampler's
    log-probs are stored and the mismatch metrics reported."""
    for it in range(1, iterations + 1):
        folder = iteration_dir(run, it)
        for name, entry in Manifest(folder).entries().items():
            if name.endswith(".parquet"):
                schema = ARTIFACTS[name.removesuffix(".parquet").split("-")[0]]
                assert entry["schema_version"] == schema.version
                read_table(folder / name, schema)
        gens = read_table(folder / "generations.parquet", GENERATIONS).to_pylist()
        assert len(gens) == 12 and all(len(g["sampler_logprobs"]) == len(g["completion_token_ids"]) for g in gens)
        metrics = json.loads((folder / "metrics.json").read_text())
        # The engine and the trainer hold the same fp32 weights: numerics alone separate them.
        assert metrics["sampling/sampling_logp_difference/max"] <= 1e-3
        assert (
            1 - 1e-3
            <= metrics["sampling/importance_sampling_ratio/min"]
            <= metrics["sampling/importance_sampling_ratio/max"]
            <= 1 + 1e-3
        )
    assert not list(run.rglob(f"{TMP_PREFIX}*"))


def test_two_iterations_with_the_vllm_engine(tmp_path, tiny_model_dir, dataset, prefect_harness):
    from flows.train import grpo_train

    grpo_train(GRPOConfig(**_settings(tmp_path / "run", tiny_model_dir, dataset, iterations=2)))
    _check_artifacts(tmp_path / "run", 2)


def test_killed_during_vllm_generation_then_resumed(tmp_path, tiny_model_dir, dataset, prefect_harness):
    """SIGKILL while the child's vLLM engine is generating iteration 2; the run folder is then
    resumed (here, in this process): iteration 1 stays as it was, iteration 2 is generated
    again, and everything reads with its schema."""
    from prefect.settings import PREFECT_API_URL

    from flows.train import grpo_train

    run = tmp_path / "run"
    config = _settings(run, tiny_model_dir, dataset, iterations=2)
    args = ["run"]
    for key, value in config.items():
        args += ["--" + key.replace("_", "-"), json.dumps(value) if isinstance(value, dict) else str(value)]
    marker = tmp_path / "paused"
    env = os.environ | {
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "GRPOFLOW_PAUSE_MARKER": str(marker),
        "GRPOFLOW_PAUSE_AT": "iter-0002/generations.parquet: generate",
        "OMP_NUM_THREADS": "1",
    }
    log = tmp_path / "child.log"
    with open(log, "w") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None, f"the run ended before its pause point:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no pause within 300 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert "iter-0002/generations.parquet: generate" in marker.read_text()
    first = iteration_dir(run, 1)
    before = {p.name: p.read_bytes() for p in first.glob("*.parquet")}
    assert Manifest(first).is_done("checkpoint") and not Manifest(iteration_dir(run, 2)).is_done("generations.parquet")

    grpo_train(GRPOConfig(**config))
    assert {p.name: p.read_bytes() for p in first.glob("*.parquet")} == before
    _check_artifacts(run, 2)
