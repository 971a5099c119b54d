"""GRPO, RLOO and Dr. GRPO: the group math with numbers worked by hand, the update's direction on a hand-made group
(it fails when the group baseline is removed or the advantage's sign inverted), accumulation, the whole loop in
process (no reference model without a KL term, LoRA, resume exact), and the three options through the real CLI."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_ppo import TINY, run_main, runs_of, scaled_tiny_model

from reasoning_rl.algos import grpo
from reasoning_rl.algos.context import RunContext
from reasoning_rl.algos.grpo import accumulate_gradients, group_relative_advantages, grpo_update
from reasoning_rl.algos.grpo_math import (
    group_advantages,
    group_mean_baseline,
    group_std,
    leave_one_out_baseline,
    sequence_mean_loss,
    token_sum_loss,
    zero_variance_fraction,
)
from reasoning_rl.algos.ppo import PolicyValue, evaluate_rollouts, pack_rollouts
from reasoning_rl.config import (
    ArithTaskConfig,
    Baseline,
    ConfigError,
    EvalConfig,
    ExperimentConfig,
    GRPOConfig,
    LoggerConfig,
    LoggerName,
    LossNorm,
    PretrainedInitConfig,
    RewardConfig,
    RewardName,
    register_configs,
    to_experiment,
)
from reasoning_rl.models.loading import build_tiny_model, build_tiny_tokenizer
from reasoning_rl.rollout.sampler import Sample
from reasoning_rl.run.checkpointing import Checkpointer
from reasoning_rl.run.tracking import NullTracker
from reasoning_rl.tasks import Problem, generate_arith

pytestmark = pytest.mark.usefixtures("one_thread")

GRPO = GRPOConfig()
RLOO = GRPOConfig(name="rloo", baseline=Baseline.leave_one_out, scale_by_std=False)
DR_GRPO = GRPOConfig(name="dr_grpo", scale_by_std=False, loss_norm=LossNorm.token_sum)


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


# ------------------------------------------------------------------------------- the update, on a tiny model


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny random Llama with its matrices scaled up 8x (test_ppo.py), so log-probs depend on the context."""
    return scaled_tiny_model(len(tokenizer))


PROMPT = "Q: 2+3\nA:\n"
GROUP = ["2+3=5\n#### 5", "#### 6", "2-3=1\n#### 1", "3+3=6\n#### 6"]  # one question's K = 4 solutions


def hand_made_group(model, tokenizer, rewards: Sequence[float], reference=None) -> dict:
    """The K = 4 solutions ``GROUP`` of one question, each with its reward: 0.2 at the first token (a step reward)
    and the rest at the last token, then old log-probs (and the reference's, when given) as phase 3 fills them."""
    return hand_made_groups(model, tokenizer, [(PROMPT, rewards)], reference)


def hand_made_groups(model, tokenizer, groups: Sequence[tuple[str, Sequence[float]]], reference=None) -> dict:
    """``hand_made_group`` for several questions (prompt, K rewards), their groups one after the other."""
    prompts, samples, scores = [], [], []
    for prompt, rewards in groups:
        for completion, reward in zip(GROUP, rewards, strict=True):
            ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            score = torch.zeros(len(ids))
            score[0], score[-1] = 0.2, reward - 0.2
            prompts.append(prompt)
            samples.append(Sample(ids, completion, [0.0] * len(ids), "eos"))
            scores.append(score)
    batch = pack_rollouts(tokenizer, prompts, samples, scores)
    evaluate_rollouts(model, None, reference, batch, 4, reference=reference is not None)
    batch["sampler_logprobs"] = batch["old_logprobs"].clone()  # as if the trainer had sampled them itself
    return batch


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """log pi(solution | prompt) of each row: the sum of its token log-probs. (N,)"""
    scored = dict(batch)
    evaluate_rollouts(model, None, None, scored, 4, reference=False)
    return scored["old_logprobs"].sum(1)


@pytest.mark.parametrize("cfg", [GRPO, RLOO, DR_GRPO], ids=["grpo", "rloo", "dr_grpo"])
def test_one_update_raises_the_correct_solution_and_lowers_the_others(model, tokenizer, cfg):
    """One correct solution of four (rewards 1.2 and three 0.2: every solution also earned a step reward). With the
    group baseline the correct one's advantage is positive and the others' negative, so one SGD step raises the log-
    prob of the correct solution and lowers the three others'. Without the baseline every advantage is positive and
    all four rose (measured: +1.28, +0.57, +0.49, +0.76); with the sign inverted the correct one fell (-0.91)."""
    policy = copy.deepcopy(model)
    batch = hand_made_group(policy, tokenizer, [1.2, 0.2, 0.2, 0.2])
    before = sequence_logprobs(policy, batch)
    rewards, advantages = group_relative_advantages(batch, 1, dataclasses.replace(cfg, kl_coef=0.0))
    torch.testing.assert_close(rewards, t([[1.2, 0.2, 0.2, 0.2]]))  # the token rewards summed
    assert advantages[0, 0] > 0 and (advantages[0, 1:] < 0).all()
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.01)
    grpo_update(PolicyValue(policy), optimizer, batch, dataclasses.replace(cfg, kl_coef=0.0, max_new_tokens=32),
                minibatch_size=4, micro_batch_size=2, generator=torch.Generator().manual_seed(0))  # fmt: skip
    moved = sequence_logprobs(policy, batch) - before  # (4,)
    assert moved[0] > 0.1, moved
    assert (moved[1:] < -0.01).all(), moved


def test_a_group_with_equal_rewards_and_no_kl_term_leaves_the_policy_alone(model, tokenizer):
    """All four solutions correct: every advantage is 0, so without a KL term the gradient is exactly 0."""
    policy = copy.deepcopy(model)
    batch = hand_made_group(policy, tokenizer, [1.0, 1.0, 1.0, 1.0])
    rewards, advantages = group_relative_advantages(batch, 1, GRPO)
    assert zero_variance_fraction(rewards) == 1.0 and not advantages.any()
    accumulate_gradients(PolicyValue(policy), batch, 4, dataclasses.replace(GRPO, kl_coef=0.0))
    assert all(p.grad is None or not p.grad.any() for p in policy.parameters())


def test_the_kl_term_has_no_gradient_at_the_reference_and_a_pull_back_away_from_it(model, tokenizer):
    """k3's gradient is (1 - pi_ref / pi) grad log pi: 0 where the policy is the reference (the first update of a
    run), so the KL term changes nothing there; once the policy has moved, it pulls back toward the reference."""
    policy = copy.deepcopy(model)
    batch = hand_made_group(policy, tokenizer, [1.0, 0.0, 0.0, 0.0], reference=model)
    group_relative_advantages(batch, 1, GRPO)
    grads = []
    for kl_coef in (0.0, 1.0):
        trained = copy.deepcopy(policy)
        accumulate_gradients(PolicyValue(trained), batch, 4, dataclasses.replace(GRPO, kl_coef=kl_coef))
        grads.append([p.grad.clone() for p in trained.parameters()])
    for without, with_kl in zip(*grads, strict=True):
        torch.testing.assert_close(with_kl, without, atol=1e-6, rtol=1e-5)
    # a policy pushed away from the reference (its last layer's weights changed): zero advantages leave only the KL
    # term, and one SGD step on it brings the policy's log-probs of the batch's tokens back toward the reference's
    moved = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        moved.lm_head.weight.add_(0.3 * torch.randn_like(moved.lm_head.weight))
    far = hand_made_group(moved, tokenizer, [1.0, 1.0, 1.0, 1.0], reference=model)
    group_relative_advantages(far, 1, GRPO)
    gap_before = (far["old_logprobs"] - far["ref_logprobs"]).abs().sum()
    grpo_update(PolicyValue(moved), torch.optim.SGD(moved.parameters(), lr=0.05), far,
                dataclasses.replace(GRPO, kl_coef=1.0), minibatch_size=4, micro_batch_size=4,
                generator=torch.Generator().manual_seed(0))  # fmt: skip
    after = dict(far)
    evaluate_rollouts(moved, None, model, after, 4)
    assert (after["old_logprobs"] - after["ref_logprobs"]).abs().sum() < gap_before


@pytest.mark.parametrize("cfg", [GRPO, DR_GRPO], ids=["grpo", "dr_grpo"])
def test_gradient_accumulation_matches_one_big_micro_batch_and_the_loss_is_the_hand_normalised_one(
    model, tokenizer, cfg
):
    """Micro-batch 1 x 4 accumulates the gradient of micro-batch 4 x 1. At ratio 1 (before any update) with no KL
    term every token's loss is -A, so GRPO's loss is the mean over sequences of -A_i (0: the centred advantages
    sum to 0), and Dr. GRPO's is -sum_i A_i n_i / (4 x max_new_tokens), n_i the solution's tokens."""
    cfg = dataclasses.replace(cfg, kl_coef=0.0, max_new_tokens=32)
    batch = hand_made_group(model, tokenizer, [1.0, 0.0, 0.0, 0.0])
    _, advantages = group_relative_advantages(batch, 1, cfg)
    grads, losses = [], []
    for micro_batch_size in (4, 1):
        policy = copy.deepcopy(model)
        losses.append(accumulate_gradients(PolicyValue(policy), batch, micro_batch_size, cfg)["loss"])
        grads.append([p.grad.clone() for p in policy.parameters()])
    for one, accumulated in zip(*grads, strict=True):
        torch.testing.assert_close(accumulated, one, rtol=1e-4, atol=1e-6)
    lengths = batch["mask"].sum(1)  # (4,)
    expected = 0.0 if cfg.loss_norm == LossNorm.sequence_mean else float(-(advantages[0] * lengths).sum() / (4 * 32))
    assert losses[0] == pytest.approx(expected, abs=1e-6) and losses[1] == pytest.approx(expected, abs=1e-6)
    assert expected == 0.0 or abs(expected) > 1e-3  # Dr. GRPO's loss sees the lengths


# ---------------------------------------------------------------------------------- the loop, in process


class RecordingTracker(NullTracker):
    def __init__(self) -> None:
        self.points: list[tuple[int | None, dict[str, float]]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.points.append((step, dict(metrics)))

    def history(self, name: str) -> dict[int | None, float]:
        return {step: metrics[name] for step, metrics in self.points if name in metrics}


def digit_reward(ctx, cfg, problems: Sequence[Problem], samples: Sequence[Sample]):
    """A reward a random policy earns unequally: the fraction of digits in the solution, at its last token (the
    tiny random model is never correct, so the real rewards would be 0 and every group's advantages 0)."""
    rewards = []
    for sample in samples:
        reward = torch.zeros(len(sample.token_ids))
        reward[-1] = sum(c.isdigit() for c in sample.text) / max(len(sample.text), 1)
        rewards.append(reward)
    return rewards, [False] * len(samples)


def run_grpo(tmp: Path, algo: GRPOConfig, *, lora_rank: int = 0, restore: bool = False):
    """grpo.run on the tiny model and 8 generated arith problems, checkpointing every step into ``tmp``."""
    model_cfg = dataclasses.replace(TINY, max_seq_len=96, train_batch_size=4, micro_batch_size=2, sample_batch_size=8,
                                    lora_rank=lora_rank)  # fmt: skip
    cfg = ExperimentConfig(algo=algo, reward=RewardConfig(name=RewardName.sparse), init=PretrainedInitConfig(n_shots=0),
                           model=model_cfg, task=ArithTaskConfig(), logger=LoggerConfig(name=LoggerName.none),
                           eval=EvalConfig(k=1, max_new_tokens=8, save_samples=False))  # fmt: skip
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(model_cfg, len(tokenizer), seed=0)
    tmp.mkdir(parents=True, exist_ok=True)
    tracker = RecordingTracker()
    ctx = RunContext(cfg, model, tokenizer, generate_arith(8, 2, 1, 1, 9, "+", seed=0), lambda q: f"Q: {q}\nA:\n",
                     tracker, tmp, torch.device("cpu"), checkpoints=Checkpointer(tmp, 1, restore=restore))  # fmt: skip
    grpo.run(ctx)
    return ctx.model, tracker


LOOP = GRPOConfig(steps=2, rollout_questions=4, num_samples=2, max_new_tokens=12, minibatch_size=4, lr=1e-2,
                  eval_init=False)  # fmt: skip
PER_STEP = ["train/grpo_reward_mean", "train/grpo_zero_variance_fraction", "train/grpo_clip_fraction",
            "train/grpo_response_length", "train/grpo_samples_drawn", "train/grpo_loss", "train/grpo_grad_norm",
            "train/grpo_entropy", "rollout/logprob_gap_mean"]  # fmt: skip


@pytest.mark.parametrize(("kl_coef", "lora_rank"), [(0.0, 0), (0.04, 0), (0.04, 4)])
def test_the_loop_logs_every_step_and_keeps_a_reference_only_for_a_kl_term(tmp_path, monkeypatch, kl_coef, lora_rank):
    monkeypatch.setattr(grpo, "score_samples", digit_reward)
    references = []

    def recording(model, value_head, ref_model, batch, *args, **kwargs):
        references.append((ref_model is not None, kwargs["reference"]))
        return evaluate_rollouts(model, value_head, ref_model, batch, *args, **kwargs)

    monkeypatch.setattr(grpo, "evaluate_rollouts", recording)
    model, tracker = run_grpo(tmp_path, dataclasses.replace(LOOP, kl_coef=kl_coef), lora_rank=lora_rank)
    # a copy of the initial policy only for a KL term without LoRA (with LoRA: the policy with its adapters off)
    assert references == [(kl_coef > 0 and not lora_rank, kl_coef > 0)] * 2
    for name in PER_STEP:
        assert sorted(tracker.history(name)) == [1, 2], name
    assert sorted(tracker.history("train/grpo_kl")) == ([1, 2] if kl_coef else [])
    assert tracker.history("train/grpo_samples_drawn") == {1: 8, 2: 16}
    assert 0 < tracker.history("train/grpo_zero_variance_fraction")[1] < 1  # the digit reward varies in some groups
    assert sorted(tracker.history("eval/maj_at_1")) == [2]
    assert not hasattr(model, "peft_config")  # LoRA's adapters are merged back into a plain model


def test_a_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, monkeypatch):
    """Three steps straight, against one step, then a rerun of three steps that restores the checkpoint of step 1:
    the same weights and the same metrics at steps 2 and 3 (timings aside)."""
    monkeypatch.setattr(grpo, "score_samples", digit_reward)
    three = dataclasses.replace(LOOP, steps=3, eval_every=1)
    straight, straight_log = run_grpo(tmp_path / "straight", three)
    run_grpo(tmp_path / "victim", dataclasses.replace(three, steps=1))  # ends after step 1, checkpointed
    resumed, resumed_log = run_grpo(tmp_path / "victim", three, restore=True)
    assert [step for step, _ in resumed_log.points] == [2, 2, 3, 3]  # steps 2 and 3 only, each train + eval
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    later = [(s, {k: v for k, v in m.items() if not k.startswith("perf/")}) for s, m in straight_log.points if s > 1]
    assert later == [(s, {k: v for k, v in m.items() if not k.startswith("perf/")}) for s, m in resumed_log.points]
    assert all(norm > 0 for norm in straight_log.history("train/grpo_grad_norm").values())  # the policy moved


# ----------------------------------------------------------------------------------- end to end, real CLI

# The algo.* settings are one-value sweeps, choice(...): a multirun composes its first config without the swept
# options (algo=none then), where a plain algo.steps=2 would not exist.
SMOKE = [
    "model=tiny", "task=arith", "task.min_steps=1", "task.max_steps=1", "task.max_number=9", "task.n_train=64",
    "task.n_test=4", "init=pretrained", "init.n_shots=0", "eval.k=2", "eval.max_new_tokens=24", "seed=0",
    "algo=grpo,rloo,dr_grpo", "algo.steps=choice(2)", "algo.rollout_questions=choice(4)",
    "algo.num_samples=choice(2)", "algo.max_new_tokens=choice(24)", "algo.minibatch_size=choice(4)",
]  # fmt: skip


@pytest.mark.slow
def test_grpo_rloo_and_dr_grpo_run_through_the_cli_and_log(tmp_path):
    """The three options in one multirun (one process) from a random tiny model: two steps each; every train/grpo_*
    metric at every step, the eval/ metrics after the last, and a tag per option (the report's row)."""
    run_main(SMOKE, tmp_path, tmp_path / "cache", multirun=True)
    client, runs = runs_of(tmp_path)
    by_algo = {run.data.tags["algo"]: run for run in runs}
    assert sorted(by_algo) == ["dr_grpo", "grpo", "rloo"]
    for algo, run in by_algo.items():
        for name in [*PER_STEP, "train/grpo_kl", "train/grpo_fraction_correct", "perf/grpo_step_seconds"]:
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, name))
            assert steps == [1, 2], (algo, name)
        assert run.data.metrics["train/grpo_samples_drawn"] == 2 * 4 * 2  # steps x questions x K
        assert "eval/maj_at_1" in run.data.metrics and 0 <= run.data.metrics["train/grpo_clip_fraction"] <= 1


# ------------------------------------------------------------------------------------------------ report


def test_the_report_puts_the_rows_beyond_the_paper_after_the_papers_and_leaves_their_paper_cells_empty():
    import pandas as pd

    from reasoning_rl.report import SAMPLES_DRAWN, paper_table, row_name

    names = [row_name(algo, "sparse", "sft") for algo in ("dr_grpo", "ei", "grpo", "none", "rloo")]
    assert names == ["Dr. GRPO", "EI", "GRPO", "SFT", "RLOO"]
    assert row_name("grpo", "dense", "sft") == "grpo dense"  # other rewards: a row of their own, after the named ones
    runs = pd.DataFrame([{"row": row, "init": "sft", "task": "arith", "model": "tiny", "seed": "0", "maj@1": 0.5,
                          "maj@K": 0.5, "rerank@K": 0.5, "pass@K": 0.6} for row in [*names, "grpo dense"]])  # fmt: skip
    table = paper_table(runs, "sft", "arith", with_paper=True)
    assert list(table.index) == ["SFT", "EI", "GRPO", "RLOO", "Dr. GRPO", "grpo dense"]
    assert table.loc["EI", "maj@1 paper 7b"] == "0.48" and table.loc["GRPO", "maj@1 paper 7b"] == "–"
    assert {SAMPLES_DRAWN[a] for a in ("grpo", "rloo", "dr_grpo")} == {"train/grpo_samples_drawn"}
