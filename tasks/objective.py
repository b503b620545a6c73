"""The GRPO objective as small pure torch functions (DeepSeekMath, arXiv:2402.03300).

Symbols: q a prompt, o_i the i-th of G completions of q, r_i its reward, A_i its advantage,
pi_theta the policy, pi_old the policy that sampled o_i, pi_ref the frozen reference.

    A_i      = (r_i - mean(r)) / (std(r) + eps)                    group-relative advantage
    rho_i,t  = pi_theta(o_i,t | q, o_i,<t) / pi_old(o_i,t | q, o_i,<t)
    L        = -1/G sum_i 1/|o_i| sum_t [ min(rho A_i, clip(rho, 1-eps, 1+eps) A_i) - beta D_KL ]
    D_KL     = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1          (k3 estimator, per token)

Departures from the paper: eps is added to the std (the paper divides by std alone, which
is undefined for a group of equal rewards; such groups get A = 0 here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupAdvantages:
    advantage: torch.Tensor  # (N,)
    group_mean: torch.Tensor  # (N,) mean reward of each row's group
    group_std: torch.Tensor  # (N,) std of each row's group


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> GroupAdvantages:
    """A_i = (r_i - mean_g) / (std_g + eps), std with Bessel's correction; 0 when std_g = 0.

    rewards: (N,) float; group_ids: (N,) long in [0, num_groups).
    """
    rewards = rewards.double()
    num_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_ids, torch.ones_like(rewards))  # (G,)
    total = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_ids, rewards)
    mean = (total / count)[group_ids]  # (N,)
    sq = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_ids, (rewards - mean) ** 2)
    std = (sq / (count - 1).clamp(min=1)).sqrt()[group_ids]  # (N,)
    advantage = torch.where(std > 0, (rewards - mean) / (std + eps), torch.zeros_like(rewards))
    return GroupAdvantages(advantage, mean, std)


@dataclass(frozen=True)
class LossSettings:
    epsilon: float = 0.2  # PPO/DeepSeekMath clip range
    beta: float = 0.04  # KL weight (DeepSeekMath); 0 disables the reference model
    temperature: float = 1.0  # must match sampling: log-probs are of softmax(logits / T)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    delta = ref_logp - logp  # (B, C)
    return torch.exp(delta) - delta - 1


def policy_loss(
    logp: torch.Tensor,  # (B, C) log pi_theta, with grad
    old_logp: torch.Tensor,  # (B, C) log pi_old, from the generations artifact
    advantages: torch.Tensor,  # (B,)
    mask: torch.Tensor,  # (B, C) 1.0 on completion tokens
    ref_logp: torch.Tensor | None,  # (B, C) log pi_ref, or None when beta = 0
    settings: LossSettings,
    num_sequences: int,  # completions in the whole optimisation batch (across micro-batches)
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the GRPO loss (sum over micro-batches = batch loss), and
    per-token statistics for the metrics."""
    ratio = torch.exp(logp - old_logp)  # (B, C)
    adv = advantages.unsqueeze(1)  # (B, 1)
    clipped = torch.clamp(ratio, 1 - settings.epsilon, 1 + settings.epsilon)
    per_token = -torch.min(ratio * adv, clipped * adv)  # (B, C)
    kl = None
    if ref_logp is not None and settings.beta > 0:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + settings.beta * kl
    lengths = mask.sum(1).clamp(min=1)  # (B,)
    loss = ((per_token * mask).sum(1) / lengths).sum() / num_sequences
    stats = {"clipped": ((ratio - clipped).abs() > 0).float(), "ratio": ratio.detach()}
    if kl is not None:
        stats["kl"] = kl.detach()
    return loss, stats
