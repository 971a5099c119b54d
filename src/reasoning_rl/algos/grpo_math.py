"""The math of the critic-free group methods (GRPO, RLOO, Dr. GRPO) as pure functions, tested with numbers worked by
hand in tests/test_grpo.py.

Sources: GRPO's group-normalised advantage and per-sequence mean loss (Shao et al. 2024, "DeepSeekMath", eq. 3 and
section 4.1.2); RLOO's leave-one-out baseline (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!";
Ahmadian et al. 2024, "Back to Basics"); Dr. GRPO's unscaled advantage and constant loss normaliser (Liu et al. 2025,
"Understanding R1-Zero-Like Training: A Critical Perspective", section 3.1). The clipped ratio and the KL estimators
are PPO's (``ppo_math.py``).

Group tensors are (Q, K): Q questions, the K samples of each in a row. Per-token tensors are (B, T) as in
``ppo_math.py``, ``mask`` 1.0 on real tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from reasoning_rl.config import Baseline

# ----------------------------------------------------------------------------------------- group advantages


def group_mean_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """GRPO's baseline: the mean reward of the question's K samples, the sample's own included. (Q, K) -> (Q, K)"""
    return rewards.mean(dim=1, keepdim=True).expand_as(rewards)


def leave_one_out_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO's baseline: for each sample, the mean reward of the question's *other* K - 1 samples, which do not depend
    on it (so the estimate stays unbiased). (Q, K) -> (Q, K). With K = 1 there is no other sample: the baseline is
    the sample's own reward, so its advantage is 0 (nothing to compare it with)."""
    num_samples = rewards.shape[1]
    if num_samples == 1:
        return rewards.clone()
    return (rewards.sum(dim=1, keepdim=True) - rewards) / (num_samples - 1)  # (Q, K)


BASELINES: dict[Baseline, Callable[[torch.Tensor], torch.Tensor]] = {
    Baseline.group_mean: group_mean_baseline,
    Baseline.leave_one_out: leave_one_out_baseline,
}


def group_std(rewards: torch.Tensor) -> torch.Tensor:
    """The sample standard deviation (divide by K - 1, as torch.std, TRL and verl do) of each question's rewards,
    broadcast to its K samples; 0 for K = 1. (Q, K) -> (Q, K)"""
    if rewards.shape[1] == 1:
        return torch.zeros_like(rewards)
    return rewards.std(dim=1, keepdim=True).expand_as(rewards)


def group_advantages(rewards: torch.Tensor, baseline: Baseline, scale_by_std: bool, eps: float = 1e-6) -> torch.Tensor:
    """Each sample's advantage against its question's group: (r - baseline) / (std + eps) when ``scale_by_std``
    (GRPO), else r - baseline (Dr. GRPO, RLOO). (Q, K) sequence rewards -> (Q, K) advantages.

    A group whose K rewards are equal (all correct, none correct) gets advantage 0 everywhere: it carries no signal,
    and the eps keeps the division finite.
    """
    advantages = rewards - BASELINES[baseline](rewards)  # (Q, K)
    if scale_by_std:
        advantages = advantages / (group_std(rewards) + eps)
    return advantages


def zero_variance_fraction(rewards: torch.Tensor) -> float:
    """The fraction of questions whose K rewards are all equal (all advantages 0: the group teaches nothing)."""
    return float((rewards == rewards[:, :1]).all(dim=1).float().mean())


# ------------------------------------------------------------------------------------------ loss normalisation


def sequence_mean_loss(token_losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO's normalisation: each sequence's mean over its own tokens. (B, T) -> (B,)

    A token of a long sequence weighs less than one of a short sequence, so a wrong answer (negative advantage) is
    penalised less per token the longer it is: the length bias Dr. GRPO removes."""
    return (token_losses * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def token_sum_loss(token_losses: torch.Tensor, mask: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """Dr. GRPO's normalisation: each sequence's token sum divided by a constant (the rollout length limit), so
    every token weighs the same whatever its sequence's length. (B, T) -> (B,)"""
    return (token_losses * mask).sum(dim=1) / max_tokens
