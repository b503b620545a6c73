"""LoRA (tasks/lora.py) through the real stages on a tiny random Qwen2: only the adapter
trains, the reference is the base with the adapter disabled (nothing loaded), a checkpoint
holds the adapter and resumes exactly, and the merged export loads with plain transformers."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tests.conftest import require

peft = require("peft", "lora")

import tasks.generate  # noqa: E402
from data import builtin  # noqa: E402
from data.schemas import GENERATIONS, PROMPTS, REWARDS  # noqa: E402
from data.sources import normalise_row, prompts_table  # noqa: E402
from data.store import read_table, write_table  # noqa: E402
from tasks.advantages import compute_advantages  # noqa: E402
from tasks.generate import generate_completions  # noqa: E402
from tasks.logprobs import batched_completion_logprobs  # noqa: E402
from tasks.lora import LoraSettings, is_adapted, is_adapter_checkpoint, merged_weights  # noqa: E402
from tasks.model import LivePolicy, forget_live_policies, live_policy, load_model, save_checkpoint  # noqa: E402
from tasks.objective import LossSettings  # noqa: E402
from tasks.tiny_model import build_tokenizer  # noqa: E402
from tasks.update import update_policy  # noqa: E402

pytestmark = pytest.mark.optional  # the lora extra (peft)

LORA = LoraSettings(rank=4)


@pytest.fixture(autouse=True)
def _one_thread():
    # tests.conftest forgets the live policy after every test
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
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
    save_checkpoint(LivePolicy(Qwen2ForCausalLM(config), tokenizer), root / "model")
    prompts = root / "prompts.parquet"
    write_table(
        prompts_table(
            [normalise_row(p, data_source="t", row=i) for i, p in enumerate(builtin.train_problems(4, seed=5))]
        ),
        prompts,
        PROMPTS,
    )
    return {"root": root, "model": str(root / "model"), "prompts": prompts}


def _iteration(base, name: str, policy: str, seed: int, **generate) -> tuple[str, str]:
    """generate (reference from the adapter-disabled base) + random rewards + advantages."""
    root = base["root"]
    gens, rewards, advs = (str(root / f"{name}-{kind}.parquet") for kind in ("generations", "rewards", "advantages"))
    generate_completions(
        base["prompts"],
        gens,
        policy,
        group_size=4,
        max_new_tokens=5,
        reference_from_base=True,
        use_chat_template=False,
        seed=seed,
        device="cpu",
        **generate,
    )
    table = read_table(gens, GENERATIONS, columns=["prompt_id", "sample_index"])
    rng = random.Random(seed)
    write_table(
        pa.table(
            {
                "prompt_id": table["prompt_id"],
                "sample_index": table["sample_index"],
                "reward": [float(rng.randint(0, 3)) for _ in range(table.num_rows)],
            },
            schema=REWARDS.schema,
        ),
        rewards,
        REWARDS,
    )
    compute_advantages(rewards, advs)
    return gens, advs


def _update(gens, advs, policy, out, **kw):
    settings = dict(
        learning_rate=1e-2, loss=LossSettings(beta=0.04), micro_batch_size=8, seed=3, device="cpu", lora=LORA
    )
    return update_policy(gens, advs, policy, out, **settings | kw)


def test_only_the_adapter_trains_and_the_reference_is_the_base_weights(base, monkeypatch):
    loads = []
    real_load = tasks.generate.load_model
    monkeypatch.setattr(tasks.generate, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    original = {
        k: v.clone() for k, v in load_model(base["model"], torch.device("cpu"), torch.float32).state_dict().items()
    }
    gens, advs = _iteration(base, "a", base["model"], seed=1)
    out = str(base["root"] / "a-checkpoint")
    _update(gens, advs, base["model"], out, save=True)
    policy = live_policy(out)
    assert is_adapted(policy.model)
    trained = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert {id(p) for g in policy.optimizer.param_groups for p in g["params"]} == {
        id(p) for n, p in policy.model.named_parameters() if n in trained
    }
    # base weights untouched, adapter moved
    base_now = policy.model.get_base_model().state_dict()
    for key, value in original.items():
        peft_key = next(k for k in base_now if k.replace(".base_layer", "") == key)
        assert torch.equal(base_now[peft_key], value), key
    assert any(p.abs().sum() > 0 for n, p in policy.model.named_parameters() if "lora_B" in n)

    # The next iteration's reference log-probs, from the updated policy with its adapter off,
    # are the base model's; nothing was loaded for them; the policy's own differ.
    gens2, _ = _iteration(base, "b", out, seed=2, with_old_logprobs=True)
    assert loads == []
    rows = read_table(gens2, GENERATIONS).to_pylist()
    fresh = load_model(base["model"], torch.device("cpu"), torch.float32).eval()
    expected = batched_completion_logprobs(
        fresh, [r["prompt_token_ids"] for r in rows], [r["completion_token_ids"] for r in rows], 0, 1.0, 64
    )
    for r, e in zip(rows, expected, strict=True):
        assert torch.allclose(torch.tensor(r["ref_logprobs"]), torch.tensor(e), atol=1e-6)
    assert max(abs(a - b) for r in rows for a, b in zip(r["old_logprobs"], r["ref_logprobs"], strict=True)) > 1e-3


def test_checkpoint_holds_the_adapter_and_resume_continues_exactly(base, tmp_path):
    gens1, advs1 = _iteration(base, "r1", base["model"], seed=3)
    gens2, advs2 = _iteration(base, "r2", base["model"], seed=4)
    # uninterrupted: two updates in one process
    _update(gens1, advs1, base["model"], str(tmp_path / "u1"), save=False)
    _update(gens2, advs2, str(tmp_path / "u1"), str(tmp_path / "u2"), save=True)
    straight = {
        n: p.detach().clone() for n, p in live_policy(str(tmp_path / "u2")).model.named_parameters() if p.requires_grad
    }
    forget_live_policies()
    # interrupted: the first update checkpointed, the process forgets it, the second resumes from disk
    _update(gens1, advs1, base["model"], str(tmp_path / "c1"), save=True)
    saved = tmp_path / "c1"
    assert (
        is_adapter_checkpoint(saved)
        and (saved / "optimizer.pt").is_file()
        and not (saved / "model.safetensors").exists()
    )
    forget_live_policies()
    _update(gens2, advs2, str(saved), str(tmp_path / "c2"), save=False)
    resumed = {n: p.detach() for n, p in live_policy(str(tmp_path / "c2")).model.named_parameters() if p.requires_grad}
    assert resumed.keys() == straight.keys()
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name


def test_merged_export_loads_with_plain_transformers(base, tmp_path):
    gens, advs = _iteration(base, "m", base["model"], seed=5)
    _update(gens, advs, base["model"], str(tmp_path / "ck"), save=False)
    policy = live_policy(str(tmp_path / "ck"))
    save_checkpoint(policy, tmp_path / "final", merge_adapter=True)
    assert is_adapted(policy.model)  # the live policy keeps its adapter
    assert not is_adapter_checkpoint(tmp_path / "final")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert not is_adapted(plain)
    # the engine-sync view: the same merged tensors under the base model's names, no copy
    streamed = dict(merged_weights(policy.model))
    assert streamed.keys() == plain.state_dict().keys()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(streamed[name], value, atol=1e-6, rtol=0, msg=name)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    policy.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=ids).logits, policy.model(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )


def test_lora_settings_from_the_config():
    from flows.config import GRPOConfig

    assert GRPOConfig().lora_settings() is None
    s = GRPOConfig(lora_rank=8, lora_target_modules="q_proj, v_proj").lora_settings()
    assert (s.rank, s.alpha, s.dropout, s.target_modules) == (8, None, 0.0, ("q_proj", "v_proj"))
    with pytest.raises(ValueError, match="lora_rank is 0"):
        GRPOConfig(lora_alpha=16)


@pytest.mark.slow  # a `grpo run` on a Prefect API
def test_a_lora_run_of_the_flow_loads_no_reference_and_checkpoints_adapters(
    tmp_path, tiny_model_dir, prefect_harness, monkeypatch
):
    import json

    from flows.config import GRPOConfig
    from flows.train import grpo_train

    loads = []
    real_load = tasks.generate.load_model
    monkeypatch.setattr(tasks.generate, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(p) + "\n" for p in builtin.train_problems(16, seed=3)))
    config = GRPOConfig(
        run_dir=tmp_path / "run",
        model=str(tiny_model_dir),
        dataset=str(train),
        task="arithmetic",
        iterations=2,
        prompts_per_iteration=4,
        group_size=3,
        max_new_tokens=4,
        beta=0.04,
        micro_batch_size=6,
        lora_rank=4,
        learning_rate=1e-3,
        rewards={"exact_answer": 1.0},
        score_workers=1,
    )
    metrics = grpo_train(config)
    assert loads == [] and metrics["kl"] >= 0
    for it in (1, 2):
        checkpoint = tmp_path / "run" / f"iter-{it:04d}" / "checkpoint"
        assert is_adapter_checkpoint(checkpoint) and not (checkpoint / "model.safetensors").exists()
    final = tmp_path / "run" / "final"  # the merged model, loadable with plain transformers
    assert not is_adapter_checkpoint(final) and not is_adapted(AutoModelForCausalLM.from_pretrained(final))
