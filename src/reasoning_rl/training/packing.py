"""Sequence packing for fine-tuning: a micro-batch as one row of concatenated sequences, no padding.

Right-padding a micro-batch to its longest sequence makes every linear layer work on the padding too: on 16 sorted
GSM8K examples in micro-batches of 4, 17% of the padded tokens were padding. Packing puts the sequences end to end
in one (1, N) row, N the real token count, and keeps them apart in attention only: position ids restart at 0 for
each sequence (so RoPE sees each one as if alone), and attention runs causally over each sequence's span on its own
(``varlen_attention``), never over the whole row with a block-diagonal mask, which would cost O(N^2) instead of
sum(n_i^2). This is what flash-attention's varlen kernels do on GPUs; CPUs have no such kernel, so each span goes
through SDPA in turn (a few spans per row).

The model reaches ``varlen_attention`` through transformers' attention registry: :func:`packed_attention` switches
a model to it for one micro-batch's forward and backward passes (then back), and the span boundaries travel with
the forward call as transformers' flash-attention keyword arguments (``cu_seq_lens_q`` / ``cu_seq_lens_k``), which
every decoder layer passes on to its attention function.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

VARLEN_ATTENTION = "reasoning_rl_varlen"  # the name our attention function is registered under in transformers


class PackableExample(Protocol):
    input_ids: list[int]  # prompt + completion + EOS
    prompt_len: int  # the first prompt_len tokens carry no loss


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (1, H, N, D): the packed row's queries
    key: torch.Tensor,  # (1, H_kv, N, D)
    value: torch.Tensor,  # (1, H_kv, N, D)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each span ``cu_seq_lens_q[i]:cu_seq_lens_q[i+1]`` of a packed row; (1, N, H, D)."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1 or attention_mask is not None:
        raise ValueError(
            f"{VARLEN_ATTENTION} attention needs one packed row and its span boundaries (cu_seq_lens_q), with no "
            "attention mask; call the model on reasoning_rl.training.packing.collate_packed output, or leave "
            "packed_attention"
        )
    spans = torch.diff(bounds).tolist()
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
        )  # (1, H, n_i, D)
        for q, k, v in zip(query.split(spans, 2), key.split(spans, 2), value.split(spans, 2), strict=True)
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None  # (1, N, H, D)


def _no_mask(*args: object, **kwargs: object) -> None:
    """The mask for ``varlen_attention``: none (the spans replace it), so transformers builds no (N, N) mask."""
    return None


AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_ATTENTION, _no_mask)


@contextmanager
def packed_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model``'s attention span by span (packed rows) inside the block; its own implementation after it.

    ``model`` is a transformers PreTrainedModel (the causal LM, possibly with LoRA adapters injected in place) or a
    module holding one (the ORM: its ``lm`` and a head); the outermost transformers model is switched.
    """
    lm = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if lm is None:
        raise TypeError(
            f"packed_attention needs a transformers PreTrainedModel, or a module holding one; {type(model).__name__} "
            "holds none. Fine-tune it on padded batches: FinetuneParams(pack_sequences=False)"
        )
    previous = lm.config._attn_implementation
    lm.set_attn_implementation(VARLEN_ATTENTION)
    try:
        yield
    finally:
        lm.set_attn_implementation(previous)


def collate_packed(batch: Sequence[PackableExample], ignore_index: int) -> dict[str, torch.Tensor]:
    """Sequences end to end in one row: input_ids, position_ids and labels (1, N), span boundaries (S+1,); ORM
    examples (with an ``outcome``) add ``outcomes`` (1, N), each token's sequence's outcome.

    Labels are ``ignore_index`` on each sequence's prompt and on its first token: the last token of one sequence
    must not be trained to predict the first token of the next.
    """
    input_ids = torch.tensor([t for ex in batch for t in ex.input_ids], dtype=torch.long)[None]  # (1, N)
    position_ids = torch.cat([torch.arange(len(ex.input_ids)) for ex in batch])[None]  # (1, N)
    labels = torch.full_like(input_ids, ignore_index)  # (1, N)
    bounds = [0]
    for ex in batch:
        start, n = bounds[-1], len(ex.input_ids)
        first_target = start + max(ex.prompt_len, 1)
        labels[0, first_target : start + n] = input_ids[0, first_target : start + n]
        bounds.append(start + n)
    cu_seq_lens = torch.tensor(bounds, dtype=torch.int32)  # (S+1,)
    packed = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "cu_seq_lens": cu_seq_lens}
    if getattr(batch[0], "outcome", None) is not None:
        outcomes = torch.tensor([ex.outcome for ex in batch], dtype=torch.float32)  # (S,)
        packed["outcomes"] = outcomes.repeat_interleave(torch.diff(cu_seq_lens))[None]  # (1, N)
    return packed


def forward_kwargs(batch: dict[str, torch.Tensor]) -> dict[str, object]:
    """The decoder's keyword arguments for a batch: a :func:`collate_packed` row (call the model inside
    :func:`packed_attention`) or a padded batch (input ids and attention mask)."""
    if "cu_seq_lens" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    bounds = batch["cu_seq_lens"]
    longest = int(torch.diff(bounds).max())
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "cu_seq_lens_q": bounds,
            "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}  # fmt: skip
