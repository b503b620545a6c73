"""tasks/update.py on a tiny random Qwen2 model: one model in memory, exact gradient
accumulation, the mu x mini-batch schedule on stored old log-probs, bounded micro-batches."""

from __future__ import annotations

import gc
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GRPOFLOW_PROGRESS", "0")

import pyarrow as pa
import pytest
import torch
from transformers import PreTrainedModel

import tasks.model
import tasks.update
from data import builtin
from data.schemas import ADVANTAGES, GENERATIONS, PROMPTS, REWARDS
from data.sources import normalise_row, prompts_table
from data.store import read_table, write_table
from tasks.advantages import compute_advantages
from tasks.generate import generate_completions
from tasks.logprobs import completion_logprobs, pack
from tasks.model import forget_live_policies, live_policy, load_model
from tasks.objective import BatchTotals, LossSettings, policy_loss
from tasks.update import ArtifactMismatch, load_training_rows, split_mini_batches, update_policy
from tests.conftest import save_tiny_qwen2

PRACTITIONER_METRICS = {
    "policy_loss",
    "kl",
    "entropy",
    "grad_norm",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "completions/mean_length",
    "completions/clipped_ratio",
    "update/tokens_per_second",
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices gain nothing from a second thread, and on a busy 2-core machine its
    synchronisation makes every step several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_live_policy():
    forget_live_policies()
    yield
    forget_live_policies()


def _rewrite(path, out, change):
    rows = [change(r) for r in read_table(path, GENERATIONS).to_pylist()]
    write_table(pa.Table.from_pylist(rows, schema=GENERATIONS.schema), out, GENERATIONS)
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A tiny model on disk; 6 prompts x 4 completions (and x 8) with reference log-probs;
    random rewards with spread; their advantages."""
    root = tmp_path_factory.mktemp("update")
    model_dir = save_tiny_qwen2(root / "model")
    prompts = root / "prompts.parquet"
    rows = [normalise_row(p, data_source="t", row=i) for i, p in enumerate(builtin.train_problems(6, seed=5))]
    write_table(prompts_table(rows), prompts, PROMPTS)
    out = {"model": str(model_dir), "root": root}
    for g in (4, 8):
        gens = root / f"generations-{g}.parquet"
        generate_completions(
            prompts,
            gens,
            str(model_dir),
            group_size=g,
            max_new_tokens=5,
            reference_path=str(model_dir),
            use_chat_template=False,
            seed=1,
            device="cpu",
        )
        forget_live_policies()
        table = read_table(gens, GENERATIONS, columns=["prompt_id", "sample_index"])
        rng = random.Random(g)
        rewards = pa.table(
            {
                "prompt_id": table["prompt_id"],
                "sample_index": table["sample_index"],
                "reward": [float(rng.randint(0, 3)) for _ in range(table.num_rows)],
            },
            schema=REWARDS.schema,
        )
        write_table(rewards, root / f"rewards-{g}.parquet", REWARDS)
        compute_advantages(root / f"rewards-{g}.parquet", root / f"advantages-{g}.parquet")
        out[g] = (str(gens), str(root / f"advantages-{g}.parquet"))
    gc.collect()
    return out


def run(artifacts, group=4, gens=None, **kw):
    gens_path, adv_path = artifacts[group]
    settings = dict(
        learning_rate=1e-3, loss=LossSettings(beta=0.04), micro_batch_size=64, save=False, seed=3, device="cpu"
    )
    return update_policy(
        gens or gens_path, adv_path, artifacts["model"], str(artifacts["root"] / "out"), **settings | kw
    )


def live_models() -> int:
    """Whole models alive in this process (a Qwen2ForCausalLM holds a Qwen2Model, which is a
    PreTrainedModel too: only the outermost ones count)."""
    gc.collect()
    models = [o for o in gc.get_objects() if PreTrainedModel in type(o).__mro__]
    inner = {id(m) for o in models for m in o.modules() if m is not o}
    return sum(id(o) not in inner for o in models)


def test_with_beta_the_update_holds_exactly_one_model(artifacts, monkeypatch):
    before = live_models()  # 0 unless another test module keeps a model of its own alive
    loads, seen = [], []
    monkeypatch.setattr(tasks.model, "load_model", lambda *a, **k: loads.append(a[0]) or load_model(*a, **k))
    original = tasks.update.completion_logprobs

    def counting(model, batch, *a, **k):
        seen.append(live_models())
        return original(model, batch, *a, **k)

    monkeypatch.setattr(tasks.update, "completion_logprobs", counting)
    metrics = run(artifacts, loss=LossSettings(beta=0.04), micro_batch_size=10)
    assert [n - before for n in seen] == [1, 1, 1]  # 24 completions in micro-batches of 10: one model at every forward
    assert loads == [artifacts["model"]]  # the policy only; reference log-probs come from the artifact
    assert PRACTITIONER_METRICS <= set(metrics)
    # One on-policy step from the reference itself: ratio 1 (nothing clipped) and KL 0.
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["clip_ratio/region_mean"] == 0.0
    assert metrics["update/optimizer_steps"] == 1 and metrics["update/trained_completions"] == 24
    assert metrics["entropy"] > 0 and metrics["grad_norm"] > 0


def capture_gradients(monkeypatch) -> list[list[torch.Tensor]]:
    """Gradients of every optimiser step, taken just before the norm clip."""
    steps = []
    clip = torch.nn.utils.clip_grad_norm_

    def record(params, *a, **k):
        params = list(params)
        steps.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params])
        return clip(params, *a, **k)

    monkeypatch.setattr(tasks.update.torch.nn.utils, "clip_grad_norm_", record)
    return steps


@pytest.mark.parametrize("aggregation,level", [("grpo", "token"), ("dapo", "sequence"), ("dr_grpo", "token")])
def test_micro_batches_accumulate_to_the_full_batch_gradient(artifacts, monkeypatch, aggregation, level):
    steps = capture_gradients(monkeypatch)
    loss = LossSettings(beta=0.04, aggregation=aggregation, importance_sampling=level, max_completion_length=5)
    whole = run(artifacts, loss=loss, micro_batch_size=64)
    forget_live_policies()
    split = run(artifacts, loss=loss, micro_batch_size=5)
    assert len(steps) == 2
    for a, b in zip(*steps, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert whole["policy_loss"] == pytest.approx(split["policy_loss"], abs=1e-6)


def test_mu_and_mini_batches_follow_a_plain_ppo_loop_on_stored_old_logprobs(artifacts):
    """mu = 2 passes x 2 mini-batches = 4 AdamW steps, replayed here by hand."""
    loss = LossSettings(beta=0.04, epsilon_high=0.28, aggregation="dapo")
    metrics = run(artifacts, loss=loss, mu=2, mini_batches=2, learning_rate=5e-3)
    trained = [p.detach().clone() for p in live_policy(str(artifacts["root"] / "out")).model.parameters()]
    assert metrics["update/optimizer_steps"] == 4
    assert metrics["clip_ratio/region_mean"] > 0  # later steps see ratios away from 1 and clip
    forget_live_policies()

    def by_hand(use_stored_old: bool) -> list[torch.Tensor]:
        model = load_model(artifacts["model"], torch.device("cpu"), torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
        rows = load_training_rows(artifacts[4][0], artifacts[4][1])
        rng = random.Random(3)
        model.train()
        for _ in range(2):
            for mini in split_mini_batches(len(rows), 2, rng):
                chunk = [rows[i] for i in mini]
                batch = pack(
                    [r["prompt_token_ids"] for r in chunk],
                    [r["completion_token_ids"] for r in chunk],
                    0,
                    torch.device("cpu"),
                )
                logp = completion_logprobs(model, batch, 1.0)
                width = logp.shape[1]

                def pad(key, chunk=chunk, width=width):
                    return torch.tensor([r[key] + [0.0] * (width - len(r[key])) for r in chunk])

                old = pad("old_logprobs") if use_stored_old else logp.detach()
                totals = BatchTotals(len(chunk), int(batch.completion_mask.sum()), 1)
                value, _ = policy_loss(
                    logp,
                    old,
                    torch.tensor([r["advantage"] for r in chunk]),
                    batch.completion_mask,
                    pad("ref_logprobs"),
                    loss,
                    totals,
                )
                value.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(trained, by_hand(use_stored_old=True), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # ...and not the loop that (wrongly) takes the current policy as pi_old at every step.
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(trained, by_hand(use_stored_old=False), strict=True))


def test_the_ratio_uses_the_stored_old_logprobs(artifacts, tmp_path):
    shifted = _rewrite(
        artifacts[4][0],
        tmp_path / "generations.parquet",
        lambda r: r | {"old_logprobs": [x + 0.5 for x in r["old_logprobs"]]},
    )
    metrics = run(artifacts, gens=str(shifted), loss=LossSettings(beta=0.0))
    # rho = exp(-0.5) = 0.61 < 0.8 on every token: clipped wherever A < 0, never above.
    assert metrics["clip_ratio/low_mean"] > 0.2 and metrics["clip_ratio/high_mean"] == 0.0
    assert metrics["clip_ratio/region_mean"] == metrics["clip_ratio/low_mean"]
    assert "kl" not in metrics  # beta = 0: no KL term and no reference log-probs needed


def test_micro_batches_bound_the_forward_size_whatever_the_group_size(artifacts, monkeypatch):
    sizes = []
    original = tasks.update.completion_logprobs
    monkeypatch.setattr(
        tasks.update,
        "completion_logprobs",
        lambda model, batch, *a, **k: sizes.append(batch.input_ids.shape[0]) or original(model, batch, *a, **k),
    )
    metrics = run(artifacts, group=8, micro_batch_size=3, mini_batches=2)
    kept = metrics["update/trained_completions"]
    assert max(sizes) <= 3 and sum(sizes) == kept == 48
    assert metrics["update/optimizer_steps"] == 2


def test_only_kept_rows_are_trained(artifacts, tmp_path):
    compute_advantages(
        artifacts["root"] / "rewards-4.parquet", tmp_path / "adv.parquet", dynamic_sampling=True, target_groups=2
    )
    kept = read_table(tmp_path / "adv.parquet", ADVANTAGES)["kept"].to_pylist()
    assert sum(kept) == 8  # 2 groups of 4
    metrics = update_policy(
        artifacts[4][0],
        tmp_path / "adv.parquet",
        artifacts["model"],
        str(tmp_path / "out"),
        learning_rate=1e-3,
        loss=LossSettings(beta=0.0),
        save=False,
        device="cpu",
    )
    assert metrics["update/trained_completions"] == 8
    assert metrics["completions/mean_length"] > 0  # length metrics cover every sampled completion


def test_truncated_completions_add_no_gradient_when_masked(artifacts, tmp_path, monkeypatch):
    cut = _rewrite(artifacts[4][0], tmp_path / "generations.parquet", lambda r: r | {"finish_reason": "length"})
    steps = capture_gradients(monkeypatch)
    masked = run(artifacts, gens=str(cut), loss=LossSettings(beta=0.04, mask_truncated_completions=True))
    forget_live_policies()
    run(artifacts, gens=str(cut), loss=LossSettings(beta=0.04, mask_truncated_completions=False))
    assert all(float(g.abs().max()) == 0.0 for g in steps[0])
    assert any(float(g.abs().max()) > 0.0 for g in steps[1])
    assert masked["policy_loss"] == 0.0 and masked["completions/clipped_ratio"] == 1.0


def test_beta_needs_reference_logprobs(artifacts, tmp_path):
    bare = _rewrite(artifacts[4][0], tmp_path / "generations.parquet", lambda r: r | {"ref_logprobs": None})
    with pytest.raises(ArtifactMismatch, match="no reference log-probs"):
        run(artifacts, gens=str(bare), loss=LossSettings(beta=0.04))
    assert run(artifacts, gens=str(bare), loss=LossSettings(beta=0.0))["update/optimizer_steps"] == 1


def test_split_mini_batches_covers_every_row_once():
    parts = split_mini_batches(10, 3, random.Random(0))
    assert sorted(len(p) for p in parts) == [3, 3, 4] and sorted(i for p in parts for i in p) == list(range(10))
    assert len(split_mini_batches(2, 4, random.Random(0))) == 2  # empty mini-batches are left out
    assert split_mini_batches(0, 2, random.Random(0)) == []


def _trained_weights(artifacts) -> list[torch.Tensor]:
    weights = [p.detach().clone() for p in live_policy(str(artifacts["root"] / "out")).model.parameters()]
    forget_live_policies()
    return weights


def test_a_single_step_without_stored_old_logprobs_equals_one_with_them(artifacts, tmp_path, monkeypatch):
    """mu = 1, one mini-batch: the generate stage stores no old log-probs; the update's own
    detached log-probs must give the same gradient, step and metrics as the stored ones."""
    bare = _rewrite(artifacts[4][0], tmp_path / "generations.parquet", lambda r: r | {"old_logprobs": None})
    steps = capture_gradients(monkeypatch)
    loss = LossSettings(beta=0.04, epsilon_high=0.28)
    stored = run(artifacts, loss=loss, micro_batch_size=10)
    with_stored = _trained_weights(artifacts)
    detached = run(artifacts, gens=str(bare), loss=loss, micro_batch_size=10)
    without = _trained_weights(artifacts)
    for a, b in zip(*steps, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    for a, b in zip(with_stored, without, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert detached["policy_loss"] == pytest.approx(stored["policy_loss"], abs=1e-6)
    assert detached["clip_ratio/region_mean"] == 0.0


def test_several_steps_refuse_generations_without_old_logprobs(artifacts, tmp_path):
    bare = _rewrite(artifacts[4][0], tmp_path / "generations.parquet", lambda r: r | {"old_logprobs": None})
    for schedule in ({"mu": 2}, {"mini_batches": 2}):
        with pytest.raises(ArtifactMismatch, match="need the sampling policy's log-probs"):
            run(artifacts, gens=str(bare), **schedule)


def _checkpointing(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_gradient_checkpointing_gives_the_same_step(artifacts, monkeypatch):
    steps = capture_gradients(monkeypatch)
    during = []
    original = tasks.update.completion_logprobs
    monkeypatch.setattr(
        tasks.update,
        "completion_logprobs",
        lambda model, *a, **k: during.append(_checkpointing(model)) or original(model, *a, **k),
    )
    plain = run(artifacts, micro_batch_size=10)
    forget_live_policies()
    checkpointed = run(artifacts, micro_batch_size=10, gradient_checkpointing=True)
    assert during == [False] * 3 + [True] * 3
    for a, b in zip(*steps, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert checkpointed["policy_loss"] == pytest.approx(plain["policy_loss"], abs=1e-6)
    assert not _checkpointing(
        live_policy(str(artifacts["root"] / "out")).model
    )  # off again: the live policy goes on to generate


def _advantages_with_flat_groups(artifacts, tmp_path, flat_every: int = 2, group: int = 4) -> str:
    """The fixture's generations with rewards equal within every `flat_every`-th group (their
    advantages are exactly 0) and spread in the others."""
    gens = read_table(artifacts[group][0], GENERATIONS, columns=["prompt_id", "sample_index"])
    order = list(dict.fromkeys(gens["prompt_id"].to_pylist()))
    rewards = [
        1.0 if order.index(pid) % flat_every == 0 else float(k % 3)
        for pid, k in zip(gens["prompt_id"].to_pylist(), gens["sample_index"].to_pylist(), strict=True)
    ]
    table = pa.table(
        {"prompt_id": gens["prompt_id"], "sample_index": gens["sample_index"], "reward": rewards}, schema=REWARDS.schema
    )
    write_table(table, tmp_path / "rewards.parquet", REWARDS)
    compute_advantages(tmp_path / "rewards.parquet", tmp_path / "advantages.parquet")
    return str(tmp_path / "advantages.parquet")


def _weights_at(path) -> list[torch.Tensor]:
    weights = [p.detach().clone() for p in live_policy(str(path)).model.parameters()]
    forget_live_policies()
    return weights


def _forward_rows(monkeypatch) -> list[int]:
    rows = []
    original = tasks.update.completion_logprobs
    monkeypatch.setattr(
        tasks.update,
        "completion_logprobs",
        lambda model, batch, *a, **k: rows.append(batch.input_ids.shape[0]) or original(model, batch, *a, **k),
    )
    return rows


@pytest.mark.parametrize(
    "schedule",
    [
        dict(aggregation="grpo"),
        dict(aggregation="dapo", mu=2, mini_batches=2),
        dict(aggregation="dr_grpo", level="sequence"),
    ],
)
def test_with_beta_0_zero_advantage_completions_are_not_forwarded_and_the_step_is_the_same(
    artifacts, tmp_path, monkeypatch, schedule
):
    schedule = dict(schedule)
    loss = LossSettings(
        beta=0.0,
        aggregation=schedule.pop("aggregation"),
        importance_sampling=schedule.pop("level", "token"),
        max_completion_length=5,
    )
    adv = _advantages_with_flat_groups(artifacts, tmp_path)
    zero = sum(a == 0.0 for a in read_table(adv, ADVANTAGES)["advantage"].to_pylist())
    assert zero == 12  # 3 of the 6 groups are flat

    def update(skip: bool) -> tuple[dict, list[torch.Tensor], list[int], list[list[torch.Tensor]]]:
        if not skip:
            monkeypatch.setattr(tasks.update, "zero_gradient", lambda row, loss: False)
        rows, grads = _forward_rows(monkeypatch), capture_gradients(monkeypatch)
        metrics = update_policy(
            artifacts[4][0],
            adv,
            artifacts["model"],
            str(tmp_path / "out"),
            learning_rate=1e-4,
            loss=loss,
            micro_batch_size=5,
            save=False,
            seed=3,
            device="cpu",
            **schedule,
        )
        monkeypatch.undo()
        return metrics, _weights_at(tmp_path / "out"), rows, grads

    skipped, skipped_weights, skipped_rows, skipped_grads = update(skip=True)
    full, full_weights, full_rows, full_grads = update(skip=False)
    passes = schedule.get("mu", 1)
    assert (
        sum(full_rows) == 24 * passes and sum(skipped_rows) == 12 * passes
    )  # the flat groups never went through the model
    assert skipped["update/zero_gradient_completions"] == 12 and full["update/zero_gradient_completions"] == 0
    for a, b in zip([g for step in skipped_grads for g in step], [g for step in full_grads for g in step], strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)  # the same gradient at every step
    start = [p.detach() for p in load_model(artifacts["model"], torch.device("cpu"), torch.float32).parameters()]
    assert (
        max(float((a - b).abs().max()) for a, b in zip(full_weights, start, strict=True)) > 5e-5
    )  # the step is a real one...
    # ...and the same to 1e-6 without the zero-advantage completions. (Adam divides by the root
    # of the squared gradient, so float noise of ~1e-9 in a near-zero gradient entry moves that
    # weight by up to ~lr: any change of summation order, micro-batching included, does that.)
    for a, b in zip(skipped_weights, full_weights, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    for name in ("policy_loss", "grad_norm", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert skipped[name] == pytest.approx(full[name], abs=1e-6), name


def test_a_step_with_nothing_to_forward_still_moves_adam_as_zero_gradients_do(artifacts, tmp_path, monkeypatch):
    """Every completion of zero advantage (beta 0): no forward at all, and AdamW's step from
    its moments is the one that zero gradients from a backward pass give."""
    flat = tmp_path / "flat"
    flat.mkdir()
    spread = _advantages_with_flat_groups(artifacts, tmp_path, flat_every=1000)  # only the first group flat
    all_flat = _advantages_with_flat_groups(artifacts, flat, flat_every=1)
    settings = dict(learning_rate=1e-3, loss=LossSettings(beta=0.0), micro_batch_size=8, save=False, device="cpu")

    def two_steps(skip: bool) -> tuple[dict, list[torch.Tensor], list[int]]:
        update_policy(
            artifacts[4][0], spread, artifacts["model"], str(tmp_path / "one"), **settings
        )  # gives AdamW moments
        if not skip:
            monkeypatch.setattr(tasks.update, "zero_gradient", lambda row, loss: False)
        rows = _forward_rows(monkeypatch)
        before = [p.detach().clone() for p in live_policy(str(tmp_path / "one")).model.parameters()]
        metrics = update_policy(artifacts[4][0], all_flat, str(tmp_path / "one"), str(tmp_path / "out"), **settings)
        monkeypatch.undo()
        after = _weights_at(tmp_path / "out")
        assert any(
            not torch.equal(a, b) for a, b in zip(before, after, strict=True)
        )  # momentum alone moves the weights
        return metrics, after, rows

    skipped, skipped_weights, skipped_rows = two_steps(skip=True)
    full, full_weights, full_rows = two_steps(skip=False)
    assert skipped_rows == [] and sum(full_rows) == 24
    for a, b in zip(skipped_weights, full_weights, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert skipped["grad_norm"] == full["grad_norm"] == 0.0 and skipped["update/optimizer_steps"] == 1
    assert (
        skipped["update/zero_gradient_completions"] == 24 and skipped["entropy"] != skipped["entropy"]
    )  # NaN: nothing forwarded


def test_micro_batches_hold_completions_of_similar_length(artifacts, monkeypatch):
    """Sorted by length before being cut: fewer padded positions than the shuffled order, the
    same step (test_micro_batches_accumulate_to_the_full_batch_gradient); bnpo keeps the order."""
    shapes = []
    original = tasks.update.completion_logprobs
    monkeypatch.setattr(
        tasks.update,
        "completion_logprobs",
        lambda model, batch, *a, **k: shapes.append(tuple(batch.input_ids.shape)) or original(model, batch, *a, **k),
    )
    rows = load_training_rows(*artifacts[8])
    lengths = {len(r["prompt_token_ids"]) + len(r["completion_token_ids"]) for r in rows}
    assert len(lengths) > 3  # the fixture's completions and prompts do vary in length
    run(artifacts, group=8, micro_batch_size=6, loss=LossSettings(beta=0.04, aggregation="grpo"))
    sorted_cells = sum(b * w for b, w in shapes)
    shapes.clear()
    forget_live_policies()
    run(artifacts, group=8, micro_batch_size=6, loss=LossSettings(beta=0.04, aggregation="bnpo"))
    shuffled_cells = sum(b * w for b, w in shapes)
    assert sum(b for b, _ in shapes) == 48 and sorted_cells < shuffled_cells


def test_bnpo_micro_batches_are_cut_in_the_shuffled_order_with_every_completion():
    loss = LossSettings(beta=0.0, aggregation="bnpo")
    rows = [
        {
            "prompt_token_ids": [1] * n,
            "completion_token_ids": [2] * (6 - n),
            "finish_reason": "eos",
            "advantage": float(n % 2),
        }
        for n in range(6)
    ]
    micro, idle = tasks.update.plan_micro_batches(rows, 4, loss)
    assert micro == [rows[:4], rows[4:]] and idle == []  # its normaliser is each micro-batch's own token count
    micro, idle = tasks.update.plan_micro_batches(rows, 4, LossSettings(beta=0.0))
    assert idle == [rows[0], rows[2], rows[4]] and micro == [[rows[1], rows[3], rows[5]]]
