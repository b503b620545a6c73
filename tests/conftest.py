"""Shared test set-up: offline, quiet, and every cache in a temporary folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# CI installs every optional part (vLLM, the cluster, tracking, LoRA) and sets this, so that a
# test of an optional part whose dependency is missing fails there instead of being skipped.
REQUIRE_OPTIONAL = os.environ.get("GRPOFLOW_REQUIRE_OPTIONAL") == "1"


def require(module: str, extra: str):
    """Import an optional dependency for a test: skipped for a user who did not install
    `make install-<extra>`, a failure in CI (GRPOFLOW_REQUIRE_OPTIONAL=1)."""
    if REQUIRE_OPTIONAL:
        import importlib

        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"optional part not installed: make install-{extra}")


_SCRATCH = Path(tempfile.mkdtemp(prefix="grpoflow-tests-"))
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(_SCRATCH / "hf-datasets"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(_SCRATCH / "prefect"),
        "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "WARNING",
        "GRPOFLOW_CACHE": str(_SCRATCH / "cache"),
        "GRPOFLOW_PROGRESS": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised ~1M-parameter model with the char-level tokenizer, on disk."""
    from tasks.model import LivePolicy, save_checkpoint
    from tasks.tiny_model import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    folder = tmp_path_factory.mktemp("tiny-model") / "model"
    save_checkpoint(LivePolicy(build_model(len(tokenizer), seed=0), tokenizer), folder)
    return folder


def save_tiny_qwen2(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide random Qwen2 (tied embeddings) with the char-level tokenizer, on disk:
    small enough that an update step takes milliseconds."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tasks.model import LivePolicy, save_checkpoint
    from tasks.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
    )
    return save_checkpoint(LivePolicy(Qwen2ForCausalLM(config), tokenizer), folder)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (starting one costs ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def _fresh_live_policies():
    """Tests must not see a policy another test left in memory."""
    yield
    from tasks.model import forget_live_policies

    forget_live_policies()


# Counting pools made by `arrow_peak`, never freed: an Arrow buffer that outlives its
# measurement (in a reference cycle the collector has not reached yet) is freed into its
# pool later, and freeing into a destroyed pool crashes the interpreter.
_COUNTING_POOLS: list = []


@pytest.fixture()
def arrow_peak():
    """`arrow_peak(fn)` -> (fn(), the most bytes Arrow held while fn ran). Arrow's default
    pool is shared by the whole process and its high-water mark cannot be reset, so fn runs
    with a counting pool of its own (which passes every allocation on to the default one)."""
    import pyarrow as pa

    def measure(fn):
        default_pool = pa.default_memory_pool()
        counting = pa.proxy_memory_pool(default_pool)
        _COUNTING_POOLS.append(counting)
        pa.set_memory_pool(counting)
        try:
            result = fn()
        finally:
            pa.set_memory_pool(default_pool)
        return result, counting.max_memory()

    return measure
