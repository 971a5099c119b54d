"""LoRA adapters (model.lora_rank > 0): trained alone, merged into a plain model, switched off for PPO's reference."""

from __future__ import annotations

import copy

import pytest
import torch
from peft.tuners.lora import LoraLayer
from test_ppo import history, run_main, runs_of
from test_rollout_fast import MODELS, PROMPTS, scaled_llama

from reasoning_rl.algos.orm import summed_outcome_loss
from reasoning_rl.algos.ppo import PolicyValue, evaluate_rollouts, new_value_head, pack_rollouts, ppo_update
from reasoning_rl.algos.ppo_math import gae
from reasoning_rl.config import ConfigError, ModelConfig, ModelSource, PPOConfig
from reasoning_rl.models.loading import build_tiny_model, build_tiny_tokenizer
from reasoning_rl.models.outcome_reward import OutcomeRewardModel
from reasoning_rl.rollout.native import generate
from reasoning_rl.rollout.sampler import Sample, SamplingParams
from reasoning_rl.run.tracking import NullTracker
from reasoning_rl.scoring.rewards import sparse_rewards
from reasoning_rl.training.finetune import (
    IGNORE_INDEX,
    FinetuneParams,
    collate,
    finetune,
    summed_token_loss,
    tokenize_examples,
)
from reasoning_rl.training.lora import (
    TARGET_MODULES,
    LoraParams,
    adapters_disabled,
    attach_adapters,
    merge_adapters,
    merged_weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


TINY = ModelConfig(name="tiny", source=ModelSource.tiny, hidden_size=32, num_layers=2, num_heads=2,
                   intermediate_size=64, max_seq_len=64)  # fmt: skip
ADAPTERS = LoraParams(rank=4, alpha=8.0, dropout=0.0)
EXAMPLES = [("Q: 1+2\n", "1+2=3\n#### 3"), ("Q: 10+20\n", "#### 30"), ("Q:\n", "5"), ("Q: 7\n", "7*1=7\n#### 7")]


def perturbed_adapters(model: torch.nn.Module) -> None:
    """Attach adapters and give them non-zero weights (fresh ones start with B = 0: no change)."""
    attach_adapters(model, ADAPTERS)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def test_finetune_with_lora_trains_the_projections_only_and_hands_on_a_plain_model():
    tok = build_tiny_tokenizer()
    # A Llama whose logits are far from uniform: with frozen embeddings and norms, the tiny model's near-uniform
    # logits are out of the adapters' reach (they can only turn the hidden states).
    init = scaled_llama(len(tok), *MODELS["gqa"])
    model = copy.deepcopy(init)
    batch = collate(tokenize_examples(tok, EXAMPLES, max_seq_len=64), tok.pad_token_id)
    with torch.no_grad():
        initial_loss = float(summed_token_loss(init, batch)) / int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    params = FinetuneParams(lr=1e-2, epochs=30, batch_size=4, micro_batch_size=2, max_seq_len=64, seed=0,
                            lora=ADAPTERS)  # fmt: skip
    stats = finetune(model, tok, EXAMPLES, params, NullTracker(), progress=False)
    assert stats["final_loss"] < 0.2 * initial_loss, (stats, initial_loss)  # the adapters learned (4.8 -> 0.4)
    assert not any(isinstance(m, LoraLayer) for m in model.modules()) and not hasattr(model, "peft_config")
    assert list(model.state_dict()) == list(init.state_dict())  # the same architecture, no adapter weights left
    assert all(p.requires_grad for p in model.parameters())
    before = dict(init.named_parameters())
    for name, weight in model.named_parameters():
        if name.rsplit(".", 2)[-2] in TARGET_MODULES:
            assert not torch.equal(weight, before[name]), f"{name} did not move"
        else:  # embeddings (tied to lm_head) and norms stay frozen
            torch.testing.assert_close(weight, before[name], rtol=0, atol=0, msg=name)


def test_merged_weights_lists_the_plain_models_weights_with_the_adapters_folded_in():
    """What a weight push gives vLLM: loaded into a plain model, they compute what the adapted model computes."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(TINY, len(tok), seed=0).eval()
    plain = build_tiny_model(TINY, len(tok), seed=1).eval()
    perturbed_adapters(model)
    weights = dict(merged_weights(model))
    assert set(weights) == {name for name, _ in plain.named_parameters()}
    plain.load_state_dict(weights, strict=False)  # lm_head.weight is tied to the embeddings: listed once
    ids = torch.tensor([tok("Q: 12+30\n#### 42")["input_ids"]])
    torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_merged_weights_compute_what_the_adapted_model_computed():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(TINY, len(tok), seed=0).eval()
    ids = torch.tensor([tok("Q: 12+30\n#### 42")["input_ids"]])
    plain = model(input_ids=ids).logits
    perturbed_adapters(model)
    adapted = model(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 1e-2
    with adapters_disabled(model):  # what PPO's reference computes with: the weights the adapters started from
        torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=0)
    merge_adapters(model)
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_an_adapter_adds_alpha_over_rank_times_b_a_and_merging_adds_it_to_the_weight():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(TINY, len(tok), seed=0).eval()
    attach_adapters(model, ADAPTERS)  # rank 4, alpha 8: the update is (8 / 4) B A = 2 B A
    q_proj = model.model.layers[0].self_attn.q_proj
    weight = q_proj.base_layer.weight.detach().clone()  # (32, 32)
    with torch.no_grad():  # B A = E_00: A's first row picks x[0], B's first column writes it to output 0
        q_proj.lora_A["default"].weight.zero_()[0, 0] = 1.0  # (4, 32)
        q_proj.lora_B["default"].weight.zero_()[0, 0] = 1.0  # (32, 4)
        x = torch.zeros(1, 32)
        x[0, 0], x[0, 1] = 3.0, 5.0  # (1, 32); B A reads x[0] only
        delta = q_proj(x) - x @ weight.T  # (1, 32)
    expected = torch.zeros(1, 32)
    expected[0, 0] = 6.0  # output 0 gains 2 * x[0] = 2 * 3; the other 31 outputs nothing
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-5)
    merge_adapters(model)
    expected = torch.zeros(32, 32)
    expected[0, 0] = 2.0  # W + 2 E_00
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight - weight, expected, rtol=0, atol=1e-6)


def test_orm_with_lora_trains_its_head_and_its_adapters():
    tok = build_tiny_tokenizer()
    orm = OutcomeRewardModel(build_tiny_model(TINY, len(tok), seed=0), tok)
    head, q_proj = orm.head.weight.clone(), orm.lm.model.layers[0].self_attn.q_proj.weight.clone()
    examples = [(q, a, float(i % 2)) for i, (q, a) in enumerate(EXAMPLES)]
    params = FinetuneParams(lr=1e-2, epochs=2, batch_size=4, micro_batch_size=4, max_seq_len=64, seed=0,
                            lora=ADAPTERS)  # fmt: skip
    finetune(orm, tok, examples, params, NullTracker(), progress=False, loss_fn=summed_outcome_loss)
    assert not torch.equal(orm.head.weight, head)  # the head is not part of the language model: trained in full
    assert not torch.equal(orm.lm.model.layers[0].self_attn.q_proj.weight, q_proj)  # merged adapters


@torch.inference_mode()
def test_fast_sampler_with_adapters_attached_equals_the_plain_path():
    """PPO samples from its policy with the adapters attached (not yet merged): the fast path calls the adapted
    projections one by one instead of one fused matmul, and must still give the plain path's tokens."""
    tok = build_tiny_tokenizer()
    model = scaled_llama(len(tok), *MODELS["gqa"])
    perturbed_adapters(model)
    params = SamplingParams(temperature=0, max_new_tokens=12)
    fast = generate(model, tok, PROMPTS, params, num_samples=2, batch_size=3, fast=True)
    plain = generate(model, tok, PROMPTS, params, num_samples=2, batch_size=3, fast=False)
    assert [[s.token_ids for s in g] for g in fast] == [[s.token_ids for s in g] for g in plain]


def test_bad_lora_settings_are_config_errors():
    with pytest.raises(ConfigError, match="lora_rank=-1 must be >= 0"):
        ModelConfig(name="tiny", source=ModelSource.tiny, lora_rank=-1)
    with pytest.raises(ConfigError, match=r"lora_dropout=1.0 in \[0, 1\)"):
        ModelConfig(name="tiny", source=ModelSource.tiny, lora_rank=8, lora_dropout=1.0)


def test_ppo_reference_is_the_policy_with_its_adapters_off_and_updates_train_the_adapters(tokenizer):
    policy = scaled_llama(len(tokenizer), *MODELS["gqa"])
    frozen_copy = copy.deepcopy(policy)  # what PPO's reference is without LoRA
    perturbed_adapters(policy)
    prompts = ["Q: 1+2\nA:\n", "Q: 10+20\nA:\n", "Q:\n"]
    token_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in ("3", "#### 30", "5")]
    samples = [Sample(ids, c, [0.0] * len(ids), "eos") for ids, c in zip(token_ids, ("3", "#### 30", "5"), strict=True)]
    scores = [sparse_rewards(len(s.token_ids), i != 1, 1.0) for i, s in enumerate(samples)]
    with_copy, adapters_off = (pack_rollouts(tokenizer, prompts, samples, scores) for _ in range(2))
    value_head = new_value_head(policy)
    evaluate_rollouts(policy, value_head, frozen_copy, with_copy, micro_batch_size=2)
    evaluate_rollouts(policy, value_head, None, adapters_off, micro_batch_size=2)
    torch.testing.assert_close(adapters_off["ref_logprobs"], with_copy["ref_logprobs"], rtol=0, atol=0)
    assert (adapters_off["ref_logprobs"] - adapters_off["old_logprobs"]).abs().max() > 1e-2
    # one PPO update moves the adapters and nothing else of the policy
    adapters_off["advantages"], adapters_off["returns"] = gae(
        adapters_off["scores"], adapters_off["old_values"], adapters_off["mask"], gamma=1.0, lam=0.95
    )
    before = {name: p.clone() for name, p in policy.named_parameters()}
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([*trainable, *value_head.parameters()], lr=1e-2)
    ppo_update(PolicyValue(policy, value_head), optimizer, adapters_off, PPOConfig(), minibatch_size=3,
               micro_batch_size=3, generator=torch.Generator().manual_seed(0))  # fmt: skip
    for name, p in policy.named_parameters():
        assert torch.equal(p, before[name]) != ("lora_" in name), name


@pytest.mark.slow
def test_ppo_with_lora_runs_end_to_end(tmp_path):
    """algo=ppo with model.lora_rank through main.py: adapters attached, checkpointed, merged; the first step's KL
    to the reference (the policy with its adapters off) is exactly 0, as fresh adapters change nothing."""
    overrides = [
        "model=tiny", "task=arith", "task.min_steps=1", "task.max_steps=1", "task.max_number=9", "task.n_train=64",
        "task.n_test=8", "init=pretrained", "algo=ppo", "algo.steps=2", "algo.rollout_questions=8",
        "algo.num_samples=2", "algo.max_new_tokens=24", "eval.k=2", "eval.max_new_tokens=24", "model.lora_rank=4",
    ]  # fmt: skip
    run_main(overrides, tmp_path, tmp_path / "cache")
    client, (run,) = runs_of(tmp_path)
    assert history(client, run, "train/ppo_kl")[1] == 0
    assert run.data.params["model.lora_rank"] == "4"
    assert "eval/maj_at_1" in run.data.metrics
