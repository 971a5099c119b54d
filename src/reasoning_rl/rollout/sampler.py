"""What every rollout engine is: the ``generate`` contract (prompts in; token ids, text, per-token log-probs and a
finish reason out), and the helpers every engine shares (EOS ids, prompt fitting, completion text, weight
signatures). Engines: :mod:`reasoning_rl.rollout.native` (ours) and :mod:`reasoning_rl.rollout.vllm_engine`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (deterministic)
    top_p: float = 1.0  # nucleus sampling: sample from the smallest set of tokens with this much probability mass
    max_new_tokens: int = 256  # completion length limit
    stop_strings: tuple[str, ...] = ()  # a sequence stops when its decoded completion contains one
    banned_token_ids: tuple[int, ...] = ()  # never sampled: their logits are set to -inf (RCRL's [BAD] goal token)

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError(f"need temperature >= 0, top_p in (0, 1] and max_new_tokens >= 1, got {self}.")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop_strings must not contain the empty string.")


@dataclass
class Sample:
    token_ids: list[int]  # generated tokens, up to and including EOS or the token that completed a stop string
    text: str  # decoded completion, cut before the stop string; no EOS text (special tokens are skipped)
    logprobs: list[float]  # per generated token: log-prob under the untempered log_softmax(logits)
    finish_reason: str  # "eos" | "stop" | "length"


class Sampler(Protocol):
    """What every sampling engine is: :func:`~reasoning_rl.rollout.native.generate` (``rollout=native``) or a
    :class:`~reasoning_rl.rollout.vllm_engine.VLLMSampler` (``rollout=vllm``). Algorithms call ``ctx.sampler``."""

    def __call__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        params: SamplingParams,
        *,
        num_samples: int = 1,
        seed: int = 0,
        batch_size: int = 32,
        progress: str | None = None,
    ) -> list[list[Sample]]: ...


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The tokenizer's EOS plus any the generation config lists (chat models often end turns with their own)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return frozenset(i for i in ids if i is not None)


def fit_prompts(prompt_ids: list[list[int]], max_positions: int | None, max_new_tokens: int) -> list[list[int]]:
    """Keep the last ``max_positions - max_new_tokens`` tokens of prompts that would overflow the context."""
    if any(not ids for ids in prompt_ids):
        raise ValueError("an empty prompt has no token to condition on; give every prompt some text.")
    if max_positions is None:
        return prompt_ids
    budget = max_positions - max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {max_positions} positions.")
    too_long = sum(len(ids) > budget for ids in prompt_ids)
    if too_long:
        log.warning("%d prompt(s) longer than %d tokens were cut from the left to fit the context", too_long, budget)
    return [ids[-budget:] for ids in prompt_ids]


def weights_signature(model: torch.nn.Module) -> tuple[int, tuple[tuple[int, int], ...]]:
    """Changes whenever the model's weights may have: another model object, another parameter storage, or an
    in-place write to a parameter (each bumps its tensor's version counter).

    Not every in-place write does: torch's fused AdamW (``fused=True``) updates the weights without bumping their
    counters (checked with torch 2.13), and a sampler keyed on this signature then kept serving the old weights (a
    vLLM run's second step sampled from its first step's weights). The training loops use the default AdamW; a
    fused optimizer would need ``torch.autograd.graph.increment_version`` on its parameters after each step."""
    return id(model), tuple((p.data_ptr(), p._version) for p in model.parameters())


def completion_text(
    tokenizer: PreTrainedTokenizerBase, token_ids: list[int], finish_reason: str, stop_strings: Sequence[str]
) -> str:
    """A sample's text: its tokens decoded without special tokens (and without the EOS it ended with), cut before
    the earliest stop string. Every engine's samples get their text this way."""
    content = token_ids[:-1] if finish_reason == "eos" else token_ids
    text = tokenizer.decode(content, skip_special_tokens=True)
    cut = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return text[: min(cut)] if cut else text
