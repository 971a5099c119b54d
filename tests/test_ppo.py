"""PPO's plumbing on a tiny model (rollout alignment, on-policy start, gradient accumulation), and PPO end to end
through the real CLI at the tiny scale: sparse PPO beats its SFT init; dense and ORM rewards run and log."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from learning import assert_gain, assert_in_band, paired_gain, per_problem, pinned_env, read_records

from reasoning_rl.algos.ppo import (
    PolicyValue,
    accumulate_gradients,
    evaluate_rollouts,
    fit_value_head,
    new_value_head,
    pack_rollouts,
    ppo_update,
    question_batches,
)
from reasoning_rl.algos.ppo_math import explained_variance, gae, masked_whiten
from reasoning_rl.config import ConfigError, ModelConfig, ModelSource, PPOConfig, register_configs, to_experiment
from reasoning_rl.models.loading import build_tiny_model, build_tiny_tokenizer
from reasoning_rl.rollout.native import generate
from reasoning_rl.rollout.sampler import Sample, SamplingParams
from reasoning_rl.scoring.rewards import sparse_rewards
from reasoning_rl.tasks import Problem

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ModelConfig(
    name="tiny", source=ModelSource.tiny, max_seq_len=96, hidden_size=32, num_layers=2, num_heads=2,
    intermediate_size=64,
)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def scaled_tiny_model(vocab_size: int) -> torch.nn.Module:
    """A tiny random Llama with its matrices scaled up 8x, so that its next-token distribution depends on the context
    (at the default init it is nearly uniform, and a misaligned log-prob would look right)."""
    model = build_tiny_model(TINY, vocab_size, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model.eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return scaled_tiny_model(len(tokenizer))


def hand_made_batch(model, tokenizer, micro_batch_size: int = 2):
    """Four rollouts of different prompt and completion lengths, half of them correct, with advantages and returns."""
    prompts = ["Q: 1+2\nA:\n", "Q: 10+20\nA:\n", "Q:\n", "Q: 7*1 and more\nA:\n"]
    completions = ["1+2=3\n#### 3", "#### 30", "5", "7*1=7\n#### 7"]
    samples = [
        Sample(ids, c, [0.0] * len(ids), "eos")
        for c in completions
        for ids in [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    ]
    scores = [sparse_rewards(len(s.token_ids), i % 2 == 0, 1.0) for i, s in enumerate(samples)]
    batch = pack_rollouts(tokenizer, prompts, samples, scores)
    torch.manual_seed(0)
    value_head = new_value_head(model)
    torch.nn.init.normal_(value_head.weight, std=0.1)  # non-zero values, so the value loss has a gradient
    evaluate_rollouts(model, value_head, copy.deepcopy(model), batch, micro_batch_size)
    batch["sampler_logprobs"] = batch["old_logprobs"].clone()  # as if the trainer had sampled them itself
    advantages, batch["returns"] = gae(batch["scores"], batch["old_values"], batch["mask"], gamma=1.0, lam=0.95)
    batch["advantages"] = masked_whiten(advantages, batch["mask"])
    return batch, value_head


# -------------------------------------------------------------------------------------------------- config


def compose_experiment(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return to_experiment(compose(config_name="config", overrides=overrides))


def test_ppo_config_composes_with_every_reward_and_rejects_bad_settings():
    for reward in ("sparse", "dense", "orm", "orm_dense"):
        cfg = compose_experiment(["algo=ppo", f"reward={reward}", "model=tiny"])
        assert cfg.algo.name == "ppo" and cfg.needs_orm == reward.startswith("orm")
    assert compose_experiment(["algo=ppo", "reward=dense"]).reward.step_reward == 0.2
    with pytest.raises(ConfigError, match="algo.ppo_epochs=0 must be >= 1"):
        compose_experiment(["algo=ppo", "algo.ppo_epochs=0"])
    with pytest.raises(ConfigError, match="algo.gamma=1.5"):
        compose_experiment(["algo=ppo", "algo.gamma=1.5"])
    with pytest.raises(ConfigError, match="algo.max_new_tokens=400 leaves no room"):
        compose_experiment(["algo=ppo", "model=tiny", "algo.max_new_tokens=400"])  # tiny: max_seq_len 384
    with pytest.raises(ConfigCompositionException, match="k2"):
        compose_experiment(["algo=ppo", "algo.kl_estimator=k2"])  # k1 | k3


# ------------------------------------------------------------------------------------------------ plumbing


def test_question_batches_cover_the_data_before_repeating():
    train = [Problem(f"p{i}", f"q{i}", "#### 1", "1", ()) for i in range(10)]
    stream = question_batches(train, 4, seed=0)
    first = [p.id for _ in range(5) for p in next(stream)]  # 20 questions = two passes
    assert sorted(first[:10]) == sorted(p.id for p in train)  # every question once in the first pass
    assert sorted(first[10:]) == sorted(p.id for p in train)
    again = question_batches(train, 4, seed=0)
    assert [p.id for p in next(again)] == first[:4]  # seeded


def test_rollout_logprobs_match_the_sampler(model, tokenizer):
    """The packed layout puts every generated token where the sampler produced it: the forward pass's log-probs of
    the generated tokens are the sampler's own (untempered log_softmax), whatever the padding."""
    prompts = ["Question: 1+2?\nAnswer:\n", "Hi", "What is 12 minus 7 plus 3? Think.\nAnswer:\n"]
    grouped = generate(model, tokenizer, prompts, SamplingParams(1.0, 1.0, 12), num_samples=2, seed=0)
    flat_prompts = [p for p, group in zip(prompts, grouped, strict=True) for _ in group]
    samples = [s for group in grouped for s in group]
    scores = [torch.zeros(len(s.token_ids)) for s in samples]
    batch = pack_rollouts(tokenizer, flat_prompts, samples, scores)
    evaluate_rollouts(model, new_value_head(model), model, batch, micro_batch_size=4)
    for row, sample in enumerate(samples):
        n = len(sample.token_ids)
        assert batch["response_ids"][row, :n].tolist() == sample.token_ids
        torch.testing.assert_close(batch["old_logprobs"][row, :n], torch.tensor(sample.logprobs), atol=1e-4, rtol=0)
        assert not batch["old_logprobs"][row, n:].any()  # padding is zero
    assert min(batch["old_logprobs"][batch["mask"] > 0].tolist()) < -1  # the model is far from deterministic
    torch.testing.assert_close(batch["ref_logprobs"], batch["old_logprobs"])  # the reference is the same model here
    assert (batch["entropy"][batch["mask"] > 0] > 0).all()


@pytest.mark.parametrize(("engine_offset", "tis_cap", "factor"), [(math.log(2), 3.0, 0.5), (-math.log(10), 3.0, 3.0),
                                                               (math.log(2), None, 1.0)])  # fmt: skip
def test_truncated_importance_sampling_weights_each_tokens_policy_loss(
    model, tokenizer, engine_offset, tis_cap, factor
):
    """An engine that gave every sampled token log-prob old + offset: each token's policy gradient is scaled by
    min(exp(-offset), tis_cap) (0.5; 10 capped at 3), and by 1 with the correction off."""
    batch, value_head = hand_made_batch(model, tokenizer)
    batch["advantages"] = torch.ones_like(batch["advantages"]) * batch["mask"]  # a loss whose mean is not 0
    cfg = PPOConfig(tis_cap=tis_cap)
    on_policy = accumulate_gradients(PolicyValue(copy.deepcopy(model), value_head), batch, 4, cfg)
    batch["sampler_logprobs"] = (batch["old_logprobs"] + engine_offset) * batch["mask"]
    off_policy = accumulate_gradients(PolicyValue(copy.deepcopy(model), value_head), batch, 4, cfg)
    assert off_policy["policy_loss"] == pytest.approx(factor * on_policy["policy_loss"], rel=1e-5)
    assert off_policy["value_loss"] == pytest.approx(on_policy["value_loss"], rel=1e-6)  # the critic is not weighted


def test_the_first_minibatch_is_on_policy(model, tokenizer):
    """Before any update the new policy is the old one: ratio 1, nothing clipped, approximate KL 0."""
    batch, value_head = hand_made_batch(model, tokenizer)
    stats = accumulate_gradients(PolicyValue(copy.deepcopy(model), value_head), batch, 4, PPOConfig())
    assert stats["clip_fraction"] == 0.0 and stats["value_clip_fraction"] == 0.0
    assert abs(stats["approx_kl"]) < 1e-6
    # at ratio 1 the policy loss is -A, whose token mean is 0 for whitened advantages
    assert abs(stats["policy_loss"]) < 1e-5


def test_the_critic_warm_up_fits_the_value_head_and_leaves_the_policy_alone(model, tokenizer):
    """The warm-up's least-squares head explains the returns of its batch better than any constant (EV > 0), and
    beats the zero head it replaces; the policy's weights do not move."""
    batch, value_head = hand_made_batch(model, tokenizer)
    batch["returns"] = gae(batch["scores"], torch.zeros_like(batch["scores"]), batch["mask"], 1.0, 1.0)[1]  # MC
    policy = copy.deepcopy(model)
    explained = fit_value_head(policy, value_head, batch, 2, ridge=1e-3)
    assert explained > 0.5  # 4 sequences, ~25 tokens, a 32-wide trunk: an easy fit
    assert explained == pytest.approx(
        explained_variance(evaluate_values(policy, value_head, batch), batch["returns"], batch["mask"]), abs=1e-5
    )
    for before, after in zip(model.parameters(), policy.parameters(), strict=True):
        assert torch.equal(before, after)


def test_the_critic_warm_up_of_a_never_rewarded_policy_fits_zero(model, tokenizer):
    """Returns that do not vary (no sample ever correct, the KL 0 at the first step): the fit is the zero head and
    its explained variance NaN, which the run logs rather than stopping on (a NaN loss stops it)."""
    batch, value_head = hand_made_batch(model, tokenizer)
    batch["returns"] = torch.zeros_like(batch["returns"])
    assert math.isnan(fit_value_head(copy.deepcopy(model), value_head, batch, 2, ridge=1e-3))
    assert value_head.weight.abs().max() < 1e-6 and abs(float(value_head.bias)) < 1e-6


def evaluate_values(model, value_head, batch):
    evaluate_rollouts(model, value_head, copy.deepcopy(model), batch, 4)
    return batch["old_values"]


def test_gradient_accumulation_matches_one_big_micro_batch(model, tokenizer):
    """Micro-batch 1 x 4 accumulation steps gives the gradient and the update of micro-batch 4 x 1."""
    batch, value_head = hand_made_batch(model, tokenizer)
    cfg = PPOConfig(ppo_epochs=1, grad_clip=1e9)
    grads, updated = [], []
    for micro_batch_size in (4, 1):
        policy, head = copy.deepcopy(model), copy.deepcopy(value_head)
        accumulate_gradients(PolicyValue(policy, head), batch, micro_batch_size, cfg)
        grads.append([p.grad.clone() for p in [*policy.parameters(), *head.parameters()]])
        policy, head = copy.deepcopy(model), copy.deepcopy(value_head)  # and a whole update, with plain SGD
        optimizer = torch.optim.SGD([*policy.parameters(), *head.parameters()], lr=0.1)
        generator = torch.Generator().manual_seed(0)
        ppo_update(
            PolicyValue(policy, head), optimizer, batch, cfg, minibatch_size=4, micro_batch_size=micro_batch_size,
            generator=generator,
        )  # fmt: skip
        updated.append([p.detach().clone() for p in [*policy.parameters(), *head.parameters()]])
    for one, accumulated in zip(*grads, strict=True):
        torch.testing.assert_close(accumulated, one, rtol=1e-4, atol=1e-6)
    for one, accumulated in zip(*updated, strict=True):
        torch.testing.assert_close(accumulated, one, rtol=1e-4, atol=1e-6)
    moved = max((a - b).abs().max().item() for a, b in zip(updated[0], model.parameters(), strict=False))
    assert moved > 1e-4  # and the update did something


# ----------------------------------------------------------------------------------- end to end, real CLI

ROOT = Path(__file__).resolve().parents[1]

# One-operation problems with small numbers, as in test_end_to_end.py: 300 SFT steps give maj@1 0.64-0.79 at one
# thread (its SFT_BAND). Every run below shares that SFT init through the stage cache.
SFT = [
    "model=tiny", "task=arith", "task.min_steps=1", "task.max_steps=1", "task.max_number=9", "task.n_train=2000",
    "init=sft", "init.max_steps=300", "eval.max_new_tokens=48", "algo=ppo", "algo.max_new_tokens=48", "seed=0",
]  # fmt: skip
SFT_BAND = (0.45, 0.90)
# Sparse PPO: 24 steps of 64 questions x 4 samples at lr 1e-4, one epoch of minibatches of 64; the first step only
# fits the value head (algo.critic_warmup_steps=1). Calibrated at seed 0, one thread, on an AMD EPYC (2026-12-01):
# maj@1 on the 400 test problems 0.780 -> 0.887 (paired gain 0.108, SE 0.016, z = 6.6), K-sample accuracy 0.701 ->
# 0.848 (z = 9.8); both asserted at z >= 3. The training samples (T = 1, fresh questions every step) moved less:
# 0.675 -> 0.708 from the first quarter of the steps to the last (z = 2.0), so only their direction is asserted.
# The value head's explained variance averaged 0.018 over steps 2-24 (a gradient-trained head at value_lr 1e-3:
# -0.09; the zero head at the policy's lr before: <= 0).
PPO_STEPS = 24
QUESTIONS = 64
SPARSE_PPO = [
    *SFT, "task.n_test=400", "eval.k=4", f"algo.steps={PPO_STEPS}", f"algo.rollout_questions={QUESTIONS}",
    "algo.num_samples=4", "algo.lr=1e-4", "algo.ppo_epochs=1", f"algo.minibatch_size={QUESTIONS}",
]  # fmt: skip
PPO_MAJ1_MIN_Z = 3.0


def run_main(overrides: list[str], tmp: Path, cache: Path, *, multirun: bool = False) -> None:
    env = pinned_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}")
    where = f"hydra.sweep.dir={tmp / 'multirun'}" if multirun else f"hydra.run.dir={tmp / 'run'}"
    command = [sys.executable, str(ROOT / "main.py"), *(["-m"] if multirun else []), *overrides, where]
    result = subprocess.run(
        [*command, f"cache_dir={cache}"], cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def runs_of(tmp: Path):
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("reasoning-rl").experiment_id])
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    return client, [r for r in runs if r.data.tags.get("sweep") != "parent"]  # a multirun parent (launch/sweep.py)


def history(client, run, name: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}


PER_STEP_METRICS = [
    "train/ppo_reward_mean", "train/ppo_fraction_correct", "train/ppo_kl", "train/ppo_entropy",
    "train/ppo_explained_variance", "train/ppo_response_length", "train/ppo_samples_drawn", "perf/ppo_step_seconds",
]  # fmt: skip
# the update's metrics, from the first step after the critic warm-up; the warm-up logs its fit instead
POLICY_METRICS = ["train/ppo_policy_loss", "train/ppo_value_loss", "train/ppo_clip_fraction", "train/ppo_approx_kl"]


@pytest.fixture(scope="module")
def cache(stage_cache) -> Path:
    return stage_cache  # the SFT stage (the same settings as test_end_to_end.py's) is computed once per session


@pytest.mark.slow
def test_sparse_ppo_raises_training_reward_and_maj1_over_its_sft_init(tmp_path, cache):
    run_main(SPARSE_PPO, tmp_path, cache)
    client, (run,) = runs_of(tmp_path)
    correct = history(client, run, "train/ppo_fraction_correct")
    maj1 = history(client, run, "eval/maj_at_1")
    explained = history(client, run, "train/ppo_explained_variance")
    assert sorted(maj1) == [0, PPO_STEPS]  # the init and the end (eval_every=0)
    assert_in_band(maj1[0], *SFT_BAND, "the SFT init's maj@1")
    # the training samples get more often right: last quarter of the steps over the first (independent samples)
    quarter = PPO_STEPS // 4
    first = sum(correct[s] for s in range(1, quarter + 1)) / quarter
    last = sum(correct[s] for s in range(PPO_STEPS - quarter + 1, PPO_STEPS + 1)) / quarter
    init, final = (read_records(tmp_path / "run" / "eval" / f"samples_step{i}.jsonl") for i in (0, PPO_STEPS))
    sample_gain = paired_gain(per_problem(init, "sample_accuracy"), per_problem(final, "sample_accuracy"))
    maj1_gain = paired_gain(per_problem(init, "maj_at_1"), per_problem(final, "maj_at_1"))
    trained_explained = sum(explained[s] for s in range(2, PPO_STEPS + 1)) / (PPO_STEPS - 1)
    print(f"fraction correct: first quarter {first:.3f}, last {last:.3f}; maj@1 {maj1}; gains (gain, SE): samples "
          f"{sample_gain}, maj@1 {maj1_gain}; explained variance after warm-up: {trained_explained:.3f}")  # fmt: skip
    assert_gain(*sample_gain, "PPO: accuracy of the K test samples, SFT init -> last step")
    assert_gain(*maj1_gain, "PPO: maj@1, SFT init -> last step", min_z=PPO_MAJ1_MIN_Z)
    assert last > first, "the training samples got less often right"
    assert trained_explained > 0, "the value head explains none of the returns' variance: the critic does not learn"
    for name in PER_STEP_METRICS:  # every step logs every metric
        assert sorted(history(client, run, name)) == list(range(1, PPO_STEPS + 1)), name
    for name in POLICY_METRICS:  # the first step only fits the value head
        assert sorted(history(client, run, name)) == list(range(2, PPO_STEPS + 1)), name
    assert sorted(history(client, run, "train/ppo_critic_warmup_explained_variance")) == [1]
    assert history(client, run, "train/ppo_samples_drawn")[PPO_STEPS] == PPO_STEPS * QUESTIONS * 4


@pytest.mark.slow
def test_dense_and_orm_rewards_run_to_the_end_and_log(tmp_path, cache):
    """reward=dense, orm and orm_dense in one multirun (one process): a few small steps each, from the same SFT init;
    the ORM is trained once (small) and shared by the two ORM runs."""
    overrides = [
        *SFT, "reward=dense,orm,orm_dense", "task.n_test=20", "eval.k=2", "algo.steps=2", "algo.eval_every=1",
        "algo.rollout_questions=8", "algo.num_samples=2", "algo.lr=1e-4", "orm.n_questions=100",
        "orm.max_new_tokens=48",
    ]  # fmt: skip
    run_main(overrides, tmp_path, cache, multirun=True)
    client, runs = runs_of(tmp_path)
    by_reward = {run.data.tags["reward"]: run for run in runs}
    assert sorted(by_reward) == ["dense", "orm", "orm_dense"]
    for reward, run in by_reward.items():
        for name in PER_STEP_METRICS:
            assert sorted(history(client, run, name)) == [1, 2], (reward, name)
        for name in POLICY_METRICS:  # step 1 is the critic warm-up
            assert sorted(history(client, run, name)) == [2], (reward, name)
        assert sorted(history(client, run, "eval/maj_at_1")) == [0, 1, 2]
        assert 0 <= run.data.metrics["train/ppo_fraction_correct"] <= 1
    # dense rewards the matched steps on top of the correct answers; an ORM score is a probability, and orm_dense's
    # step rewards are the changes of the score, which sum to the final score: both means lie in (0, 1]
    dense = history(client, by_reward["dense"], "train/ppo_reward_mean")
    dense_correct = history(client, by_reward["dense"], "train/ppo_fraction_correct")
    assert all(dense[s] >= dense_correct[s] for s in dense)
    assert all(0 < v <= 1 for v in history(client, by_reward["orm"], "train/ppo_reward_mean").values())
    assert all(0 < v <= 1 for v in history(client, by_reward["orm_dense"], "train/ppo_reward_mean").values())
    assert "eval/rerank_at_k" in by_reward["orm"].data.metrics  # an ORM exists, so the evaluation reranks
    assert "eval/rerank_at_k" not in by_reward["dense"].data.metrics
