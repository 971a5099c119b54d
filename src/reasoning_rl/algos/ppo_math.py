"""PPO's math as pure functions: tensors or numbers in, tensors or numbers out, tested with numbers worked by hand.

Sources: GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
eq. 16); the clipped surrogate objective (Schulman et al. 2017, eq. 7); the clipped value loss (OpenAI baselines'
ppo2, as in trl and cleanrl); the KL estimators k1 and k3 (Schulman 2020, "Approximating KL Divergence"); the
adaptive KL controller (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", section 2.2).

Per-token tensors are (B, T): B sequences, T generated-token positions, right-padded; ``mask`` is 1.0 on real
tokens and 0.0 on padding. Position t holds the quantities of action a_t (the t-th generated token) taken in state
s_t (the prompt and the tokens before it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from reasoning_rl.config import KLEstimator

# ---------------------------------------------------------------------------------------- masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the entries of ``x`` where ``mask`` is 1 (a scalar tensor; 0 when the mask is empty)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance (divide by n, not n - 1) of the masked entries."""
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; ``shift_mean=False`` only divides by std (keeps the sign of rewards).

    Padding positions come out as 0.
    """
    centred = x - masked_mean(x, mask) if shift_mean else x
    return centred * torch.rsqrt(masked_var(x, mask) + eps) * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 = the value head predicts the returns, 0 = no better than their
    mean, negative = worse. NaN when the returns do not vary."""
    var_returns = masked_var(returns, mask)
    if var_returns <= 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask) / var_returns)


# ----------------------------------------------------------------------------------------- log-probs and KL


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token]: (B, T, V) logits and (B, T) tokens -> (B, T) log-probs."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) at each position: (B, T, V) -> (B, T), in nats."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return -(logprobs.exp() * logprobs).sum(-1)  # (B, T)


def kl_estimate(logprobs: torch.Tensor, other_logprobs: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(p || q) from tokens sampled from p, given log p and log q of those tokens.

    k1 = log p - log q;  k3 = (r - 1) - log r with r = q / p  (Schulman 2020). Both average to KL(p || q).
    """
    log_ratio = other_logprobs - logprobs  # log r = log q - log p
    if estimator == KLEstimator.k1:
        return -log_ratio
    return log_ratio.exp() - 1 - log_ratio


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, num_samples: int) -> float:
    """Ziegler et al. (2019)'s proportional controller: move beta so the measured KL approaches the target.

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * num_samples / horizon).
    """
    error = min(max(kl / target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * num_samples / horizon)


# ---------------------------------------------------------------------------------------- advantages (GAE)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimates and returns for right-padded episodes that end at their last real token.

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t), with V = 0 after the last token (the episode ends there);
    A_t = delta_t + gamma * lam * A_{t+1};  returns R_t = A_t + V(s_t) (the value head's regression target).
    Padding is zeroed, so no value leaks across the end of an episode. Batched over B, a loop over T.
    """
    rewards, values = rewards * mask, values * mask  # (B, T)
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_advantage = torch.zeros_like(rewards[:, 0])  # (B,)
    num_positions = rewards.shape[1]
    for t in reversed(range(num_positions)):
        next_value = values[:, t + 1] if t + 1 < num_positions else torch.zeros_like(values[:, t])  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def gae_reference(
    rewards: Sequence[float], values: Sequence[float], gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """The plain per-episode loop that :func:`gae` batches: one unpadded episode, floats in and out."""
    advantages = [0.0] * len(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(values) else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        advantages[t] = running
    return advantages, [a + v for a, v in zip(advantages, values, strict=True)]


# --------------------------------------------------------------------------------------------------- losses


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_coef: float
) -> torch.Tensor:
    """PPO's clipped surrogate, negated to be minimised, per token (B, T) (Schulman et al. 2017, eq. 7).

    ratio = exp(log pi - log pi_old);  loss = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).
    """
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef))


def truncated_importance_weights(
    trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float
) -> torch.Tensor:
    """Per token, min(pi_trainer / pi_sampler, cap): truncated importance sampling (Ionides 2008; Yao et al. 2025,
    "Your efficient RL framework secretly brings you off-policy RL training").

    The rollout engine (vLLM) samples from its own numerics of the policy, slightly off the trainer's; weighting
    each token's policy loss by this ratio corrects the expectation for that mismatch, and the cap bounds the
    variance a rare token the engine under-weighted would add. (B, T) -> (B, T)
    """
    return torch.exp(trainer_logprobs - sampler_logprobs).clamp(max=cap)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, value_clip: float
) -> torch.Tensor:
    """Half the squared error of the value head, the larger of unclipped and clipped, per token (B, T).

    The clipped prediction may move at most ``value_clip`` from the rollout's value, as the policy ratio may.
    """
    clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)  # (B, T)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


# ---------------------------------------------------------------------------------------------- value head


def ridge_normal_equations(
    features: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums a least-squares fit of ``targets`` on ``[features, 1]`` needs, over the masked positions:
    (X^T X, X^T y) with X the features plus a column of ones (the bias), in float64 so they can be summed over
    micro-batches. features (B, T, H), targets and mask (B, T) -> (H + 1, H + 1), (H + 1,)."""
    rows = mask.reshape(-1) > 0
    x = features.reshape(-1, features.shape[-1])[rows].double()  # (M, H)
    x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (M, H + 1)
    y = targets.reshape(-1)[rows].double()  # (M,)
    return x.T @ x, x.T @ y


def solve_ridge(xtx: torch.Tensor, xty: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
    """Weights (H,) and bias minimising |X w + b - y|^2 + ridge * (trace(X^T X) / (H + 1)) * |w|^2 (the bias is
    not penalised; the penalty is relative, so it means the same at any feature scale)."""
    penalty = ridge * float(torch.diagonal(xtx).mean())
    regulariser = torch.eye(xtx.shape[0], dtype=xtx.dtype) * penalty
    regulariser[-1, -1] = 0.0
    solution = torch.linalg.solve(xtx + regulariser, xty)  # (H + 1,)
    return solution[:-1], float(solution[-1])
