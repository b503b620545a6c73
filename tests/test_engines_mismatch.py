"""The sampler's log-probs and what the update does with them: the generations schema that
added them (older files still read), the train/inference mismatch metrics (TRL's names),
the truncated/masked importance-sampling variants, and the refusal of top_p < 1 with them."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data import builtin
from data.schemas import GENERATIONS, PROMPTS, REWARDS, SchemaError
from data.sources import normalise_row, prompts_table
from data.store import iter_batches, read_table, write_table
from flows.config import GRPOConfig
from tasks.advantages import compute_advantages
from tasks.generate import generate_completions
from tasks.model import forget_live_policies
from tasks.objective import MISMATCH_CORRECTIONS, BatchTotals, LossSettings, mismatch_weights, policy_loss
from tasks.update import ArtifactMismatch, update_policy


def test_correction_variants_by_hand():
    rho = torch.tensor([[0.5, 2.0, 4.0], [1.0, 5.0, 1.0]])  # (B=2, C=3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the last token of row 1 is padding
    log_rho = rho.log() * mask
    assert set(MISMATCH_CORRECTIONS) == {"none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"}
    assert MISMATCH_CORRECTIONS["none"](log_rho, mask, 3.0) is None
    assert torch.allclose(
        MISMATCH_CORRECTIONS["token_truncate"](log_rho, mask, 3.0), torch.tensor([[0.5, 2.0, 3.0], [1.0, 3.0, 1.0]])
    )
    assert torch.allclose(
        MISMATCH_CORRECTIONS["token_mask"](log_rho, mask, 3.0), torch.tensor([[0.5, 2.0, 0.0], [1.0, 0.0, 1.0]])
    )
    # Sequence products: row 0 = 0.5 * 2 * 4 = 4, row 1 = 1 * 5 = 5 (padding left out).
    assert torch.allclose(MISMATCH_CORRECTIONS["sequence_truncate"](log_rho, mask, 4.5), torch.tensor([[4.0], [4.5]]))
    assert torch.allclose(MISMATCH_CORRECTIONS["sequence_mask"](log_rho, mask, 4.5), torch.tensor([[4.0], [0.0]]))


def test_truncated_weights_scale_the_policy_term_not_the_kl():
    """loss(TIS) = grpo aggregation of min(rho, C) * surrogate + beta * KL; its gradient is the
    uncorrected one scaled per token (the weights are constants)."""
    torch.manual_seed(0)
    logp = (torch.randn(3, 4) - 2).requires_grad_()
    old = logp.detach() + 0.01 * torch.randn(3, 4)
    sampler = old - torch.tensor([[0.0, 1.5, -0.2, 0.3]] * 3)  # rho = e^1.5 = 4.5 > C on token 1
    ref = logp.detach() - 0.1
    adv, mask = torch.tensor([1.0, -0.5, 2.0]), torch.ones(3, 4)
    totals = BatchTotals(sequences=3, tokens=12, micro_batches=1)
    tis = LossSettings(mismatch_correction="token_truncate", mismatch_cap=3.0, beta=0.1)
    loss, stats = policy_loss(logp, old, adv, mask, ref, tis, totals, sampler)
    w = torch.exp(old - sampler).clamp(max=3.0)
    ratio = torch.exp(logp - old)
    surrogate = -torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None])
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    want = ((surrogate * w + 0.1 * kl).sum(1) / 4).sum() / 3
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert stats["is_ratio_max"] == pytest.approx(3.0) and stats["logp_diff_max"] == pytest.approx(1.5, rel=1e-5)
    plain, plain_stats = policy_loss(logp, old, adv, mask, ref, LossSettings(beta=0.1), totals, sampler)
    assert plain_stats["is_ratio_max"] == pytest.approx(math.exp(1.5), rel=1e-5)  # measured, not applied
    assert plain.item() != pytest.approx(loss.item())


def test_no_mismatch_no_change():
    """Sampler = trainer: every variant leaves the loss and its gradient as they were."""
    torch.manual_seed(1)
    logp = torch.randn(2, 5).requires_grad_()
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 5)
    totals = BatchTotals(sequences=2, tokens=10, micro_batches=1)
    base, _ = policy_loss(logp, logp.detach(), adv, mask, None, LossSettings(beta=0.0), totals)
    (want,) = torch.autograd.grad(base, logp)
    for name in MISMATCH_CORRECTIONS:
        loss, stats = policy_loss(
            logp,
            logp.detach(),
            adv,
            mask,
            None,
            LossSettings(beta=0.0, mismatch_correction=name),
            totals,
            logp.detach(),
        )
        (got,) = torch.autograd.grad(loss, logp)
        assert loss.item() == pytest.approx(base.item()) and torch.allclose(got, want), name
        assert stats["is_ratio_min"] == stats["is_ratio_max"] == 1.0 and stats["logp_diff_max"] == 0.0


def test_a_correction_needs_sampler_logprobs_and_an_untruncated_distribution():
    with pytest.raises(ValueError, match="needs the sampler's log-probs"):
        policy_loss(
            torch.zeros(1, 2),
            torch.zeros(1, 2),
            torch.ones(1),
            torch.ones(1, 2),
            None,
            LossSettings(beta=0.0, mismatch_correction="token_mask"),
            BatchTotals(1, 2, 1),
        )
    with pytest.raises(ValueError, match="unknown mismatch correction 'tis'; known: none, token_truncate"):
        LossSettings(mismatch_correction="tis")
    with pytest.raises(ValueError, match="top_p must be 1"):
        GRPOConfig(mismatch_correction="token_truncate", top_p=0.9)
    GRPOConfig(mismatch_correction="none", top_p=0.9)  # measuring alone is fine
    w, stats = mismatch_weights(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[1.0, 1.0, 0.0]]), LossSettings())
    assert w is None and stats["mismatch_tokens"] == 2


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("mismatch")
    prompts = root / "prompts.parquet"
    rows = [normalise_row(p, data_source="t", row=i) for i, p in enumerate(builtin.train_problems(4, seed=2))]
    write_table(prompts_table(rows), prompts, PROMPTS)
    gens = root / "generations.parquet"
    generate_completions(
        prompts, gens, str(tiny_model_dir), group_size=4, max_new_tokens=5, temperature=0.9, seed=2, device="cpu"
    )
    forget_live_policies()
    table = read_table(gens, GENERATIONS, columns=["prompt_id", "sample_index"])
    rewards = pa.table(
        {
            "prompt_id": table["prompt_id"],
            "sample_index": table["sample_index"],
            "reward": [float(i % 3) for i in range(table.num_rows)],
        },
        schema=REWARDS.schema,
    )
    write_table(rewards, root / "rewards.parquet", REWARDS)
    compute_advantages(root / "rewards.parquet", root / "advantages.parquet")
    return {"root": root, "gens": gens, "adv": root / "advantages.parquet", "model": str(tiny_model_dir)}


def test_hf_engine_sampler_logprobs_and_the_update_metrics(artifacts):
    """The HF engine's log-probs (generate's KV-cache logits) agree with the update's forward
    to float precision: the metrics say so, with TRL's names."""
    rows = read_table(artifacts["gens"], GENERATIONS).to_pylist()
    assert all(len(r["sampler_logprobs"]) == len(r["completion_token_ids"]) for r in rows)
    metrics = update_policy(
        artifacts["gens"],
        artifacts["adv"],
        artifacts["model"],
        str(artifacts["root"] / "out"),
        learning_rate=1e-3,
        loss=LossSettings(beta=0.0, temperature=0.9, mismatch_correction="token_truncate"),
        save=False,
        device="cpu",
    )
    assert metrics["sampling/sampling_logp_difference/mean"] <= metrics["sampling/sampling_logp_difference/max"] <= 1e-4
    assert (
        1 - 1e-4
        <= metrics["sampling/importance_sampling_ratio/min"]
        <= metrics["sampling/importance_sampling_ratio/mean"]
    )
    assert (
        metrics["sampling/importance_sampling_ratio/mean"]
        <= metrics["sampling/importance_sampling_ratio/max"]
        <= 1 + 1e-4
    )


def _as_version_2(src, out):
    """generations.parquet as grpoflow wrote it before sampler_logprobs (schema version 2)."""
    table = pq.read_table(src).drop_columns(["sampler_logprobs"])
    pq.write_table(
        table.replace_schema_metadata({b"grpoflow.artifact": b"generations", b"grpoflow.version": b"2"}), out
    )
    return out


def test_older_generations_still_read_and_train(artifacts):
    old = _as_version_2(artifacts["gens"], artifacts["root"] / "v2.parquet")
    table = read_table(old, GENERATIONS)
    assert table.column("sampler_logprobs").null_count == table.num_rows
    assert read_table(old, GENERATIONS, columns=["prompt_id", "sampler_logprobs"]).column_names == [
        "prompt_id",
        "sampler_logprobs",
    ]
    assert all(b.column("sampler_logprobs").null_count == b.num_rows for b in iter_batches(old, GENERATIONS))
    out = str(artifacts["root"] / "out-v2")
    metrics = update_policy(
        old,
        artifacts["adv"],
        artifacts["model"],
        out,
        learning_rate=1e-3,
        loss=LossSettings(beta=0.0),
        save=False,
        device="cpu",
    )
    assert not any(k.startswith("sampling/") for k in metrics)  # nothing to measure
    with pytest.raises(ArtifactMismatch, match="needs the sampler's log-probs"):
        update_policy(
            old,
            artifacts["adv"],
            artifacts["model"],
            out,
            learning_rate=1e-3,
            save=False,
            device="cpu",
            loss=LossSettings(beta=0.0, mismatch_correction="token_truncate"),
        )
    # A version-3 file (or a table being written) must have the column.
    unversioned = pq.read_table(artifacts["gens"]).drop_columns(["sampler_logprobs"])
    with pytest.raises(SchemaError, match="missing column 'sampler_logprobs'"):
        write_table(unversioned.replace_schema_metadata(None), artifacts["root"] / "bad.parquet", GENERATIONS)
