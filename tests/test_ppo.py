"""PPO's plumbing on a tiny model (rollout alignment, on-policy start, gradient accumulation), and PPO end to end
through the real CLI at the tiny scale: sparse PPO beats its SFT init; dense and ORM rewards run and log."""

from __future__ import annotations

import copy

import pytest
import torch

from reasoning_rl.algos.ppo import (
    accumulate_gradients,
    evaluate_rollouts,
    new_value_head,
    pack_rollouts,
    ppo_update,
    question_batches,
)
from reasoning_rl.algos.ppo_math import gae, masked_whiten
from reasoning_rl.config import ModelConfig, ModelSource, PPOConfig
from reasoning_rl.models import build_tiny_model, build_tiny_tokenizer
from reasoning_rl.rewards import sparse_rewards
from reasoning_rl.rollout import Sample, SamplingParams, generate
from reasoning_rl.tasks import Problem

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ModelConfig(
    name="tiny", source=ModelSource.tiny, max_seq_len=96, hidden_size=32, num_layers=2, num_heads=2,
    intermediate_size=64,
)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny random Llama with its matrices scaled up 8x, so that its next-token distribution depends on the context
    (at the default init it is nearly uniform, and a misaligned log-prob would look right)."""
    model = build_tiny_model(TINY, len(tokenizer), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model.eval()


def hand_made_batch(model, tokenizer, micro_batch_size: int = 2):
    """Four rollouts of different prompt and completion lengths, half of them correct, with advantages and returns."""
    prompts = ["Q: 1+2\nA:\n", "Q: 10+20\nA:\n", "Q:\n", "Q: 7*1 and more\nA:\n"]
    completions = ["1+2=3\n#### 3", "#### 30", "5", "7*1=7\n#### 7"]
    samples = [
        Sample(tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id], c, [], "eos")
        for c in completions
    ]
    scores = [sparse_rewards(len(s.token_ids), i % 2 == 0, 1.0) for i, s in enumerate(samples)]
    batch = pack_rollouts(tokenizer, prompts, samples, scores)
    torch.manual_seed(0)
    value_head = new_value_head(model)
    torch.nn.init.normal_(value_head.weight, std=0.1)  # non-zero values, so the value loss has a gradient
    evaluate_rollouts(model, value_head, copy.deepcopy(model), batch, micro_batch_size)
    advantages, batch["returns"] = gae(batch["scores"], batch["old_values"], batch["mask"], gamma=1.0, lam=0.95)
    batch["advantages"] = masked_whiten(advantages, batch["mask"])
    return batch, value_head


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


def test_the_first_minibatch_is_on_policy(model, tokenizer):
    """Before any update the new policy is the old one: ratio 1, nothing clipped, approximate KL 0."""
    batch, value_head = hand_made_batch(model, tokenizer)
    stats = accumulate_gradients(copy.deepcopy(model), value_head, batch, 4, PPOConfig())
    assert stats["clip_fraction"] == 0.0 and stats["value_clip_fraction"] == 0.0
    assert abs(stats["approx_kl"]) < 1e-6
    # at ratio 1 the policy loss is -A, whose token mean is 0 for whitened advantages
    assert abs(stats["policy_loss"]) < 1e-5


def test_gradient_accumulation_matches_one_big_micro_batch(model, tokenizer):
    """Micro-batch 1 x 4 accumulation steps gives the gradient and the update of micro-batch 4 x 1."""
    batch, value_head = hand_made_batch(model, tokenizer)
    cfg = PPOConfig(ppo_epochs=1, grad_clip=1e9)
    grads, updated = [], []
    for micro_batch_size in (4, 1):
        policy, head = copy.deepcopy(model), copy.deepcopy(value_head)
        accumulate_gradients(policy, head, batch, micro_batch_size, cfg)
        grads.append([p.grad.clone() for p in [*policy.parameters(), *head.parameters()]])
        policy, head = copy.deepcopy(model), copy.deepcopy(value_head)  # and a whole update, with plain SGD
        optimizer = torch.optim.SGD([*policy.parameters(), *head.parameters()], lr=0.1)
        generator = torch.Generator().manual_seed(0)
        ppo_update(
            policy, head, optimizer, batch, cfg, minibatch_size=4, micro_batch_size=micro_batch_size,
            generator=generator,
        )  # fmt: skip
        updated.append([p.detach().clone() for p in [*policy.parameters(), *head.parameters()]])
    for one, accumulated in zip(*grads, strict=True):
        torch.testing.assert_close(accumulated, one, rtol=1e-4, atol=1e-6)
    for one, accumulated in zip(*updated, strict=True):
        torch.testing.assert_close(accumulated, one, rtol=1e-4, atol=1e-6)
    moved = max((a - b).abs().max().item() for a, b in zip(updated[0], model.parameters(), strict=False))
    assert moved > 1e-4  # and the update did something
