"""Supervised fine-tuning: cross-entropy on solution tokens only.

Used for ``init=sft`` (fine-tune the base model on the task's reference solutions, the paper's SFT
initialisation), by Expert Iteration, which fine-tunes on its filtered samples each round, and by RCRL; the ORM
trains with the same loop and its own loss (``loss_fn``).

Optimiser: AdamW, linear warm-up then cosine decay to ``lr * min_lr_ratio``, gradient accumulation over
micro-batches, gradient-norm clipping. The loss of a batch is the mean over all of its target tokens (not the mean
of micro-batch means), so one batch of 4 and four accumulated micro-batches of 1 give the same update.

Mixed precision (``compute_dtype``, training/precision.py): the forward pass runs under autocast, the weights
and AdamW's moments stay float32; float16 adds dynamic loss scaling.

Given a :class:`~reasoning_rl.run.checkpointing.Checkpointer`, :func:`finetune` saves its whole state (weights, AdamW's
moments, the schedule, the data order and the RNGs) every ``checkpoint_every`` steps and, called again after a kill,
continues from the last one to the same weights an uninterrupted run reaches (the SFT stage, ``launch/pipeline.py``).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reasoning_rl.config import ConfigError
from reasoning_rl.run.checkpointing import Checkpointer
from reasoning_rl.run.tracking import Tracker
from reasoning_rl.training.distributed import SINGLE, DataParallel
from reasoning_rl.training.lora import LoraParams, attach_adapters, merge_adapters
from reasoning_rl.training.packing import collate_packed, forward_kwargs, packed_attention
from reasoning_rl.training.precision import Precision
from reasoning_rl.training.sharding import (
    full_optimizer_state,
    gather_weights,
    is_sharded,
    load_full_optimizer_state,
    sharded_copy,
)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that cross_entropy skips: prompt and padding positions


@dataclass(frozen=True)
class FinetuneParams:
    lr: float  # peak learning rate
    epochs: float  # passes over the examples (fractions allowed)
    batch_size: int  # sequences per optimizer step
    micro_batch_size: int  # sequences per forward/backward
    max_seq_len: int  # longer examples are dropped (counted in the log)
    seed: int  # shuffling order
    max_steps: int | None = None  # cap on optimizer steps
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 10  # optimizer steps between train/ metric logs
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% more time
    lora: LoraParams | None = None  # train LoRA adapters (merged into the weights at the end), not every weight
    pack_sequences: bool = True  # a micro-batch as one row of its sequences end to end, no padding (packing.py)
    compute_dtype: torch.dtype = torch.float32  # the forward pass autocasts to it; the weights stay float32
    shard: bool = False  # with several processes: train an FSDP2-sharded copy (training/sharding.py)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]  # prompt tokens + completion tokens + EOS
    prompt_len: int  # the first prompt_len tokens carry no loss
    outcome: float | None = None  # the ORM's target for every completion token (1 = correct final answer)


# (prompt, completion) for cross-entropy; (prompt, completion, outcome) for the ORM's binary cross-entropy
Example = tuple[str, str] | tuple[str, str, float]


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_seq_len: int
) -> list[TokenizedExample]:
    """(prompt, completion[, outcome]) -> token ids with EOS appended; examples longer than max_seq_len are dropped.

    Prompt and completion are tokenized separately, exactly as the sampler sees them (the prompt with the
    tokenizer's default special tokens, e.g. Llama's BOS, then generated tokens), so training and sampling agree on
    the token boundary.
    """
    tokenized, dropped = [], 0
    for prompt, completion, *outcome in examples:
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = prompt_ids + completion_ids
        if len(ids) > max_seq_len:
            dropped += 1
            continue
        tokenized.append(TokenizedExample(ids, len(prompt_ids), outcome[0] if outcome else None))
    if dropped:
        log.warning("dropped %d of %d examples longer than max_seq_len=%d", dropped, len(examples), max_seq_len)
    if not tokenized:
        raise ConfigError(
            f"all {len(examples)} training examples are longer than model.max_seq_len={max_seq_len} tokens (prompt "
            "and completion); raise model.max_seq_len, or shorten the prompts (fewer exemplars: init.n_shots)."
        )
    return tokenized


def collate(batch: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; labels are IGNORE_INDEX on prompt and padding positions; ORM examples add outcomes."""
    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, ex.prompt_len : n] = input_ids[row, ex.prompt_len : n]
        attention_mask[row, :n] = 1
    collated = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if batch[0].outcome is not None:
        collated["outcomes"] = torch.tensor([ex.outcome for ex in batch], dtype=torch.float32)  # (B,)
    return collated


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up over warmup_steps, then cosine decay from 1 to min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def summed_token_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over target tokens (the caller divides by the whole batch's token count).

    The output layer runs on the target positions only: prompt and padding positions need no logits, and with a
    49k-token vocabulary the (B, T, V) logits and their gradient were a large share of a step's memory traffic.
    A packed batch (:func:`~reasoning_rl.training.packing.collate_packed`, one row of B sequences, inside
    :func:`~reasoning_rl.training.packing.packed_attention`) gives the same sum as the padded one (:func:`collate`).
    """
    shift_labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    target = shift_labels != IGNORE_INDEX  # (B, T-1)
    inputs = forward_kwargs(batch)
    head, decoder = model.get_output_embeddings(), getattr(model, "get_decoder", lambda: None)()
    # a sharded model gathers its root unit's weights (embeddings, LM head) in its own forward only
    if head is None or decoder is None or getattr(model.config, "final_logit_softcapping", None) or is_sharded(model):
        logits = model(**inputs).logits  # (B, T, V)
        target_logits = logits[:, :-1][target]  # (N, V)
    else:
        hidden = decoder(**inputs).last_hidden_state  # (B, T, H)
        target_logits = head(hidden[:, :-1][target])  # (N, V): hidden at the N target positions
    return torch.nn.functional.cross_entropy(target_logits.float(), shift_labels[target], reduction="sum")


def finetune(
    model: torch.nn.Module,  # a causal LM, or the ORM
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    params: FinetuneParams,
    tracker: Tracker,
    *,
    metric_prefix: str = "sft",
    step_offset: int = 0,
    progress: bool = True,
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] = summed_token_loss,
    checkpoints: Checkpointer | None = None,
    checkpoint_every: int = 0,
    data_parallel: DataParallel = SINGLE,
) -> dict[str, float]:
    """Fine-tune ``model`` in place on (prompt, completion) pairs; returns summary statistics.

    ``data_parallel``: every rank calls this with the same examples; each computes its shard of every batch and the
    gradients are summed over the ranks (reasoning_rl/training/distributed.py), so all take the one-process step.
    With ``params.shard`` the ranks train an FSDP2-sharded copy instead, whose weights are gathered back into
    ``model`` at the end (reasoning_rl/training/sharding.py): the same step, 1/N of the training state per rank.

    ``loss_fn(model, batch)`` returns the loss summed over the batch's target tokens (the completion tokens and
    EOS): next-token cross-entropy by default, the ORM's binary cross-entropy for (prompt, completion, outcome).
    With ``checkpoints``, the loop starts from their latest checkpoint when there is one, and saves one every
    ``checkpoint_every`` optimizer steps (0: never); the caller deletes them once the result is safe.
    """
    data = tokenize_examples(tokenizer, examples, params.max_seq_len)
    device = next(model.parameters()).device
    steps_per_epoch = max(1, len(data) // params.batch_size)
    total_steps = max(1, round(params.epochs * steps_per_epoch))
    if params.max_steps is not None:
        total_steps = min(total_steps, params.max_steps)
    warmup_steps = max(1, round(params.warmup_ratio * total_steps))
    if params.lora is not None:
        attach_adapters(model, params.lora)
        # each rank drew its own random A matrices (the ranks' RNGs part when rank 0 builds a stage alone)
        data_parallel.broadcast_parameters(p for p in model.parameters() if p.requires_grad)
    precision = Precision.of(model, params.compute_dtype)
    checkpointing = params.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False)
    if checkpointing:  # transformers 5 renamed gradient to activation checkpointing
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rng = random.Random(params.seed)
    order: list[int] = []
    losses: list[float] = []
    first_step = 0
    saved = checkpoints.restore() if checkpoints is not None else None
    if saved is not None:  # a killed run: continue exactly where its last checkpoint left off (weights first: a
        saved.load_modules(model=model)  # sharded copy is made from them)
        version, internal, gauss = saved.data["data_rng"]
        rng.setstate((version, tuple(internal), gauss))
        order, losses, first_step = saved.data["order"], saved.data["losses"], saved.step
        log.info("%s fine-tune: resuming after step %d of %d", metric_prefix, first_step, total_steps)
    sharding = params.shard and data_parallel.active
    with sharded_copy(model, data_parallel, params.compute_dtype) if sharding else nullcontext(model) as trained:
        trainable = [p for p in trained.parameters() if p.requires_grad]
        if any(p.dtype != torch.float32 for p in trainable):  # AdamW's ~lr-sized steps round away in bf16 weights
            raise ValueError(f"{metric_prefix} fine-tune: the trained weights must be float32 (the master copy); "
                             f"compute in {params.compute_dtype} through params.compute_dtype instead.")  # fmt: skip
        optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
        scaler = precision.grad_scaler()
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_multiplier(s, total_steps, warmup_steps, params.min_lr_ratio)
        )
        if saved is not None:
            load_full_optimizer_state(trained, optimizer, saved.data["optimizer"])
            scheduler.load_state_dict(saved.data["scheduler"])
            if saved.data.get("grad_scaler"):  # empty for float32 and bf16: the scaler is off
                scaler.load_state_dict(saved.data["grad_scaler"])
        trained.train()
        bar = tqdm(
            range(first_step, total_steps),
            desc=f"{metric_prefix} fine-tune",
            initial=first_step,
            total=total_steps,
            disable=not progress,
            dynamic_ncols=True,
        )
        for step in bar:
            # 1. draw the next batch (reshuffle at each epoch boundary)
            if len(order) < params.batch_size:
                order += rng.sample(range(len(data)), len(data))
            b_indices, order = order[: params.batch_size], order[params.batch_size :]
            # sorted by length, so each micro-batch pads to a similar length (when not packed); the update is the
            # same sum of token losses
            b_examples = sorted((data[i] for i in b_indices), key=lambda ex: len(ex.input_ids))
            # targets are tokens prompt_len..n-1 (the first token of a sequence is never predicted)
            num_target_tokens = sum(len(ex.input_ids) - max(ex.prompt_len, 1) for ex in b_examples)
            # 2. accumulate gradients over micro-batches (of this rank's shard of the batch); each micro-batch loss
            #    is divided by the whole batch's target-token count so the sum over micro-batches (and ranks) is
            #    the batch's token-mean loss
            rank_examples = data_parallel.shard(b_examples)
            batch_loss = 0.0
            for start in range(0, len(rank_examples), params.micro_batch_size):
                mb_examples = rank_examples[start : start + params.micro_batch_size]
                if params.pack_sequences:
                    mb = collate_packed(mb_examples, IGNORE_INDEX)
                else:
                    mb = collate(mb_examples, tokenizer.pad_token_id)
                mb = {k: v.to(device) for k, v in mb.items()}
                # the backward pass stays inside: gradient checkpointing runs the attention again there
                with packed_attention(trained) if params.pack_sequences else nullcontext():
                    with precision.autocast():
                        mb_loss_sum = loss_fn(trained, mb)
                    scaler.scale(mb_loss_sum / max(1, num_target_tokens)).backward()
                batch_loss += mb_loss_sum.item()
            if not sharding:  # FSDP2's reduce-scatter summed them in the backward pass
                data_parallel.sum_gradients(trainable)
            batch_loss = data_parallel.sum(batch_loss)
            # 3. clip, step, schedule (float16: the scaler unscales the gradients first, and skips a step that
            #    overflowed)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, params.grad_clip)
            if isinstance(grad_norm, DTensor):  # the norm of sharded gradients: the same value on every rank
                grad_norm = grad_norm.full_tensor()
            step_lr = scheduler.get_last_lr()[0]  # the rate this step uses (after scheduler.step(), the next step's)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss / max(1, num_target_tokens)
            if not math.isfinite(loss):
                raise FloatingPointError(f"{metric_prefix} loss became {loss} at step {step}; lower the learning rate.")
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.3f}")
            if (step + 1) % params.log_every == 0 or step + 1 == total_steps:
                tracker.log_metrics(
                    {
                        f"train/{metric_prefix}_loss": loss,
                        f"train/{metric_prefix}_lr": step_lr,
                        f"train/{metric_prefix}_grad_norm": float(grad_norm),
                    },
                    step=step_offset + step + 1,
                )
            # 4. checkpoint (not after the last step: the caller saves the result itself)
            due = checkpoint_every > 0 and (step + 1) % checkpoint_every == 0 and step + 1 < total_steps
            if checkpoints is not None and due:
                if sharding:  # whole tensors, as an unsharded run writes them: the weights into model, to be saved
                    gather_weights(trained, model)
                state = {"optimizer": full_optimizer_state(trained, optimizer), "scheduler": scheduler.state_dict(),
                         "grad_scaler": scaler.state_dict(), "data_rng": rng.getstate(), "order": order,
                         "losses": losses}  # fmt: skip
                checkpoints.save(step + 1, state, {"model": model})
    if checkpointing:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
    if params.lora is not None:
        merge_adapters(model)
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return {"steps": float(total_steps), "examples": float(len(data)), "final_loss": sum(tail) / len(tail)}
