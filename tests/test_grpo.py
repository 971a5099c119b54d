"""GRPO, RLOO and Dr. GRPO: the group math with numbers worked by hand, and the three config options."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from reasoning_rl.algos.grpo_math import (
    group_advantages,
    group_mean_baseline,
    group_std,
    leave_one_out_baseline,
    sequence_mean_loss,
    token_sum_loss,
    zero_variance_fraction,
)
from reasoning_rl.config import (
    Baseline,
    ConfigError,
    ExperimentConfig,
    GRPOConfig,
    LossNorm,
    register_configs,
    to_experiment,
)


def t(rows: Sequence[Sequence[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# -------------------------------------------------------------------------------------------- group math


def test_grpo_advantages_by_hand():
    # one correct of 4: mean 0.25, r - mean = [0.75, -0.25, -0.25, -0.25];
    #   sample std = sqrt((0.75^2 + 3 x 0.25^2) / 3) = sqrt(0.75 / 3) = 0.5  ->  [1.5, -0.5, -0.5, -0.5]
    # ties, two of 4: mean 0.5, r - mean = +-0.5; std = sqrt(4 x 0.25 / 3) = 0.57735  ->  +-0.5 / 0.57735 = +-0.86603
    # all correct / none correct: r - mean = 0 everywhere, 0 / (0 + eps) = 0
    rewards = t([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    expected = t([[1.5, -0.5, -0.5, -0.5], [0.86603, 0.86603, -0.86603, -0.86603], [0, 0, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(group_advantages(rewards, Baseline.group_mean, True), expected, atol=1e-5, rtol=0)
    # a dense reward, two groups of 3 at once: [1.2, 0.2, 0.2] has mean 1.6 / 3 = 0.5333, r - mean = [2/3, -1/3, -1/3],
    #   std = sqrt((4/9 + 2 x 1/9) / 2) = sqrt(1/3) = 0.57735  ->  [1.15470, -0.57735, -0.57735];
    #   [0, 3, 6]: mean 3, r - mean = [-3, 0, 3], std = sqrt(18 / 2) = 3  ->  [-1, 0, 1] (each group its own scale)
    dense = group_advantages(t([[1.2, 0.2, 0.2], [0, 3, 6]]), Baseline.group_mean, True)
    torch.testing.assert_close(dense, t([[1.15470, -0.57735, -0.57735], [-1, 0, 1]]), atol=1e-4, rtol=0)


def test_dr_grpo_advantages_are_not_divided_by_the_std():
    # r - mean only: [1, 0, 0, 0] -> [0.75, -0.25, -0.25, -0.25]; [0, 3, 6] -> [-3, 0, 3] (GRPO's [-1, 0, 1] x 3)
    torch.testing.assert_close(group_advantages(t([[1, 0, 0, 0]]), Baseline.group_mean, False),
                               t([[0.75, -0.25, -0.25, -0.25]]))  # fmt: skip
    torch.testing.assert_close(group_advantages(t([[0, 3, 6]]), Baseline.group_mean, False), t([[-3, 0, 3]]))


def test_the_leave_one_out_baseline_and_rloo_advantages_by_hand():
    # [3, 1, 2]: each sample's baseline is the mean of the other two: (1 + 2) / 2, (3 + 2) / 2, (3 + 1) / 2
    torch.testing.assert_close(leave_one_out_baseline(t([[3, 1, 2]])), t([[1.5, 2.5, 2.0]]))
    torch.testing.assert_close(group_mean_baseline(t([[3, 1, 2]])), t([[2.0, 2.0, 2.0]]))
    # one correct of 4: the correct one against [0, 0, 0] -> 1; a wrong one against [1, 0, 0] -> -1/3
    # ties, two of 4: a correct one against [1, 0, 0] -> 1 - 1/3 = 2/3; a wrong one against [1, 1, 0] -> -2/3
    # all / none correct: 0. RLOO's advantage is K / (K - 1) x (r - mean): 4/3 x 0.75 = 1, 4/3 x -0.25 = -1/3
    rewards = t([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    expected = t([[1, -1 / 3, -1 / 3, -1 / 3], [2 / 3, 2 / 3, -2 / 3, -2 / 3], [0, 0, 0, 0], [0, 0, 0, 0]])
    rloo = group_advantages(rewards, Baseline.leave_one_out, False)
    torch.testing.assert_close(rloo, expected)
    torch.testing.assert_close(rloo, 4 / 3 * group_advantages(rewards, Baseline.group_mean, False))


def test_a_group_of_one_sample_has_advantage_zero():
    # no other sample to compare with: both baselines are the sample's own reward, the std is 0 (not NaN)
    rewards = t([[1.0], [0.0], [0.7]])
    assert group_std(rewards).tolist() == [[0.0], [0.0], [0.0]]
    for baseline in Baseline:
        for scale_by_std in (True, False):
            assert group_advantages(rewards, baseline, scale_by_std).tolist() == [[0.0], [0.0], [0.0]]


def test_zero_variance_fraction_counts_the_groups_whose_rewards_are_all_equal():
    # all correct, none correct, equal dense rewards: 3 of 5 groups teach nothing
    rewards = t([[1, 1, 1], [0, 0, 0], [1, 0, 0], [0.2, 0.2, 0.2], [1.2, 0.2, 0.2]])
    assert zero_variance_fraction(rewards) == pytest.approx(3 / 5)


def test_the_loss_normalisations_by_hand():
    # two sequences, 3 and 1 tokens: token losses [1, 2, 3] and [4]
    token_losses, mask = t([[1, 2, 3, 9], [4, 9, 9, 9]]), t([[1, 1, 1, 0], [1, 0, 0, 0]])  # 9s are padding
    # GRPO: each sequence's token mean: (1 + 2 + 3) / 3 = 2, 4 / 1 = 4
    torch.testing.assert_close(sequence_mean_loss(token_losses, mask), torch.tensor([2.0, 4.0]))
    # Dr. GRPO: each sequence's token sum over the constant 4 (the length limit): 6 / 4 = 1.5, 4 / 4 = 1
    torch.testing.assert_close(token_sum_loss(token_losses, mask, 4), torch.tensor([1.5, 1.0]))
    # the length bias: a loss of 1 at every token weighs each token of the 3-token sequence 1/3 and the 1-token
    # sequence's token 1 under GRPO (both sequences lose 1); under Dr. GRPO every token weighs 1/4: 3/4 and 1/4
    ones = torch.ones_like(token_losses)
    torch.testing.assert_close(sequence_mean_loss(ones, mask), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(token_sum_loss(ones, mask, 4), torch.tensor([0.75, 0.25]))
    # an empty sequence (no tokens) loses 0 under both, not NaN
    assert sequence_mean_loss(ones[:1], torch.zeros(1, 4)).tolist() == [0.0]


# ------------------------------------------------------------------------------------------------ config


def compose_experiment(overrides: list[str]) -> ExperimentConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return to_experiment(compose(config_name="config", overrides=overrides))


def test_the_three_options_compose_with_every_reward_and_differ_only_in_baseline_std_and_loss():
    for algo in ("grpo", "rloo", "dr_grpo"):
        for reward in ("sparse", "dense", "orm", "orm_dense"):
            cfg = compose_experiment([f"algo={algo}", f"reward={reward}", "model=tiny"])
            assert cfg.algo.name == algo and isinstance(cfg.algo, GRPOConfig)
    algos = {name: compose_experiment([f"algo={name}"]).algo for name in ("grpo", "rloo", "dr_grpo")}
    assert (algos["grpo"].baseline, algos["grpo"].scale_by_std, algos["grpo"].loss_norm) == (
        Baseline.group_mean, True, LossNorm.sequence_mean)  # fmt: skip
    assert (algos["rloo"].baseline, algos["rloo"].scale_by_std, algos["rloo"].loss_norm) == (
        Baseline.leave_one_out, False, LossNorm.sequence_mean)  # fmt: skip
    assert (algos["dr_grpo"].baseline, algos["dr_grpo"].scale_by_std, algos["dr_grpo"].loss_norm) == (
        Baseline.group_mean, False, LossNorm.token_sum)  # fmt: skip
    ignore = {"name", "baseline", "scale_by_std", "loss_norm"}
    fields = [{k: v for k, v in dataclasses.asdict(a).items() if k not in ignore} for a in algos.values()]
    assert fields[0] == fields[1] == fields[2]  # same sample budget, lr, clip, KL: a row differs in its name only


def test_bad_group_settings_fail_with_a_fix():
    with pytest.raises(ConfigError, match="algo.num_samples=1: a group of one sample"):
        compose_experiment(["algo=grpo", "algo.num_samples=1"])
    with pytest.raises(ConfigError, match="use algo.kl_estimator=k3, or algo.kl_coef=0"):
        compose_experiment(["algo=rloo", "algo.kl_estimator=k1"])
    assert compose_experiment(["algo=rloo", "algo.kl_estimator=k1", "algo.kl_coef=0"]).algo.kl_coef == 0
    with pytest.raises(ConfigError, match="algo.kl_coef=-0.1 >= 0"):
        compose_experiment(["algo=dr_grpo", "algo.kl_coef=-0.1"])
    with pytest.raises(ConfigError, match="algo.epochs=0 must be >= 1"):
        compose_experiment(["algo=grpo", "algo.epochs=0"])
    with pytest.raises(ConfigError, match="algo.tis_cap=0.5"):
        compose_experiment(["algo=grpo", "algo.tis_cap=0.5"])
    with pytest.raises(ConfigError, match="algo.max_new_tokens=400 leaves no room"):
        compose_experiment(["algo=grpo", "model=tiny", "algo.max_new_tokens=400"])
