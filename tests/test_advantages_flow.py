"""Dynamic sampling in the flow: refill rounds, the advantages over every round, the update on
the kept groups, the metrics (metrics.json and the run's metrics.parquet), and a resume."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

_SCRATCH = Path(tempfile.mkdtemp(prefix="grpoflow-objective-flow-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(_SCRATCH / "prefect"))
os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")
os.environ.setdefault("GRPOFLOW_CACHE", str(_SCRATCH / "cache"))
os.environ.setdefault("GRPOFLOW_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from data import builtin
from data.run_folder import iteration_dir
from data.schemas import ADVANTAGES, GENERATIONS, METRICS, PROMPTS, REWARDS
from data.store import read_table
from flows.config import GRPOConfig
from tasks.model import LivePolicy, forget_live_policies, save_checkpoint
from tasks.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def prefect_api():
    """A temporary Prefect API for this module, stopped before pytest closes its streams."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def half_constant(completion: str, example) -> float:
    """Spread within the groups of odd prompt ids, none within the even ones: dynamic sampling
    has groups to drop and has to refill."""
    return 0.0 if int(example["prompt_id"], 16) % 2 == 0 else float(len(completion))


def test_dynamic_sampling_refills_trains_on_kept_groups_and_resumes(tmp_path, prefect_api):
    from flows.train import grpo_train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a busy 2-core machine
    try:
        tokenizer = build_tokenizer()
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(
            Qwen2Config(
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
        )
        save_checkpoint(LivePolicy(model, tokenizer), tmp_path / "model")
        del model
        train = tmp_path / "train.jsonl"
        train.write_text("".join(json.dumps(p) + "\n" for p in builtin.train_problems(40, seed=1)))
        config = GRPOConfig(
            run_dir=tmp_path / "run",
            model=str(tmp_path / "model"),
            dataset=str(train),
            task="arithmetic",
            iterations=2,
            prompts_per_iteration=4,
            group_size=3,
            max_new_tokens=4,
            beta=0.04,
            micro_batch_size=5,
            mu=2,
            mini_batches=2,
            dynamic_sampling=True,
            max_refill_rounds=2,
            advantage_estimator="rloo",
            scale_rewards="batch",
            epsilon_high=0.28,
            loss_aggregation="dapo",
            importance_sampling_level="sequence",
            mask_truncated_completions=True,
            rewards={"tests.test_advantages_flow:half_constant": 1.0},
            device="cpu",
        )
        grpo_train(config)

        run = tmp_path / "run"
        total_rounds = 0
        for it in (1, 2):
            folder = iteration_dir(run, it)
            saved = json.loads((folder / "metrics.json").read_text())
            rounds = saved["dynamic_sampling/rounds"]
            total_rounds += rounds
            names = ["prompts.parquet"] + [f"prompts-r{k}.parquet" for k in range(1, rounds + 1)]
            ids = [pid for n in names for pid in read_table(folder / n, PROMPTS)["prompt_id"].to_pylist()]
            assert len(ids) == len(set(ids)) == 4 * (rounds + 1)  # refill rounds bring new prompts only
            rewards = [folder / ("rewards.parquet" if k == 0 else f"rewards-r{k}.parquet") for k in range(rounds + 1)]
            adv = read_table(folder / "advantages.parquet", ADVANTAGES).to_pylist()
            for k in range(rounds + 1):  # mu = 2 x 2 mini-batches: every round stores its sampling log-probs
                assert (
                    read_table(
                        folder / ("generations.parquet" if k == 0 else f"generations-r{k}.parquet"), GENERATIONS
                    )["old_logprobs"].null_count
                    == 0
                )
            assert len(adv) == sum(read_table(r, REWARDS).num_rows for r in rewards) == 12 * (rounds + 1)
            for row in adv:
                assert row["kept"] == (row["drop_reason"] is None)
                if row["drop_reason"] == "zero_std":
                    assert row["group_std"] == 0.0 and row["advantage"] == 0.0
                if int(row["prompt_id"], 16) % 2 == 0:
                    assert row["drop_reason"] == "zero_std"
            kept_groups = {r["prompt_id"] for r in adv if r["kept"]}
            assert len(kept_groups) <= 4 and saved["dynamic_sampling/kept_groups"] == len(kept_groups)
            assert saved["update/trained_completions"] == 3 * len(kept_groups)
            if len(kept_groups) < 4:  # not full: the refill budget was spent
                assert rounds == 2
            for name in (
                "reward",
                "reward_std",
                "rewards/tests.test_advantages_flow:half_constant/mean",
                "frac_reward_zero_std",
                "kl",
                "policy_loss",
                "clip_ratio/low_mean",
                "clip_ratio/high_mean",
                "clip_ratio/region_mean",
                "entropy",
                "grad_norm",
                "completions/mean_length",
                "completions/clipped_ratio",
                "step_time",
                "tokens_per_second",
                "dynamic_sampling/frac_dropped",
            ):
                assert name in saved, name
        assert total_rounds >= 1

        table = read_table(run / "metrics.parquet", METRICS).to_pylist()
        assert {r["iteration"] for r in table} == {1, 2}
        by_key = {(r["iteration"], r["name"]): r["value"] for r in table}
        assert (
            by_key[(2, "policy_loss")]
            == json.loads((iteration_dir(run, 2) / "metrics.json").read_text())["policy_loss"]
        )

        # A re-run of the finished run skips every stage (the refill decisions included) and
        # changes no artifact, the metrics table included.
        before = {p: p.read_bytes() for p in run.rglob("*.parquet")}
        forget_live_policies()
        grpo_train(config)
        assert {p: p.read_bytes() for p in run.rglob("*.parquet")} == before
    finally:
        torch.set_num_threads(threads)
        forget_live_policies()
