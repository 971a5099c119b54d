"""Sequence packing for fine-tuning: the packed row gives the padded batch's loss, gradients and updates."""

from __future__ import annotations

import copy

import pytest
import torch
from test_rollout_fast import MODELS, scaled_llama

from reasoning_rl.algos.orm import summed_outcome_loss
from reasoning_rl.models.loading import build_tiny_tokenizer
from reasoning_rl.models.outcome_reward import OutcomeRewardModel
from reasoning_rl.run.tracking import NullTracker
from reasoning_rl.training.finetune import (
    IGNORE_INDEX,
    FinetuneParams,
    TokenizedExample,
    collate,
    finetune,
    summed_token_loss,
    tokenize_examples,
)
from reasoning_rl.training.lora import LoraParams
from reasoning_rl.training.packing import collate_packed, packed_attention

# different lengths (11 to 25 tokens), so the padded batch has padding and the packed row several spans
EXAMPLES = [("Q: 1+2\n", "1+2=3\n#### 3"), ("Q: 10+20\n", "#### 30"), ("Q:\n", "5"), ("Q: 7\n", "7*1=7\n#### 7")]


def test_collate_packed_by_hand():
    batch = [TokenizedExample([5, 6, 7, 8], prompt_len=2), TokenizedExample([9, 10, 11], prompt_len=0)]
    out = collate_packed(batch, IGNORE_INDEX)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]  # restart at each sequence: RoPE sees it alone
    assert out["cu_seq_lens"].tolist() == [0, 4, 7]
    # sequence 0: prompt 5, 6 ignored, targets 7, 8. sequence 1 has no prompt, but its first token 9 is still
    # ignored: position 3 (token 8) must not learn to predict the next sequence's first token.
    i = IGNORE_INDEX
    assert out["labels"].tolist() == [[i, i, 7, 8, i, 10, 11]]


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_packed_loss_and_gradients_equal_the_padded_batch(kind: str):
    tok = build_tiny_tokenizer()
    model = scaled_llama(len(tok), *MODELS[kind]).train()
    data = tokenize_examples(tok, EXAMPLES, max_seq_len=64)

    def loss_and_grads(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = summed_token_loss(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    padded_loss, padded_grads = loss_and_grads(collate(data, tok.pad_token_id))
    with packed_attention(model):
        packed_loss, packed_grads = loss_and_grads(collate_packed(data, IGNORE_INDEX))
    assert model.config._attn_implementation == "sdpa"  # switched back
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-4)
    for a, b in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "options",
    [{}, {"gradient_checkpointing": True}, {"lora": LoraParams(rank=4, alpha=8.0, dropout=0.0)}],
    ids=["plain", "checkpointing", "lora"],
)
def test_finetune_packed_reaches_the_padded_weights(options: dict):
    tok = build_tiny_tokenizer()
    init = scaled_llama(len(tok), *MODELS["gqa"])

    def trained(pack: bool) -> torch.nn.Module:
        model = copy.deepcopy(init)
        params = FinetuneParams(lr=1e-2, epochs=2, batch_size=4, micro_batch_size=2, max_seq_len=64, seed=0,
                                warmup_ratio=0.0, pack_sequences=pack, **options)  # fmt: skip
        torch.manual_seed(0)  # LoRA's A matrices start random
        finetune(model, tok, EXAMPLES, params, NullTracker(), progress=False)
        return model

    packed, padded = trained(pack=True), trained(pack=False)
    assert packed.config._attn_implementation == "sdpa"
    moved = max((a - b).abs().max().item() for a, b in zip(packed.parameters(), init.parameters(), strict=True))
    assert moved > 1e-3
    for (name, a), (_, b) in zip(packed.named_parameters(), padded.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_packed_attention_restores_the_model_after_an_error_and_rejects_padded_input():
    tok = build_tiny_tokenizer()
    model = scaled_llama(len(tok), *MODELS["mha"])
    batch = collate(tokenize_examples(tok, EXAMPLES, max_seq_len=64), tok.pad_token_id)
    with pytest.raises(ValueError, match="collate_packed"), packed_attention(model):
        summed_token_loss(model, batch)  # a padded batch inside the packed context: no span boundaries
    assert model.config._attn_implementation == "sdpa"
    summed_token_loss(model, batch)  # and the model works as before
    with pytest.raises(TypeError, match="holds none"), packed_attention(torch.nn.Linear(2, 2)):
        pass


def test_orm_packed_loss_and_gradients_equal_the_padded_batch():
    # the ORM (a transformers model inside a module, plus a head) packs like the LM: packed_attention finds its lm
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    orm = OutcomeRewardModel(scaled_llama(len(tok), *MODELS["gqa"]), tok).train()
    torch.nn.init.normal_(orm.head.weight)  # a head that gives each token its own logit
    data = tokenize_examples(tok, [(q, a, float(i % 2)) for i, (q, a) in enumerate(EXAMPLES)], max_seq_len=64)

    def loss_and_grads(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        orm.zero_grad(set_to_none=True)
        loss = summed_outcome_loss(orm, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in orm.parameters()]

    packed_batch = collate_packed(data, IGNORE_INDEX)
    each_token = [float(i % 2) for i, ex in enumerate(data) for _ in ex.input_ids]  # its sequence's outcome
    assert packed_batch["outcomes"].tolist() == [each_token]
    padded_loss, padded_grads = loss_and_grads(collate(data, tok.pad_token_id))
    with packed_attention(orm):
        packed_loss, packed_grads = loss_and_grads(packed_batch)
    assert orm.lm.config._attn_implementation == "sdpa"  # switched back
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-4)
    for a, b in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
