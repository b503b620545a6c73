"""tasks/objective.py: every advantage estimator and loss variant, exactly as the papers
define them: hand-computed values, properties (hypothesis), and a plain loop-based
reference implementation compared with the vectorised one for every combination."""

from __future__ import annotations

import itertools
import math
import typing
import zlib
from collections import defaultdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.objective import (
    AGGREGATIONS,
    ESTIMATORS,
    IMPORTANCE_SAMPLING,
    SCALES,
    BatchTotals,
    LossSettings,
    group_advantages,
    k3_kl,
    loss_mask,
    policy_loss,
    resolve_scale,
)

NAN = math.nan


def adv(rewards, groups, estimator="grpo", scale=None, eps=1e-4) -> list[float]:
    out = group_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups), estimator, scale, eps)
    return out.advantage.tolist()


# ------------------------------------------------------------------------------------------
# Advantages: hand-computed values
# ------------------------------------------------------------------------------------------

# Three groups: [0, 0, 1, 1] (mean 0.5, Bessel std sqrt(1/3)), [1, 1, 1, 1] (all equal),
# [2, NaN, 4] (valid 2 and 4: mean 3, std sqrt(2); the NaN row is left out).
R = [0, 0, 1, 1, 1, 1, 1, 1, 2, NAN, 4]
G = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
# Batch std over the 10 valid rewards: mean 1.2, squared deviations sum to 11.6, / (10 - 1).
BATCH_STD = math.sqrt(11.6 / 9)


def test_grpo_group_scaling_by_hand():
    s1, s3 = math.sqrt(1 / 3), math.sqrt(2)
    expected = [-0.5 / (s1 + 1e-4)] * 2 + [0.5 / (s1 + 1e-4)] * 2 + [0.0] * 4 + [-1 / (s3 + 1e-4), 0.0, 1 / (s3 + 1e-4)]
    assert adv(R, G) == pytest.approx(expected, abs=1e-12)
    # eps = 0: the textbook values, +-sqrt(3)/2 and +-1/sqrt(2).
    assert adv(R, G, eps=0.0) == pytest.approx(
        [-math.sqrt(3) / 2] * 2 + [math.sqrt(3) / 2] * 2 + [0.0] * 4 + [-1 / math.sqrt(2), 0, 1 / math.sqrt(2)]
    )


def test_grpo_batch_scaling_by_hand():
    expected = [-0.5 / BATCH_STD] * 2 + [0.5 / BATCH_STD] * 2 + [0.0] * 4 + [-1 / BATCH_STD, 0.0, 1 / BATCH_STD]
    assert adv(R, G, scale="batch", eps=0.0) == pytest.approx(expected, abs=1e-12)


def test_dr_grpo_and_grpo_without_scaling_by_hand():
    expected = [-0.5, -0.5, 0.5, 0.5, 0, 0, 0, 0, -1, 0, 1]
    assert adv(R, G, "dr_grpo") == pytest.approx(expected, abs=1e-12)
    assert adv(R, G, "grpo", "none") == pytest.approx(expected, abs=1e-12)


def test_rloo_by_hand():
    # r = 0: the other three average (0 + 1 + 1) / 3 = 2/3; r = 1: (0 + 0 + 1) / 3 = 1/3.
    # Group 3: 2 - 4 = -2 and 4 - 2 = 2 (the NaN row is not one of "the others").
    expected = [-2 / 3, -2 / 3, 2 / 3, 2 / 3, 0, 0, 0, 0, -2, 0, 2]
    assert adv(R, G, "rloo") == pytest.approx(expected, abs=1e-12)
    s1 = math.sqrt(1 / 3)
    assert adv(R, G, "rloo", "group", eps=0.0)[:4] == pytest.approx([-2 / 3 / s1] * 2 + [2 / 3 / s1] * 2)


def test_group_statistics_leave_nan_out_and_detect_equal_rewards_exactly():
    out = group_advantages(
        torch.tensor([0.1, 0.1, 0.1, NAN, NAN, 5.0, NAN], dtype=torch.float64), torch.tensor([0, 0, 0, 1, 1, 2, 2])
    )
    # [0.1, 0.1, 0.1]: floating-point std would be ~1e-17, yet the group is exactly equal.
    assert out.zero_std.tolist() == [True] * 7  # equal / no valid reward / one valid reward
    assert out.advantage.tolist() == [0.0] * 7
    assert out.group_std.tolist() == [0.0] * 7
    assert out.valid.tolist() == [True, True, True, False, False, True, False]
    assert math.isnan(out.group_mean[3]) and out.group_mean[5] == 5.0 and out.group_mean[0] == pytest.approx(0.1)


def test_unknown_names_fail_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'; known: grpo, dr_grpo, rloo"):
        adv([1.0, 0.0], [0, 0], "ppo")
    with pytest.raises(ValueError, match="unknown reward scaling 'global'; known: group, batch, none"):
        adv([1.0, 0.0], [0, 0], "grpo", "global")
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'; known: grpo, bnpo, dapo, dr_grpo"):
        LossSettings(aggregation="mean")
    with pytest.raises(ValueError, match="unknown importance sampling level 'word'; known: token, sequence"):
        LossSettings(importance_sampling="word")
    with pytest.raises(ValueError, match="max_completion_length"):
        LossSettings(aggregation="dr_grpo")
    with pytest.raises(ValueError, match="dr_grpo"):
        resolve_scale("dr_grpo", "group")


def test_config_choices_are_the_tables_names():
    from flows.config import GRPOConfig

    def choices(field):
        args = typing.get_args(GRPOConfig.model_fields[field].annotation)
        return {a for arg in args for a in (typing.get_args(arg) or [arg]) if isinstance(a, str)}

    assert choices("advantage_estimator") == set(ESTIMATORS)
    assert choices("scale_rewards") == set(SCALES)
    assert choices("loss_aggregation") == set(AGGREGATIONS)
    assert choices("importance_sampling_level") == set(IMPORTANCE_SAMPLING)


# ------------------------------------------------------------------------------------------
# Advantages: properties
# ------------------------------------------------------------------------------------------

# Quarter-integers: sums and shifts are exact in binary, so "equal" stays equal under a shift.
reward_values = st.integers(-16, 16).map(lambda k: k / 4)
groups_strategy = st.lists(
    st.lists(st.one_of(reward_values, st.just(NAN)), min_size=1, max_size=6), min_size=1, max_size=5
)


def flat(groups: list[list[float]]) -> tuple[list[float], list[int]]:
    return [r for g in groups for r in g], [i for i, g in enumerate(groups) for _ in g]


@settings(max_examples=150, deadline=None)
@given(groups_strategy, st.sampled_from(["group", "batch", "none"]))
def test_grpo_advantages_have_mean_zero_in_every_group_with_spread(groups, scale):
    rewards, ids = flat(groups)
    a = adv(rewards, ids, "grpo", scale)
    for g, members in enumerate(groups):
        valid = [r for r in members if not math.isnan(r)]
        values = [a[i] for i, gi in enumerate(ids) if gi == g and not math.isnan(rewards[i])]
        if len(set(valid)) > 1:
            assert abs(sum(values)) < 1e-9
        else:
            assert values == [0.0] * len(values)
        assert all(a[i] == 0.0 for i, gi in enumerate(ids) if gi == g and math.isnan(rewards[i]))


@settings(max_examples=150, deadline=None)
@given(
    groups_strategy, st.integers(0, 4), st.integers(-40, 40).map(lambda k: k / 8), st.sampled_from(sorted(ESTIMATORS))
)
def test_adding_a_constant_to_a_group_changes_nothing(groups, which, c, estimator):
    which %= len(groups)
    shifted = [[r + c for r in g] if i == which else g for i, g in enumerate(groups)]
    a = adv(*flat(groups), estimator, "group" if estimator != "dr_grpo" else None)
    b = adv(*flat(shifted), estimator, "group" if estimator != "dr_grpo" else None)
    assert b == pytest.approx(a, abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(groups_strategy, st.floats(0.01, 100.0))
def test_scaling_rewards_leaves_grpo_unchanged_and_scales_dr_grpo(groups, c):
    rewards, ids = flat(groups)
    scaled = [r * c for r in rewards]
    # With eps = 0 exactly; with eps > 0 grpo is unchanged up to the eps/std term.
    assert adv(scaled, ids, "grpo", eps=0.0) == pytest.approx(adv(rewards, ids, "grpo", eps=0.0), rel=1e-9, abs=1e-9)
    assert adv(scaled, ids, "dr_grpo") == pytest.approx(
        [c * x for x in adv(rewards, ids, "dr_grpo")], rel=1e-9, abs=1e-9
    )
    assert adv(scaled, ids, "rloo") == pytest.approx([c * x for x in adv(rewards, ids, "rloo")], rel=1e-9, abs=1e-9)


# ------------------------------------------------------------------------------------------
# Loss: hand-computed values
# ------------------------------------------------------------------------------------------


def one_batch_loss(logp, old, advantages, mask, settings, ref=None, micro=None):
    """Sum of the micro-batch shares of one optimisation batch (micro = rows per micro-batch)."""
    b = logp.shape[0]
    micro = micro or b
    parts = [slice(s, min(s + micro, b)) for s in range(0, b, micro)]
    totals = BatchTotals(sequences=b, tokens=int(mask.sum()), micro_batches=len(parts))
    total = 0.0
    for p in parts:
        loss, _ = policy_loss(
            logp[p], old[p], advantages[p], mask[p], None if ref is None else ref[p], settings, totals
        )
        total = total + loss
    return total


def test_each_aggregation_by_hand():
    # rho = 1, beta = 0: the per-token loss is -A. Completion 0 has 2 tokens (A = 1),
    # completion 1 has 4 (A = -2): token losses [-1, -1] and [2, 2, 2, 2], sum 6, 6 tokens.
    logp = torch.full((2, 4), -1.0)
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1]])
    a = torch.tensor([1.0, -2.0])
    expect = {
        ("grpo", None): (-1 + 2) / 2,  # mean per completion, then over completions
        ("bnpo", None): 6 / 6,  # token mean of the one micro-batch
        ("bnpo", 1): (-2 / 2 + 8 / 4) / 2,  # token mean per micro-batch, averaged over 2
        ("dapo", None): 6 / 6,
        ("dapo", 1): 6 / 6,  # tokens of the whole batch, whatever the micro-batching
        ("dr_grpo", None): 6 / (2 * 8),  # B * L_max with L_max = 8
        ("grpo", 1): (-1 + 2) / 2,
    }
    for (aggregation, micro), value in expect.items():
        s = LossSettings(beta=0.0, aggregation=aggregation, max_completion_length=8)
        assert one_batch_loss(logp, logp, a, mask, s, micro=micro).item() == pytest.approx(value), (aggregation, micro)


def test_clip_and_clip_higher_by_hand():
    def loss(ratio, a, lo=0.2, hi=0.2):
        s = LossSettings(beta=0.0, epsilon_low=lo, epsilon_high=hi)
        old = torch.zeros(1, 1)
        return one_batch_loss(torch.log(torch.tensor([[ratio]])), old, torch.tensor([a]), torch.ones(1, 1), s).item()

    assert loss(1.5, 1.0) == pytest.approx(-1.2)  # min(1.5, 1.2) * 1
    assert loss(1.5, 1.0, hi=0.28) == pytest.approx(-1.28)  # clip-higher lets it rise to 1.28
    assert loss(0.5, -1.0) == pytest.approx(0.8)  # min(-0.5, -0.8): the clip bounds the push down
    assert loss(0.5, 1.0) == pytest.approx(-0.5)  # min(0.5, 0.8): no clip on the helpful side
    assert loss(1.1, 1.0) == pytest.approx(-1.1)  # inside the range


def test_sequence_level_ratio_is_the_geometric_mean_by_hand():
    # token ratios 2 and 1 (and a padded third token): s = sqrt(2 * 1) = 1.41421...
    logp = torch.log(torch.tensor([[2.0, 1.0, 123.0]]))
    old, mask = torch.zeros(1, 3), torch.tensor([[1.0, 1.0, 0.0]])
    s = LossSettings(beta=0.0, importance_sampling="sequence", epsilon_high=1.0)
    assert one_batch_loss(logp, old, torch.tensor([1.0]), mask, s).item() == pytest.approx(-math.sqrt(2))
    clipped = LossSettings(beta=0.0, importance_sampling="sequence")
    assert one_batch_loss(logp, old, torch.tensor([1.0]), mask, clipped).item() == pytest.approx(-1.2)
    token = LossSettings(beta=0.0, epsilon_high=1.0)  # token level: mean of 2 and 1
    assert one_batch_loss(logp, old, torch.tensor([1.0]), mask, token).item() == pytest.approx(-1.5)


def test_k3_kl_by_hand_and_its_weight():
    logp, ref = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]]))
    # pi_ref / pi = 0.5: 0.5 - log(0.5) - 1
    assert k3_kl(logp, ref).item() == pytest.approx(0.5 + math.log(2) - 1)
    assert k3_kl(logp, logp).item() == 0.0
    s = LossSettings(beta=0.1)
    value = one_batch_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), s, ref=ref).item()
    assert value == pytest.approx(0.1 * (0.5 + math.log(2) - 1))
    # padding never overflows exp(): a -1e4 log-prob under a 0 reference is masked first
    padded = k3_kl(torch.tensor([[-1.0, -1e4]]), torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))
    assert torch.isfinite(padded).all() and padded[0, 1] == 0


def test_truncated_completions_add_no_loss_when_masked():
    mask = torch.ones(2, 3)
    truncated = torch.tensor([True, False])
    assert loss_mask(mask, truncated, LossSettings()).tolist() == mask.tolist()
    assert loss_mask(mask, truncated, LossSettings(mask_truncated_completions=True)).tolist() == [[0, 0, 0], [1, 1, 1]]


def test_clip_statistics():
    # ratios 0.5 (A < 0: low clip), 1.5 (A > 0: high clip), 0.5 (A > 0: not clipped), padding.
    logp = torch.log(torch.tensor([[0.5, 1.0], [1.5, 1.0], [0.5, 1.0]]))
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    _, stats = policy_loss(
        logp,
        torch.zeros(3, 2),
        torch.tensor([-1.0, 1.0, 1.0]),
        mask,
        None,
        LossSettings(beta=0.0),
        BatchTotals(3, 3, 1),
    )
    assert (stats["clip_low"], stats["clip_high"], stats["clip_region"], stats["clip_units"], stats["tokens"]) == (
        1,
        1,
        2,
        3,
        3,
    )
    _, seq = policy_loss(
        logp,
        torch.zeros(3, 2),
        torch.tensor([-1.0, 1.0, 1.0]),
        mask,
        None,
        LossSettings(beta=0.0, importance_sampling="sequence"),
        BatchTotals(3, 3, 1),
    )
    assert (seq["clip_low"], seq["clip_high"], seq["clip_units"]) == (1, 1, 3)  # counted per completion


# ------------------------------------------------------------------------------------------
# A plain loop-based reference, compared with the vectorised code on random inputs
# ------------------------------------------------------------------------------------------


def reference_advantages(rewards, groups, estimator, scale, eps):
    """The estimators written out with lists and `math`."""
    members = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    batch = [r for r in rewards if not math.isnan(r)]
    batch_mean = sum(batch) / len(batch) if batch else 0.0
    batch_std = math.sqrt(sum((r - batch_mean) ** 2 for r in batch) / (len(batch) - 1)) if len(batch) > 1 else 0.0
    out = [0.0] * len(rewards)
    for idx in members.values():
        vals = [rewards[i] for i in idx if not math.isnan(rewards[i])]
        n = len(vals)
        if n < 2 or max(vals) == min(vals):
            continue  # no signal: every advantage stays 0
        mean = sum(vals) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        for i in idx:
            r = rewards[i]
            if math.isnan(r):
                continue
            baseline = (sum(vals) - r) / (n - 1) if estimator == "rloo" else mean
            sigma = {"group": std, "batch": batch_std, "none": None}[scale]
            out[i] = (r - baseline) if sigma is None else (r - baseline) / (sigma + eps)
    return out


def reference_loss(logp, old, ref, advantages, lengths, truncated, s: LossSettings, micro: int):
    """The loss of one optimisation batch, one token at a time. logp: (B, C) leaf tensor."""
    b = len(lengths)
    n = [0 if (s.mask_truncated_completions and truncated[i]) else lengths[i] for i in range(b)]
    total_tokens = sum(n)
    parts = [list(range(start, min(start + micro, b))) for start in range(0, b, micro)]
    loss = torch.zeros((), dtype=logp.dtype)
    for part in parts:
        part_tokens = sum(n[i] for i in part)
        for i in part:
            if n[i] == 0:
                continue
            a = advantages[i]
            seq_ratio = torch.exp(sum(logp[i, t] - old[i, t] for t in range(n[i])) / n[i])
            token_losses = []
            for t in range(n[i]):
                ratio = torch.exp(logp[i, t] - old[i, t]) if s.importance_sampling == "token" else seq_ratio
                clipped = torch.clamp(ratio, 1 - s.epsilon_low, 1 + s.epsilon_high)
                value = -torch.minimum(ratio * a, clipped * a)
                if s.beta > 0:
                    d = ref[i, t] - logp[i, t]
                    value = value + s.beta * (torch.exp(d) - d - 1)
                token_losses.append(value)
            seq_sum = sum(token_losses)
            if s.aggregation == "grpo":
                loss = loss + seq_sum / n[i] / b
            elif s.aggregation == "bnpo":
                loss = loss + seq_sum / part_tokens / len(parts)
            elif s.aggregation == "dapo":
                loss = loss + seq_sum / total_tokens
            elif s.aggregation == "dr_grpo":
                loss = loss + seq_sum / (b * s.max_completion_length)
    return loss


ESTIMATOR_SCALES = [
    (e, sc)
    for e in ESTIMATORS
    for sc in SCALES
    if not (ESTIMATORS[e].fixed_scale and sc != ESTIMATORS[e].default_scale)
]


@pytest.mark.parametrize("estimator,scale", ESTIMATOR_SCALES)
@pytest.mark.parametrize("aggregation", list(AGGREGATIONS))
@pytest.mark.parametrize("level", list(IMPORTANCE_SAMPLING))
def test_vectorised_matches_the_loop_reference(estimator, scale, aggregation, level):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{estimator}/{scale}/{aggregation}/{level}".encode()))
    b, c, group = 12, 5, 4
    rewards = torch.randint(0, 3, (b,), generator=gen).double()
    rewards[:group] = 1.0  # a group without spread
    rewards[5] = NAN  # a failed reward function
    groups = [i // group for i in range(b)]
    a = group_advantages(rewards, torch.tensor(groups), estimator, scale, 1e-4).advantage
    assert a.tolist() == pytest.approx(reference_advantages(rewards.tolist(), groups, estimator, scale, 1e-4), abs=1e-9)

    lengths = torch.randint(1, c + 1, (b,), generator=gen).tolist()
    lengths[0] = c
    truncated = [n == c for n in lengths]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(c)] for n in lengths], dtype=torch.float64)
    base = -torch.rand(b, c, generator=gen, dtype=torch.float64) * 3
    old = base + 0.4 * torch.randn(b, c, generator=gen, dtype=torch.float64)  # ratios well outside the clip range
    ref = base + 0.4 * torch.randn(b, c, generator=gen, dtype=torch.float64)
    for (lo, hi), beta, mask_trunc in itertools.product([(0.2, 0.2), (0.2, 0.28)], [0.0, 0.04], [False, True]):
        s = LossSettings(
            epsilon_low=lo,
            epsilon_high=hi,
            beta=beta,
            importance_sampling=level,
            aggregation=aggregation,
            max_completion_length=7,
            mask_truncated_completions=mask_trunc,
        )
        logp = base.clone().requires_grad_(True)
        m = loss_mask(mask, torch.tensor(truncated), s)
        vec = one_batch_loss(logp, old, a, m, s, ref=ref, micro=3)
        (grad_vec,) = torch.autograd.grad(vec, logp)
        logp_ref = base.clone().requires_grad_(True)
        loop = reference_loss(logp_ref, old, ref, a.tolist(), lengths, truncated, s, micro=3)
        (grad_loop,) = torch.autograd.grad(loop, logp_ref)
        label = (lo, hi, beta, mask_trunc)
        assert vec.item() == pytest.approx(loop.item(), abs=1e-6), label
        assert torch.allclose(grad_vec, grad_loop, atol=1e-6), label


# ------------------------------------------------------------------------------------------
# Gradient at rho = 1: grad of the loss = -A x grad log pi, token by token
# ------------------------------------------------------------------------------------------


def aggregation_weight(aggregation, lengths, micro, max_len):
    """w_i,t of each loss token in the batch loss sum_{i,t} w_i,t l_i,t."""
    b = len(lengths)
    parts = [range(s, min(s + micro, b)) for s in range(0, b, micro)]
    weights = []
    for part in parts:
        tokens = sum(lengths[i] for i in part)
        for i in part:
            weights.append(
                {
                    "grpo": 1 / (b * max(lengths[i], 1)),
                    "bnpo": 1 / (max(tokens, 1) * len(parts)),
                    "dapo": 1 / max(sum(lengths), 1),
                    "dr_grpo": 1 / (b * max_len),
                }[aggregation]
            )
    return weights


@settings(max_examples=120, deadline=None)
@given(
    st.lists(st.integers(1, 6), min_size=1, max_size=6),
    st.sampled_from(list(AGGREGATIONS)),
    st.sampled_from(list(IMPORTANCE_SAMPLING)),
    st.integers(1, 6),
    st.tuples(st.floats(0.01, 0.5), st.floats(0.01, 0.5)),
    st.integers(0, 2**31 - 1),
)
def test_gradient_at_ratio_one_is_minus_advantage_times_grad_log_pi(lengths, aggregation, level, micro, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    b, c = len(lengths), max(lengths)
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(c)] for n in lengths], dtype=torch.float64)
    a = torch.randn(b, generator=gen, dtype=torch.float64)
    logp = (-torch.rand(b, c, generator=gen, dtype=torch.float64) * 4).requires_grad_(True)
    s = LossSettings(
        epsilon_low=eps[0],
        epsilon_high=eps[1],
        beta=0.0,
        importance_sampling=level,
        aggregation=aggregation,
        max_completion_length=6,
    )
    loss = one_batch_loss(logp, logp.detach(), a, mask, s, micro=micro)  # mu = 1: pi_old = pi_theta, rho = 1
    (grad,) = torch.autograd.grad(loss, logp)
    w = torch.tensor(aggregation_weight(aggregation, lengths, micro, 6), dtype=torch.float64)
    assert torch.allclose(grad, -a.unsqueeze(1) * w.unsqueeze(1) * mask, atol=1e-12)


@pytest.fixture()
def one_thread():
    """Tiny matrices gain nothing from a second thread; on a busy 2-core machine its
    synchronisation makes each step several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gradient_at_ratio_one_through_a_model(one_thread):
    """dL/dtheta = -sum_i,t w_i,t A_i dlog pi(o_i,t)/dtheta on a real (tiny) network."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tasks.logprobs import completion_logprobs, pack

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=20,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    )
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    completions = [[12, 13], [14, 15, 16, 17], [18]]
    batch = pack(prompts, completions, 0, torch.device("cpu"))
    a = torch.tensor([0.7, -1.3, 0.4])
    lengths = [len(x) for x in completions]
    for aggregation in AGGREGATIONS:
        for level in IMPORTANCE_SAMPLING:
            s = LossSettings(beta=0.0, aggregation=aggregation, importance_sampling=level, max_completion_length=5)
            model.zero_grad()
            logp = completion_logprobs(model, batch, 1.0)
            one_batch_loss(logp, logp.detach(), a, batch.completion_mask, s).backward()
            grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
            logp = completion_logprobs(model, batch, 1.0)
            w = torch.tensor(aggregation_weight(aggregation, lengths, len(lengths), 5)).unsqueeze(1)
            (-(a.unsqueeze(1) * w * logp * batch.completion_mask).sum()).backward()
            for g, p in zip(grads, model.parameters(), strict=True):
                assert torch.allclose(g, p.grad, atol=1e-7, rtol=1e-4), (aggregation, level)
