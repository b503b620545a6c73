"""End to end: two GRPO iterations of the Prefect flow on a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from data import builtin
from data.run_folder import iteration_dir
from data.schemas import ADVANTAGES, GENERATIONS, PROMPTS, REWARDS
from data.store import Manifest, read_table
from flows.config import GRPOConfig
from flows.observe.views import PLOT_NAME


def shorter_is_better(completion: str, example) -> float:
    """A reward with spread on a random model (exact answers are all 0 there), loaded by
    import path as a user's custom reward would be."""
    return -float(len(completion))


@pytest.fixture()
def arithmetic_jsonl(tmp_path):
    """A user dataset in TRL's layout (prompt + answer), and a held-out file."""
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps(p) + "\n" for p in builtin.train_problems(40, seed=1)))
    held.write_text("".join(json.dumps(p) + "\n" for p in builtin.held_out_problems(16)))
    return train, held


def test_two_iterations_write_every_artifact_and_a_loadable_checkpoint(
    tmp_path, tiny_model_dir, arithmetic_jsonl, prefect_harness
):
    from flows.train import grpo_train

    train, held = arithmetic_jsonl
    config = GRPOConfig(
        run_dir=tmp_path / "run",
        model=str(tiny_model_dir),
        dataset=str(train),
        eval_dataset=str(held),
        task="arithmetic",
        iterations=2,
        prompts_per_iteration=4,
        group_size=3,
        max_new_tokens=4,
        beta=0.04,
        micro_batch_size=5,
        eval_every=1,
        eval_size=16,
        rewards={"exact_answer": 1.0, "tests.test_flow_e2e:shorter_is_better": 0.1},
    )
    metrics = grpo_train(config)

    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["config"]["group_size"] == 3
    for it in (1, 2):
        folder = iteration_dir(run, it)
        manifest = Manifest(folder)
        for name, schema, rows in (
            ("prompts.parquet", PROMPTS, 4),
            ("generations.parquet", GENERATIONS, 12),
            ("rewards.parquet", REWARDS, 12),
            ("advantages.parquet", ADVANTAGES, 12),
        ):
            assert read_table(folder / name, schema).num_rows == rows
            assert manifest.is_done(name)
            assert manifest.entries()[name]["schema_version"] == schema.version
        gens = read_table(folder / "generations.parquet", GENERATIONS)
        assert gens["ref_logprobs"].null_count == 0
        assert gens["old_logprobs"].null_count == gens.num_rows  # mu = 1, one mini-batch: the update needs none
        assert (folder / "checkpoint" / "model.safetensors").exists()
        saved = json.loads((folder / "metrics.json").read_text())
        assert 0.0 <= saved["held_out_accuracy"] <= 1.0 and saved["iteration"] == it
    # Two iterations walk through the dataset without repeating a prompt.
    ids = [read_table(iteration_dir(run, it) / "prompts.parquet", PROMPTS)["prompt_id"].to_pylist() for it in (1, 2)]
    assert not set(ids[0]) & set(ids[1])
    assert metrics["iteration"] == 2 and metrics["completions"] == 12
    assert (run / PLOT_NAME).read_bytes()[
        :4
    ] == b"\x89PNG"  # drawn in the background, finished before the flow returned

    # The final checkpoint is the trained policy: it loads and differs from the start.
    final = AutoModelForCausalLM.from_pretrained(iteration_dir(run, 2) / "checkpoint")
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(final.state_dict().values(), start.state_dict().values()))

    # Re-running the same run folder skips every done stage and changes nothing.
    before = {p: p.read_bytes() for p in run.rglob("*.parquet")}
    grpo_train(config)
    assert {p: p.read_bytes() for p in run.rglob("*.parquet")} == before
