"""The SFT loop: loss masking, the schedule, and accumulation equivalence."""

from __future__ import annotations

import copy

import pytest
import torch

from reasoning_rl.config import ModelConfig, ModelSource
from reasoning_rl.models.loading import build_tiny_model, build_tiny_tokenizer
from reasoning_rl.run.checkpointing import Checkpointer
from reasoning_rl.run.tracking import NullTracker
from reasoning_rl.training.finetune import (
    IGNORE_INDEX,
    FinetuneParams,
    TokenizedExample,
    collate,
    finetune,
    lr_multiplier,
    summed_token_loss,
    tokenize_examples,
)
from reasoning_rl.training.lora import LoraParams

TINY = ModelConfig(
    name="tiny",
    source=ModelSource.tiny,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    max_seq_len=64,
)


def test_collate_masks_prompt_and_padding():
    batch = [TokenizedExample([5, 6, 7, 8], prompt_len=2), TokenizedExample([9, 10, 11], prompt_len=1)]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    # row 0: prompt 5, 6 masked; targets 7, 8.  row 1: prompt 9 masked; targets 10, 11; pad masked.
    i = IGNORE_INDEX
    assert out["labels"].tolist() == [[i, i, 7, 8], [i, 10, 11, i]]


def test_tokenize_appends_eos_and_drops_long_examples():
    tok = build_tiny_tokenizer()
    data = tokenize_examples(tok, [("Q:", "12"), ("Q:" * 40, "1")], max_seq_len=10)
    assert len(data) == 1  # the 81-token example is dropped
    assert data[0].input_ids[-1] == tok.eos_token_id
    assert data[0].prompt_len == 2  # "Q" ":" -- one token per character
    with pytest.raises(ValueError, match="max_seq_len"):
        tokenize_examples(tok, [("Q:" * 40, "1")], max_seq_len=10)


def test_lr_schedule_by_hand():
    # 10 steps, 2 warm-up: 0.5, 1.0, then cosine from 1 down to 0.1 over the remaining 8.
    assert lr_multiplier(0, 10, 2, 0.1) == pytest.approx(0.5)
    assert lr_multiplier(1, 10, 2, 0.1) == pytest.approx(1.0)
    assert lr_multiplier(2, 10, 2, 0.1) == pytest.approx(1.0)  # progress 0: cos(0) = 1
    # step 6: progress 4/8 = 0.5 -> 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.1 + 0.45 = 0.55
    assert lr_multiplier(6, 10, 2, 0.1) == pytest.approx(0.55)
    assert lr_multiplier(10, 10, 2, 0.1) == pytest.approx(0.1)


def _finetune_copy(model, tok, examples, micro_batch_size: int, checkpointing: bool = False) -> torch.nn.Module:
    model = copy.deepcopy(model)
    params = FinetuneParams(
        lr=1e-2,
        epochs=1,
        batch_size=4,
        micro_batch_size=micro_batch_size,
        max_seq_len=64,
        seed=0,
        max_steps=1,
        warmup_ratio=0.0,
        grad_clip=1e9,
        gradient_checkpointing=checkpointing,
    )
    finetune(model, tok, examples, params, NullTracker(), progress=False)
    return model


def test_gradient_accumulation_matches_one_big_batch():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(TINY, len(tok), seed=0)
    # different lengths, so padding and the token-mean normalisation both matter
    examples = [("Q: 1+2\n", "1+2=3\n#### 3"), ("Q: 10+20\n", "#### 30"), ("Q:\n", "5"), ("Q: 7\n", "7*1=7\n#### 7")]
    one_batch = _finetune_copy(model, tok, examples, micro_batch_size=4)
    accumulated = _finetune_copy(model, tok, examples, micro_batch_size=1)
    for (name, a), (_, b) in zip(one_batch.named_parameters(), accumulated.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    # and the update did something
    moved = max((a - b).abs().max().item() for a, b in zip(one_batch.parameters(), model.parameters(), strict=True))
    assert moved > 1e-4


def test_finetune_lowers_the_loss_on_its_data():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(TINY, len(tok), seed=0)
    examples = [("Q:\n", "#### 42")] * 8
    params = FinetuneParams(lr=1e-2, epochs=50, batch_size=8, micro_batch_size=8, max_seq_len=64, seed=0)
    stats = finetune(model, tok, examples, params, NullTracker(), progress=False)
    assert stats["steps"] == 50
    assert stats["final_loss"] < 0.5  # a constant answer is memorised; the untrained loss is ~ln(100) = 4.6


def test_gradient_checkpointing_gives_the_same_update():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(TINY, len(tok), seed=0)
    examples = [("Q: 1+2\n", "1+2=3\n#### 3"), ("Q: 10+20\n", "#### 30"), ("Q:\n", "5"), ("Q: 7\n", "7*1=7\n#### 7")]
    plain = _finetune_copy(model, tok, examples, micro_batch_size=2)
    recomputed = _finetune_copy(model, tok, examples, micro_batch_size=2, checkpointing=True)
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in recomputed.modules())  # off after training


def test_loss_on_target_positions_equals_the_full_logits_loss():
    # summed_token_loss runs the output layer on target positions only; the reference takes the full (B, T, V)
    # logits and lets cross_entropy skip the ignored labels.
    tok = build_tiny_tokenizer()
    model = build_tiny_model(TINY, len(tok), seed=0)
    batch = collate(tokenize_examples(tok, [("Q: 1+2\n", "#### 3"), ("Q:\n", "12")], max_seq_len=64), tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), reduction="sum"
    )  # ignore_index defaults to -100 = IGNORE_INDEX
    torch.testing.assert_close(summed_token_loss(model, batch), expected)


class RecordingTracker(NullTracker):
    """Keeps every metric point it is given: the loop logs through the one Tracker interface."""

    def __init__(self) -> None:
        self.points: list[tuple[int | None, dict[str, float]]] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.points.append((step, dict(metrics)))


def test_each_step_uses_the_scheduled_learning_rate():
    # 4 examples in batches of 2 for 2 epochs: 4 steps; warmup_ratio 0.5: 2 warm-up steps. The rate of each step is
    # lr * 1/2, lr * 2/2, then the cosine from 1 at step 2 (progress 0/2) to step 3, progress 1/2:
    # 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55. With lr = 1e-2: 5e-3, 1e-2, 1e-2, 5.5e-3.
    tok = build_tiny_tokenizer()
    model = build_tiny_model(TINY, len(tok), seed=0)
    tracker = RecordingTracker()
    params = FinetuneParams(lr=1e-2, epochs=2, batch_size=2, micro_batch_size=2, max_seq_len=64, seed=0,
                            warmup_ratio=0.5, log_every=1)  # fmt: skip
    finetune(model, tok, [("Q:\n", "#### 1"), ("Q:\n", "#### 22"), ("Q: 3\n", "3"), ("Q:\n", "4")], params, tracker,
             progress=False)  # fmt: skip
    assert [step for step, _ in tracker.points] == [1, 2, 3, 4]
    assert [m["train/sft_lr"] for _, m in tracker.points] == pytest.approx([5e-3, 1e-2, 1e-2, 5.5e-3])


def test_gradient_clipping_bounds_the_update():
    # AdamW's first step moves a weight by lr * g / (|g| + eps) (the bias-corrected moments are g and g^2). Unclipped,
    # |g| >> eps = 1e-8 and the step is about lr = 1e-2 wherever g != 0. Clipped to a total norm of 1e-12, every
    # |g| <= 1e-12 and no step exceeds lr * 1e-12 / 1e-8 = 1e-6.
    tok = build_tiny_tokenizer()
    model = build_tiny_model(TINY, len(tok), seed=0)
    examples = [("Q: 1+2\n", "1+2=3\n#### 3"), ("Q:\n", "5")]

    def largest_step(grad_clip: float) -> float:
        trained = copy.deepcopy(model)
        params = FinetuneParams(lr=1e-2, epochs=1, batch_size=2, micro_batch_size=2, max_seq_len=64, seed=0,
                                warmup_ratio=0.0, grad_clip=grad_clip)  # fmt: skip
        finetune(trained, tok, examples, params, NullTracker(), progress=False)
        return max((a - b).abs().max().item() for a, b in zip(trained.parameters(), model.parameters(), strict=True))

    assert largest_step(1e9) == pytest.approx(1e-2, rel=1e-3)
    assert largest_step(1e-12) <= 1e-6


def test_each_epoch_visits_every_example_once_in_a_seeded_order():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(TINY, len(tok), seed=0)
    examples = [(f"Q{i}:\n", f"#### {i}") for i in range(4)]

    def batches(seed: int) -> list[list[str]]:
        """The examples of each step, by their text (4 steps: 2 epochs of 2 batches of 2)."""
        seen = []

        def loss(model, batch):
            rows = [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
            seen.append(sorted(tok.decode(ids).split(":")[0] for ids in rows))
            return 0.0 * next(model.parameters()).sum()  # the order is under test, not the update: skip the forward

        params = FinetuneParams(lr=1e-3, epochs=2, batch_size=2, micro_batch_size=2, max_seq_len=64, seed=seed,
                                pack_sequences=False)  # fmt: skip
        finetune(copy.deepcopy(model), tok, examples, params, NullTracker(), progress=False, loss_fn=loss)
        return seen

    orders = [batches(seed) for seed in range(4)]
    for seen in orders:
        assert sorted(seen[0] + seen[1]) == sorted(seen[2] + seen[3]) == ["Q0", "Q1", "Q2", "Q3"]
    assert len({str(seen) for seen in orders}) > 1  # the order follows the seed ...
    assert batches(2) == orders[2]  # ... and nothing else


class Killed(Exception):
    """Stands in for SIGKILL inside one process: the loop stops mid-way and its in-memory state is dropped."""


@pytest.mark.parametrize(
    ("adapters", "compute_dtype"),
    [(None, torch.float32), (LoraParams(rank=4, alpha=8.0, dropout=0.1), torch.float32), (None, torch.bfloat16),
     (None, torch.float16)],
    ids=["full", "lora", "bf16", "fp16"],
)  # fmt: skip
def test_finetune_killed_mid_way_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, adapters, compute_dtype):
    tok = build_tiny_tokenizer()
    init = build_tiny_model(TINY, len(tok), seed=0)
    examples = [("Q: 1+2\n", "1+2=3\n#### 3"), ("Q: 10+20\n", "#### 30"), ("Q:\n", "5"), ("Q: 7\n", "7*1=7\n#### 7")]
    params = FinetuneParams(lr=1e-2, epochs=6, batch_size=3, micro_batch_size=3, max_seq_len=64, seed=0,
                            lora=adapters, compute_dtype=compute_dtype)  # fmt: skip

    def run(checkpoints=None, kill_at_call=None):
        calls = 0

        def loss(model, batch):
            nonlocal calls
            calls += 1
            if calls == kill_at_call:
                raise Killed
            return summed_token_loss(model, batch)

        model = copy.deepcopy(init)
        torch.manual_seed(1)
        stats = finetune(model, tok, examples, params, NullTracker(), progress=False, loss_fn=loss,
                         checkpoints=checkpoints, checkpoint_every=2)  # fmt: skip
        return model, {**stats, "steps run": calls}

    reference, reference_stats = run()
    with pytest.raises(Killed):  # in step 4 (one call per step): the checkpoint after step 2 is the latest
        run(Checkpointer(tmp_path, 0, restore=True), kill_at_call=4)
    assert [p.name for p in tmp_path.glob("ckpt-*")] == ["ckpt-000002"] and reference_stats["steps"] == 6
    resumed, resumed_stats = run(Checkpointer(tmp_path, 0, restore=True))
    assert resumed_stats.pop("steps run") == 4 and reference_stats.pop("steps run") == 6  # steps 3-6 only
    for (name, a), (_, b) in zip(reference.named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert resumed_stats == reference_stats  # the losses of the steps before the kill came back with the checkpoint
