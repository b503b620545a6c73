"""The GRPO objective and its published variants, as small pure torch functions.

Symbols (DeepSeekMath, arXiv:2402.03300): q a prompt, o_1..o_G its G sampled completions
(a *group*), r_i the reward of o_i, A_i its advantage, pi_theta the policy being trained,
pi_old the policy that sampled the o_i, pi_ref the frozen reference, |o_i| the number of
completion tokens of o_i. docs/objective.md has the same formulas with their derivations
and the reason for every default.

Advantages (one number per completion, computed once per iteration)::

    grpo     A_i = (r_i - mean_g(r)) / (std_g(r) + eps)      DeepSeekMath sec. 4.1.2 (outcome supervision)
    dr_grpo  A_i =  r_i - mean_g(r)                          Dr. GRPO, arXiv:2503.20783 sec. 3.2
    rloo     A_i =  r_i - 1/(n_g - 1) sum_{j != i} r_j       RLOO (Kool et al. 2019; Ahmadian et al. 2024)

    std_g is Bessel's (n - 1) std of the group; `scale` picks the divisor: the group's std
    (`group`), one std over the whole batch (`batch`, Dr. GRPO/TRL), or none (`none`).
    NaN rewards are left out of n_g, mean_g and std_g and get A = 0; a group whose valid
    rewards are all equal (or that has fewer than two) gets A = 0 for every member.

Policy loss (per micro-batch, summed over micro-batches into one optimiser step)::

    w_i,t  = pi_theta(o_i,t | q, o_i,<t) / pi_old(o_i,t | q, o_i,<t)   token level (DeepSeekMath)
    s_i    = exp( 1/|o_i| sum_t log w_i,t )                            sequence level (GSPO, arXiv:2507.18071)
    l_i,t  = -min( w A_i, clip(w, 1 - eps_low, 1 + eps_high) A_i ) + beta D_i,t
                                                                       clip-higher: DAPO, arXiv:2503.14476 sec. 3.1
    D_i,t  = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1                k3 estimator of KL(pi_theta || pi_ref),
                                                                       DeepSeekMath eq. 4

    aggregation (B completions of one optimisation batch, micro-batches m of it):
    grpo     1/B sum_i 1/|o_i| sum_t l_i,t                   DeepSeekMath eq. 3
    bnpo     1/M sum_m ( sum_{i in m,t} l_i,t / sum_{i in m} |o_i| )   token mean per micro-batch (TRL `bnpo`)
    dapo     sum_{i,t} l_i,t / sum_i |o_i|                   DAPO sec. 3.3: token mean over the whole optimisation batch
    dr_grpo  sum_{i,t} l_i,t / (B * L_max)                   Dr. GRPO sec. 3.2: a constant normaliser

Train/inference mismatch correction (the sampler's kernels are not the trainer's)::

    rho_i,t = pi_old(o_i,t | .) / pi_sampler(o_i,t | .)      pi_sampler: the generation engine's own log-probs
    l_i,t  <- w_i,t l_i,t  before the KL term, w from MISMATCH_CORRECTIONS:
    token_truncate min(rho, C) (TIS), token_mask rho 1[rho <= C], sequence_* the same on prod_t rho

Every variant is a small function in a table (name -> function); `pick` turns an unknown
name into an error that lists the known ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


def pick(table: Mapping[str, T], name: str, what: str) -> T:
    """`table[name]`, or a ValueError naming `what` and every known name."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} '{name}'; known: {', '.join(table)}") from None


# ==========================================================================================
# Advantages
# ==========================================================================================


@dataclass(frozen=True)
class GroupStats:
    """Per-row statistics of each row's group, over the group's valid (non-NaN) rewards."""

    valid: torch.Tensor  # (N,) bool: the reward is a number
    count: torch.Tensor  # (N,) float64: n_g, valid rewards in the row's group
    total: torch.Tensor  # (N,) float64: sum of the group's valid rewards
    mean: torch.Tensor  # (N,) float64: mean_g (NaN when the group has no valid reward)
    std: torch.Tensor  # (N,) float64: std_g with Bessel's correction (0 when n_g < 2)
    zero_std: torch.Tensor  # (N,) bool: the group's valid rewards are all equal (or n_g < 2)


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> GroupStats:
    """n_g, mean_g, std_g (Bessel) of every row's group, NaN rewards left out.

    rewards: (N,) float, NaN where the reward could not be computed; group_ids: (N,) long
    in [0, num_groups). "All equal" is decided exactly (max == min), not by std > 0: the
    std of equal floats such as [0.1, 0.1, 0.1] comes out ~1e-17, not 0.
    """
    rewards = rewards.double()  # (N,)
    valid = ~torch.isnan(rewards)  # (N,)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))  # (N,) NaN -> 0, weighted out below
    num_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
    zeros = torch.zeros(num_groups, dtype=torch.float64)
    count = zeros.index_add(0, group_ids, valid.double())  # (G,)
    total = zeros.index_add(0, group_ids, r)  # (G,)
    mean = total / count  # (G,) NaN for a group without valid rewards
    dev2 = torch.where(valid, (r - mean[group_ids]) ** 2, torch.zeros_like(r))  # (N,)
    var = zeros.index_add(0, group_ids, dev2) / (count - 1).clamp(min=1)  # (G,)
    hi = torch.full((num_groups,), -math.inf, dtype=torch.float64).scatter_reduce(
        0, group_ids, torch.where(valid, r, torch.full_like(r, -math.inf)), "amax"
    )  # (G,)
    lo = torch.full((num_groups,), math.inf, dtype=torch.float64).scatter_reduce(
        0, group_ids, torch.where(valid, r, torch.full_like(r, math.inf)), "amin"
    )  # (G,)
    zero_std = (count < 2) | (hi == lo)  # (G,)
    std = torch.where(zero_std, zeros, var.sqrt())  # (G,)
    return GroupStats(valid, count[group_ids], total[group_ids], mean[group_ids], std[group_ids], zero_std[group_ids])


def center_group_mean(rewards: torch.Tensor, stats: GroupStats) -> torch.Tensor:
    """r_i - mean_g(r): the group-mean baseline of GRPO and Dr. GRPO.  (N,) -> (N,)"""
    return rewards.double() - stats.mean


def center_leave_one_out(rewards: torch.Tensor, stats: GroupStats) -> torch.Tensor:
    """r_i - 1/(n_g - 1) sum_{j != i} r_j: the RLOO baseline (the mean of the *other* valid
    rewards of the group), = n/(n-1) (r_i - mean_g).  (N,) -> (N,)"""
    r = rewards.double()
    return r - (stats.total - r) / (stats.count - 1).clamp(min=1)


def scale_group(rewards: torch.Tensor, stats: GroupStats) -> torch.Tensor | None:
    """std_g: each group's own std (DeepSeekMath).  (N,)"""
    return stats.std


def scale_batch(rewards: torch.Tensor, stats: GroupStats) -> torch.Tensor | None:
    """One std (Bessel) over every valid reward of the batch, for all rows: group mean,
    batch std (TRL scale_rewards="batch"; "Lite PPO" of arXiv:2508.08221). No group is
    up-weighted for having a small spread, the question-difficulty bias of Dr. GRPO sec. 3.1.
    (N,)"""
    r = rewards.double()[stats.valid]
    std = r.std() if r.numel() > 1 else torch.zeros((), dtype=torch.float64)
    return std.expand(rewards.shape[0])


def scale_none(rewards: torch.Tensor, stats: GroupStats) -> torch.Tensor | None:
    """No division by a std (Dr. GRPO)."""
    return None


@dataclass(frozen=True)
class Estimator:
    center: Callable[[torch.Tensor, GroupStats], torch.Tensor]  # r -> r - baseline
    default_scale: str  # the scaling its paper uses
    fixed_scale: bool  # True: the estimator *is* its scaling (dr_grpo is "no std")


ESTIMATORS: dict[str, Estimator] = {
    "grpo": Estimator(center_group_mean, "group", False),
    "dr_grpo": Estimator(center_group_mean, "none", True),
    "rloo": Estimator(center_leave_one_out, "none", False),
}
SCALES: dict[str, Callable[[torch.Tensor, GroupStats], torch.Tensor | None]] = {
    "group": scale_group,
    "batch": scale_batch,
    "none": scale_none,
}


def resolve_scale(estimator: str, scale: str | None) -> str:
    """The std scaling an estimator uses: its paper's when `scale` is None; an explicit
    choice must be one the estimator admits (dr_grpo is defined without a std)."""
    est = pick(ESTIMATORS, estimator, "advantage estimator")
    if scale is None:
        return est.default_scale
    pick(SCALES, scale, "reward scaling")
    if est.fixed_scale and scale != est.default_scale:
        raise ValueError(
            f"advantage estimator '{estimator}' is defined with scale_rewards '{est.default_scale}' (got '{scale}'); "
            f"use advantage_estimator 'grpo' for std scaling"
        )
    return scale


@dataclass(frozen=True)
class GroupAdvantages:
    advantage: torch.Tensor  # (N,) float64
    group_mean: torch.Tensor  # (N,) mean_g over the group's valid rewards (NaN if none)
    group_std: torch.Tensor  # (N,) std_g (Bessel) over the group's valid rewards
    valid: torch.Tensor  # (N,) bool: the reward is a number
    zero_std: torch.Tensor  # (N,) bool: the row's group carries no learning signal


def group_advantages(
    rewards: torch.Tensor,  # (N,) NaN where a reward function failed
    group_ids: torch.Tensor,  # (N,) long in [0, num_groups)
    estimator: str = "grpo",
    scale: str | None = None,  # None: the estimator's own (grpo: group, dr_grpo/rloo: none)
    eps: float = 1e-4,
) -> GroupAdvantages:
    """A_i = (r_i - b_i) / (sigma_i + eps), b_i the estimator's baseline, sigma_i the scaling's
    std (no division for `none`); A_i = 0 for NaN rewards and for groups of equal rewards."""
    est = pick(ESTIMATORS, estimator, "advantage estimator")
    divisor = SCALES[resolve_scale(estimator, scale)]
    stats = group_stats(rewards, group_ids)
    centered = est.center(rewards, stats)  # (N,)
    sigma = divisor(rewards, stats)  # (N,) or None
    advantage = centered if sigma is None else centered / (sigma + eps)
    advantage = torch.where(stats.valid & ~stats.zero_std, advantage, torch.zeros_like(advantage))
    return GroupAdvantages(advantage, stats.mean, stats.std, stats.valid, stats.zero_std)


# ==========================================================================================
# Policy loss
# ==========================================================================================


@dataclass(frozen=True)
class LossSettings:
    epsilon_low: float = 0.2  # clip below at 1 - eps_low (PPO/DeepSeekMath 0.2)
    epsilon_high: float = 0.2  # clip above at 1 + eps_high (DAPO clip-higher: 0.28)
    beta: float = 0.04  # k3 KL weight (DeepSeekMath); 0 needs no reference log-probs
    temperature: float = 1.0  # must match sampling: log-probs are of softmax(logits / T)
    importance_sampling: str = "token"  # "token" (GRPO) or "sequence" (GSPO)
    aggregation: str = "grpo"  # "grpo", "bnpo", "dapo", "dr_grpo"
    max_completion_length: int | None = None  # L_max of Dr. GRPO's normaliser B * L_max
    mask_truncated_completions: bool = False  # completions cut by the length limit add no loss
    mismatch_correction: str = "none"  # train/inference mismatch weights: see MISMATCH_CORRECTIONS
    mismatch_cap: float = 3.0  # C of the truncated/masked importance weights (TRL's default cap)

    def __post_init__(self) -> None:
        pick(IMPORTANCE_SAMPLING, self.importance_sampling, "importance sampling level")
        pick(MISMATCH_CORRECTIONS, self.mismatch_correction, "mismatch correction")
        if self.mismatch_cap < 1:
            raise ValueError(f"mismatch_cap must be >= 1 (got {self.mismatch_cap}): the weights are capped at C")
        pick(AGGREGATIONS, self.aggregation, "loss aggregation")
        if self.aggregation == "dr_grpo" and not (self.max_completion_length and self.max_completion_length > 0):
            raise ValueError(
                "loss aggregation 'dr_grpo' divides by batch size x max_completion_length: "
                "set max_completion_length > 0"
            )
        if not (0 <= self.epsilon_low < 1 and self.epsilon_high >= 0):
            raise ValueError(
                "clip range needs 0 <= epsilon_low < 1 and epsilon_high >= 0 "
                f"(got {self.epsilon_low}, {self.epsilon_high})"
            )


@dataclass(frozen=True)
class BatchTotals:
    """Counts over one optimisation batch (the completions of one optimiser step, across its
    micro-batches): the normalisers that make micro-batch losses sum to the batch loss."""

    sequences: int  # B: completions in the optimisation batch
    tokens: int  # sum_i |o_i| over the batch, after masking
    micro_batches: int  # M: micro-batches the batch is split into


def loss_mask(completion_mask: torch.Tensor, truncated: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """The tokens that carry loss: every completion token, except (with
    `mask_truncated_completions`, DAPO sec. 3.4 "overlong filtering") those of completions cut
    by the length limit.  (B, C) float, truncated (B,) bool -> (B, C)"""
    if not settings.mask_truncated_completions:
        return completion_mask
    return completion_mask * (~truncated).to(completion_mask.dtype).unsqueeze(1)


def token_log_weights(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log w_i,t = log pi_theta - log pi_old per token (DeepSeekMath).  (B, C) -> (B, C)

    Padding gets log w = 0 *before* any exp, so no inf/NaN can leak from it into the gradient."""
    return torch.where(mask > 0, logp - old_logp, torch.zeros_like(logp))


def sequence_log_weights(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log s_i = 1/|o_i| sum_t (log pi_theta - log pi_old): the log of GSPO's length-normalised
    sequence ratio (the geometric mean of the token ratios).  (B, C) -> (B, 1)"""
    log_w = token_log_weights(logp, old_logp, mask)  # (B, C)
    return log_w.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, 1)


IMPORTANCE_SAMPLING: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token": token_log_weights,
    "sequence": sequence_log_weights,
}


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> torch.Tensor:
    """-min(w A, clip(w, 1 - eps_low, 1 + eps_high) A): the PPO/GRPO surrogate as a loss.
    ratio (B, C) or (B, 1), advantages (B, 1) -> same shape as ratio."""
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(ref - logp) - (ref - logp) - 1 >= 0
    (Schulman 2020; DeepSeekMath eq. 4). Padding (mask 0) gets 0.  (B, C) -> (B, C)"""
    delta = ref_logp - logp  # (B, C)
    if mask is not None:
        delta = torch.where(mask > 0, delta, torch.zeros_like(delta))  # exp() of padding never overflows
    return torch.exp(delta) - delta - 1


def aggregate_grpo(
    per_token: torch.Tensor, mask: torch.Tensor, totals: BatchTotals, settings: LossSettings
) -> torch.Tensor:
    """1/B sum_i 1/|o_i| sum_t l_i,t: the mean over each completion's tokens, then over the
    completions of the optimisation batch (DeepSeekMath eq. 3). A completion with no loss
    tokens (masked as truncated) adds 0 and still counts in B, as in TRL."""
    per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
    return per_seq.sum() / totals.sequences


def aggregate_bnpo(
    per_token: torch.Tensor, mask: torch.Tensor, totals: BatchTotals, settings: LossSettings
) -> torch.Tensor:
    """sum_{i,t} l_i,t / sum_i |o_i| over *this micro-batch*, averaged over the M micro-batches
    of the step (TRL `bnpo`: token mean per local batch, divided by the accumulation steps)."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1) / totals.micro_batches


def aggregate_dapo(
    per_token: torch.Tensor, mask: torch.Tensor, totals: BatchTotals, settings: LossSettings
) -> torch.Tensor:
    """sum_{i,t} l_i,t / sum_i |o_i| with both sums over the whole optimisation batch, across
    gradient accumulation (DAPO sec. 3.3, "token-level policy gradient loss")."""
    return (per_token * mask).sum() / max(totals.tokens, 1)


def aggregate_dr_grpo(
    per_token: torch.Tensor, mask: torch.Tensor, totals: BatchTotals, settings: LossSettings
) -> torch.Tensor:
    """sum_{i,t} l_i,t / (B * L_max): Dr. GRPO's constant normaliser (sec. 3.2), B the
    completions of the optimisation batch and L_max the generation length limit."""
    assert settings.max_completion_length, "LossSettings requires max_completion_length > 0 for dr_grpo"
    return (per_token * mask).sum() / (totals.sequences * settings.max_completion_length)


AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, BatchTotals, LossSettings], torch.Tensor]] = {
    "grpo": aggregate_grpo,
    "bnpo": aggregate_bnpo,
    "dapo": aggregate_dapo,
    "dr_grpo": aggregate_dr_grpo,
}
# Aggregations whose batch loss is a sum of per-completion terms over normalisers of the whole
# optimisation batch (B, its token count, B * L_max): how its completions are split into
# micro-batches does not change the step. `bnpo` normalises per micro-batch, so it does.
SPLIT_INVARIANT_AGGREGATIONS = frozenset({"grpo", "dapo", "dr_grpo"})


# ==========================================================================================
# Train/inference mismatch (the sampler is not exactly the trainer)
# ==========================================================================================
#
# The engine that samples (vLLM, or generate's KV-cache path) computes log pi_sampler with
# other kernels than the trainer's forward, so pi_sampler != pi_old even at equal weights.
# The token-level ratio rho_i,t = pi_old(o_i,t) / pi_sampler(o_i,t) (pi_old: the trainer's
# forward of the sampling weights) re-weights the policy loss toward the trainer's
# distribution, truncated at C so that rare tokens the sampler under-rates cannot blow up
# the gradient (truncated importance sampling: Yao et al. 2025, "Your efficient RL framework
# secretly brings you off-policy RL training"; TRL/verl/OpenRLHF offer it)::
#
#     token_truncate      w_i,t = min(rho_i,t, C)
#     token_mask          w_i,t = rho_i,t if rho_i,t <= C else 0
#     sequence_truncate   w_i   = min(prod_t rho_i,t, C)                (one weight per completion)
#     sequence_mask       w_i   = prod_t rho_i,t if it is <= C else 0
#     l_i,t <- w l_i,t  (policy term only; the KL term is not re-weighted, as in TRL)
#
# The weights carry no gradient. docs/objective.md has the derivation.


def correction_none(log_rho: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor | None:
    return None


def correction_token_truncate(log_rho: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """min(rho, C) per token.  (B, C) -> (B, C)"""
    return torch.exp(log_rho).clamp(max=cap)


def correction_token_mask(log_rho: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """rho per token, 0 where rho > C.  (B, C) -> (B, C)"""
    rho = torch.exp(log_rho)
    return torch.where(rho > cap, torch.zeros_like(rho), rho)


def _sequence_rho(log_rho: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.exp((log_rho * mask).sum(1, keepdim=True))  # (B, 1)


def correction_sequence_truncate(log_rho: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """min(prod_t rho_t, C) per completion.  (B, C) -> (B, 1)"""
    return _sequence_rho(log_rho, mask).clamp(max=cap)


def correction_sequence_mask(log_rho: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """prod_t rho_t per completion, 0 where it exceeds C.  (B, C) -> (B, 1)"""
    rho = _sequence_rho(log_rho, mask)
    return torch.where(rho > cap, torch.zeros_like(rho), rho)


MISMATCH_CORRECTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor | None]] = {
    "none": correction_none,
    "token_truncate": correction_token_truncate,
    "token_mask": correction_token_mask,
    "sequence_truncate": correction_sequence_truncate,
    "sequence_mask": correction_sequence_mask,
}


def mismatch_weights(
    old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, settings: LossSettings
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The correction's weights ((B, C), (B, 1) or None for `none`) and sums for TRL's
    metrics: |log pi_old - log pi_sampler| (sum, max) and the ratio as the loss uses it (the
    weights when a correction is on, else rho itself) per token (min, sum, max)."""
    with torch.no_grad():
        log_rho = torch.where(mask > 0, old_logp - sampler_logp, torch.zeros_like(old_logp))  # (B, C)
        weights = MISMATCH_CORRECTIONS[settings.mismatch_correction](log_rho, mask, settings.mismatch_cap)
        shown = torch.exp(log_rho) if weights is None else weights.expand_as(log_rho)  # (B, C)
        on = mask > 0
        diff = log_rho.abs()[on]
        ratio = shown[on]
        stats = {
            "mismatch_tokens": float(on.sum()),
            "logp_diff_sum": diff.sum().item(),
            "logp_diff_max": diff.max().item() if diff.numel() else 0.0,
            "is_ratio_sum": ratio.sum().item(),
            "is_ratio_min": ratio.min().item() if ratio.numel() else math.inf,
            "is_ratio_max": ratio.max().item() if ratio.numel() else -math.inf,
        }
    return weights, stats


def policy_loss(
    logp: torch.Tensor,  # (B, C) log pi_theta, with grad
    old_logp: torch.Tensor,  # (B, C) log pi_old, from the generations artifact
    advantages: torch.Tensor,  # (B,)
    mask: torch.Tensor,  # (B, C) 1.0 on loss tokens (see `loss_mask`)
    ref_logp: torch.Tensor | None,  # (B, C) log pi_ref, or None when beta = 0
    settings: LossSettings,
    totals: BatchTotals,  # of the optimisation batch this micro-batch belongs to
    sampler_logp: torch.Tensor | None = None,  # (B, C) the engine's own log-probs, or None
) -> tuple[torch.Tensor, dict[str, float]]:
    """This micro-batch's share of the loss of its optimisation batch (the shares of the
    batch's micro-batches sum to the batch loss), and sums for the metrics.

    Sums: `tokens`, `kl_sum` (over tokens); `clip_low`/`clip_high`/`clip_region` and their
    denominator `clip_units` (tokens at token level, completions at sequence level, as TRL):
    low = ratio < 1 - eps_low with A < 0, high = ratio > 1 + eps_high with A > 0 (the cases
    where the clip removes the gradient), region = either.
    """
    log_w = pick(IMPORTANCE_SAMPLING, settings.importance_sampling, "importance sampling level")(
        logp, old_logp, mask
    )  # (B, C|1)
    ratio = torch.exp(log_w)  # (B, C|1)
    adv = advantages.to(logp.dtype).unsqueeze(1)  # (B, 1)
    per_token = clipped_surrogate(ratio, adv, settings.epsilon_low, settings.epsilon_high).expand_as(logp)  # (B, C)
    mismatch: dict[str, float] = {}
    if sampler_logp is not None:
        weights, mismatch = mismatch_weights(old_logp, sampler_logp, mask, settings)
        if weights is not None:
            per_token = per_token * weights  # (B, C)
    elif settings.mismatch_correction != "none":
        raise ValueError(f"mismatch correction '{settings.mismatch_correction}' needs the sampler's log-probs")
    kl = None
    if settings.beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = k3_kl(logp, ref_logp, mask)  # (B, C)
        per_token = per_token + settings.beta * kl
    loss = pick(AGGREGATIONS, settings.aggregation, "loss aggregation")(per_token, mask, totals, settings)

    with torch.no_grad():
        units = mask if ratio.shape[1] > 1 else torch.ones_like(ratio)  # (B, C|1)
        low = ((ratio < 1 - settings.epsilon_low) & (adv < 0)).to(mask.dtype) * units
        high = ((ratio > 1 + settings.epsilon_high) & (adv > 0)).to(mask.dtype) * units
        stats = {
            "tokens": mask.sum().item(),
            "kl_sum": (kl * mask).sum().item() if kl is not None else 0.0,
            "clip_low": low.sum().item(),
            "clip_high": high.sum().item(),
            "clip_region": torch.maximum(low, high).sum().item(),
            "clip_units": units.sum().item(),
        } | mismatch
    return loss, stats
