"""PPO's pure math against numbers worked by hand (the arithmetic is in the comments), and GAE against a plain loop."""

from __future__ import annotations

import math

import pytest
import torch

from reasoning_rl.algos.ppo_math import (
    adaptive_kl_coef,
    clipped_policy_loss,
    clipped_value_loss,
    entropy,
    explained_variance,
    gae,
    gae_reference,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    ridge_normal_equations,
    solve_ridge,
    token_logprobs,
    truncated_importance_weights,
)
from reasoning_rl.config import KLEstimator

# Two sequences, the second one token long: the masked entries are 1, 2, 3 and 4.
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def close(actual: torch.Tensor, expected: list, atol: float = 1e-4) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ------------------------------------------------------------------------------------ masked statistics


def test_masked_mean_and_population_variance_by_hand():
    # mean of 1, 2, 3, 4 = 2.5; variance = (1.5^2 + 0.5^2 + 0.5^2 + 1.5^2) / 4 = 5 / 4 (the padded 9s are ignored)
    assert masked_mean(X, MASK).item() == 2.5
    assert masked_var(X, MASK).item() == 1.25
    assert masked_mean(X, torch.zeros_like(MASK)).item() == 0.0  # an empty mask averages to 0, not NaN


def test_masked_whiten_by_hand():
    # (x - 2.5) / sqrt(1.25): -1.5 / 1.1180 = -1.3416, -0.5 / 1.1180 = -0.4472, ...; padding comes out 0
    close(masked_whiten(X, MASK), [[-1.3416, -0.4472, 0.4472], [1.3416, 0.0, 0.0]])
    # without the mean shift only the scale changes: x / 1.1180
    close(masked_whiten(X, MASK, shift_mean=False), [[0.8944, 1.7889, 2.6833], [3.5777, 0.0, 0.0]])
    # one entry (or all equal): variance 0, eps keeps it finite and the result is 0
    close(masked_whiten(torch.tensor([[7.0]]), torch.tensor([[1.0]])), [[0.0]])


def test_explained_variance_by_hand():
    returns = torch.tensor([[1.0, 0.0, 1.0, 0.0]])  # variance 0.25
    mask = torch.ones_like(returns)
    assert explained_variance(returns, returns, mask) == 1.0  # a perfect value head
    # predicting the mean 0.5 leaves residuals +-0.5: variance 0.25 -> 1 - 0.25 / 0.25 = 0
    assert explained_variance(torch.full_like(returns, 0.5), returns, mask) == 0.0
    # predicting the opposite leaves residuals +-1: variance 1 -> 1 - 1 / 0.25 = -3
    assert explained_variance(1 - returns, returns, mask) == -3.0
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), mask))  # constant returns


# --------------------------------------------------------------------------------------- log-probs and KL


def test_token_logprobs_and_entropy_by_hand():
    # logits (0, ln 3) -> probabilities (1/4, 3/4)
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # (1, 1, 2)
    close(token_logprobs(logits, torch.tensor([[1]])), [[math.log(0.75)]])  # -0.2877
    close(token_logprobs(logits, torch.tensor([[0]])), [[math.log(0.25)]])  # -1.3863
    # H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.3466 + 0.2158 = 0.5623
    close(entropy(logits), [[0.5623]])
    close(entropy(torch.zeros(1, 1, 4)), [[math.log(4.0)]])  # uniform over 4: ln 4


def test_kl_estimators_by_hand():
    log_p, log_q = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # k1 = log p - log q = ln 2 = 0.6931
    close(kl_estimate(log_p, log_q, KLEstimator.k1), [0.6931])
    # k3: r = q / p = 0.5;  (r - 1) - ln r = -0.5 + 0.6931 = 0.1931
    close(kl_estimate(log_p, log_q, KLEstimator.k3), [0.1931])
    for estimator in KLEstimator:  # the same distribution: 0
        close(kl_estimate(log_p, log_p, estimator), [0.0])


def test_kl_estimators_average_to_the_kl():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL(p || q) = 1/2 ln 2 + 1/2 ln(2/3) = 0.3466 - 0.2027 = 0.1438.
    # Averaged over x ~ p, both estimators give it exactly (k3 adds sum(q) - 1 = 0).
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    for estimator in KLEstimator:
        average = (p * kl_estimate(p.log(), q.log(), estimator)).sum()
        assert average.item() == pytest.approx(0.1438, abs=1e-4)
    # k3 is never negative, k1 can be: token 1 is likelier under q
    assert kl_estimate(p.log(), q.log(), KLEstimator.k1)[1] < 0 <= kl_estimate(p.log(), q.log(), KLEstimator.k3)[1]


def test_adaptive_kl_controller_by_hand():
    # KL 12 against target 6: error = 12 / 6 - 1 = 1, clipped to 0.2; beta = 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512
    assert adaptive_kl_coef(0.1, 12.0, 6.0, 10000, 256) == pytest.approx(0.100512)
    # KL 5.4: error = -0.1; beta = 0.1 * (1 - 0.1 * 0.0256) = 0.099744
    assert adaptive_kl_coef(0.1, 5.4, 6.0, 10000, 256) == pytest.approx(0.099744)
    assert adaptive_kl_coef(0.1, 0.0, 6.0, 10000, 256) == pytest.approx(0.1 * (1 - 0.2 * 0.0256))  # clipped at -0.2
    assert adaptive_kl_coef(0.1, 6.0, 6.0, 10000, 256) == 0.1  # on target: unchanged


# --------------------------------------------------------------------------------------------------- GAE


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [1.0, 5.0, 5.0]])  # row 2 is one token; its padding holds garbage
    values = torch.tensor([[0.5, 0.6, 0.8], [0.2, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 1, backwards: t=2: delta = 1 + 0 - 0.8 = 0.2 (V = 0 after the end);                A_2 = 0.2
    #                   t=1: delta = 0 + 0.8 - 0.6 = 0.2;                A_1 = 0.2 + 0.5 * 0.2  = 0.3
    #                   t=0: delta = 0 + 0.6 - 0.5 = 0.1;                A_0 = 0.1 + 0.5 * 0.3  = 0.25
    # row 2: A_0 = 1 - 0.2 = 0.8; padding is 0 and never leaks into the real token
    close(advantages, [[0.25, 0.3, 0.2], [0.8, 0.0, 0.0]])
    close(returns, [[0.75, 0.9, 1.0], [1.0, 0.0, 0.0]])  # R = A + V


def test_gae_limits_by_hand():
    rewards, values, mask = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.8]]), torch.ones(1, 3)
    # lam = 1: Monte Carlo. Discounted returns with gamma 0.9: 0.81, 0.9, 1; A = R - V = 0.31, 0.3, 0.2
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    close(returns, [[0.81, 0.9, 1.0]])
    close(advantages, [[0.31, 0.3, 0.2]])
    # lam = 0: one-step TD errors r_t + gamma V_{t+1} - V_t = 0.54 - 0.5, 0.72 - 0.6, 1 - 0.8
    advantages, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    close(advantages, [[0.04, 0.12, 0.2]])


def test_gae_matches_the_plain_loop():
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 7]
    rewards = torch.randn(4, 7, generator=generator)
    values = torch.randn(4, 7, generator=generator)
    mask = (torch.arange(7)[None] < torch.tensor(lengths)[:, None]).float()
    advantages, returns = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    for row, n in enumerate(lengths):
        expected_adv, expected_ret = gae_reference(rewards[row, :n].tolist(), values[row, :n].tolist(), 0.95, 0.9)
        close(advantages[row, :n], expected_adv, atol=1e-5)
        close(returns[row, :n], expected_ret, atol=1e-5)
        assert not advantages[row, n:].any() and not returns[row, n:].any()


# ------------------------------------------------------------------------------------------------ losses


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(4)
    logprobs = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))  # ratios 1.5, 1.5, 0.5, 0.5
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    # loss = max(-A r, -A clip(r, 0.8, 1.2)):
    #   A=+1, r=1.5: max(-1.5, -1.2) = -1.2   (the gain is capped)
    #   A=-1, r=1.5: max( 1.5,  1.2) =  1.5   (the loss is not)
    #   A=+1, r=0.5: max(-0.5, -0.8) = -0.5
    #   A=-1, r=0.5: max( 0.5,  0.8) =  0.8   (capped the other way)
    close(clipped_policy_loss(logprobs, old, advantages, clip_coef=0.2), [-1.2, 1.5, -0.5, 0.8])
    # where the clipped term wins, the gradient is zero; elsewhere d(-A r)/d log pi = -A r
    logprobs.requires_grad_(True)
    clipped_policy_loss(logprobs, old, advantages, clip_coef=0.2).sum().backward()
    close(logprobs.grad, [0.0, 1.5, -0.5, 0.0])
    # at ratio 1 the loss is -A whatever the clip
    close(clipped_policy_loss(old, old, advantages, clip_coef=0.2), [-1.0, 1.0, -1.0, 1.0])


def test_clipped_value_loss_by_hand():
    old, returns = torch.full((3,), 0.5), torch.ones(3)
    values = torch.tensor([0.9, 0.6, 0.2])
    # 0.9: unclipped (0.9 - 1)^2 = 0.01; clipped 0.5 + 0.2 = 0.7 -> 0.09; half the max = 0.045
    # 0.6: inside the clip: (0.6 - 1)^2 = 0.16 both -> 0.08
    # 0.2: unclipped 0.64; clipped 0.5 - 0.2 = 0.3 -> 0.49; half the max = 0.32
    close(clipped_value_loss(values, old, returns, value_clip=0.2), [0.045, 0.08, 0.32])


def test_least_squares_value_fit_by_hand():
    # one feature x at 3 real tokens, targets y = 2x + 1: (0, 1), (1, 3), (2, 5); a 4th token is padding (masked out)
    features = torch.tensor([[[0.0], [1.0]], [[2.0], [9.0]]])  # (B=2, T=2, H=1)
    targets = torch.tensor([[1.0, 3.0], [5.0, -100.0]])  # (B, T)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    xtx, xty = ridge_normal_equations(features, targets, mask)
    # X = [[0, 1], [1, 1], [2, 1]]: X^T X = [[5, 3], [3, 3]], X^T y = [0 + 3 + 10, 1 + 3 + 5] = [13, 9]
    assert xtx.tolist() == [[5.0, 3.0], [3.0, 3.0]] and xty.tolist() == [13.0, 9.0]
    weight, bias = solve_ridge(xtx, xty, ridge=0.0)
    assert weight.tolist() == pytest.approx([2.0]) and bias == pytest.approx(1.0)
    # a ridge penalty shrinks the weight, never the bias: penalty = 1.0 * mean(5, 3) = 4 on w only,
    # [[9, 3], [3, 3]] (w, b) = (13, 9) -> w = (13 - 9) / 6 = 2/3, b = 3 - 2/3 = 7/3
    weight, bias = solve_ridge(xtx, xty, ridge=1.0)
    assert weight.tolist() == pytest.approx([2 / 3]) and bias == pytest.approx(7 / 3)


def test_truncated_importance_weights_are_the_capped_probability_ratio():
    trainer = torch.tensor([[-1.0, -2.0, -0.5]])
    sampler = torch.tensor([[-1.0, -1.0, -3.0]])  # equal; the engine more sure; the engine less sure (ratio e^2.5)
    weights = truncated_importance_weights(trainer, sampler, cap=3.0)
    torch.testing.assert_close(weights, torch.tensor([[1.0, math.exp(-1.0), 3.0]]))
