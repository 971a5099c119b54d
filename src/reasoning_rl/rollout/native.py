"""Batched sampling with a KV cache: greedy (temperature 0) or temperature + nucleus (top-p) sampling.

Our own decoding loop rather than ``model.generate``, because RL needs per-token log-probs, per-sequence stop
strings and finish reasons, and a sampler we can make faster without fighting generate's generality:

1. Tokenize every prompt once (with the tokenizer's default special tokens, e.g. Llama's BOS, as training does).
2. Sort prompts by length (longest first, so an out-of-memory shows up in the first batch) and lay out their
   ``num_samples`` copies next to each other; cut that list into batches of ``batch_size`` sequences. Sorting
   keeps left padding short, and the copies of a prompt share one prefill: we run the forward pass on the
   distinct prompts of a batch only and repeat their KV-cache rows.
3. Prefill the left-padded prompts with an attention mask and position ids that start at 0 at each prompt's
   first real token, keeping only the last position's logits (the full (B, T, V) logits would not fit).
4. Decode one token per step with the cache (written in place into a buffer sized for prompt + completion, see
   :class:`~reasoning_rl.rollout.kv_cache.BufferedLayer`). A sequence stops at an EOS token (the tokenizer's and
   any the model's generation config lists), when its decoded completion contains a stop string (checked on a
   short decoded tail, so the check costs O(1) per step), or at ``max_new_tokens``. Finished rows are dropped from
   the batch (cache included) once enough of them accumulate, and the batch ends when every row has stopped. Texts
   are decoded with ``skip_special_tokens=True``. Steps 3 and 4 are :class:`~reasoning_rl.rollout.decoder.Decoder`;
   each token is drawn by :func:`~reasoning_rl.rollout.next_token.sample_next_token`.

Plain Llama stacks of width >= ``FAST_MIN_HIDDEN`` (SmolLM2, Llama-2) take the fast path of
:mod:`reasoning_rl.rollout.continuous` instead of steps 2-4: one shared prefix cache per prompt and continuous batching.
Both paths give the same greedy tokens and the same distributions (tests/test_rollout_fast.py); ``fast=True`` or
``fast=False`` forces one.

Log-probs are those of the model's untempered distribution, ``log_softmax(logits)``, whatever the temperature and
top-p: that is the policy PPO optimises and the one it recomputes itself. Randomness comes from one
``torch.Generator`` seeded with ``seed``: the same call with the same seed (and batch size) gives the same samples.
Prompts too long for the model's context (``max_position_embeddings``) keep their last tokens, with a warning.

In a run whose compute dtype is not float32 (``model.dtype``), the native sampler is a :class:`CastSampler`: it
samples from a copy of the policy cast to the compute dtype, made again whenever the policy's weights change.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reasoning_rl.rollout.continuous import ContinuousBatcher, supports_fast_path
from reasoning_rl.rollout.decoder import Decoder
from reasoning_rl.rollout.sampler import Sample, SamplingParams, eos_token_ids, fit_prompts, weights_signature

# Narrower models take the plain path by default: their operations are so small that Python overhead decides, and
# the plain path makes fewer, fused calls (measured on the 128-wide tiny model, 64 prompts x 4 samples x 48 tokens,
# one thread: plain 11.4 s, fast 15.2 s). SmolLM2 is 576 wide.
FAST_MIN_HIDDEN = 256


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    params: SamplingParams,
    *,
    num_samples: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    progress: str | None = None,
    fast: bool | None = None,
) -> list[list[Sample]]:
    """For each prompt, its ``num_samples`` completions (see the module docstring for how).

    ``fast=True`` uses :mod:`reasoning_rl.rollout.continuous` (shared-prefix attention, continuous batching) when the
    model is a plain Llama stack; ``fast=False``, or any other architecture, takes the plain batched path below;
    ``None`` picks the fast path for Llama stacks at least ``FAST_MIN_HIDDEN`` wide.
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    prompt_ids = fit_prompts(
        tokenizer(list(prompts)).input_ids,
        getattr(model.config, "max_position_embeddings", None),
        params.max_new_tokens,
    )
    order = sorted(range(len(prompts)), key=lambda i: -len(prompt_ids[i]))
    rows = [(i, j) for i in order for j in range(num_samples)]  # (prompt index, sample index), copies adjacent
    results: list[list[Sample | None]] = [[None] * num_samples for _ in prompts]
    decoder = Decoder(model, tokenizer, params, eos_token_ids(model, tokenizer), device, seed)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(rows), desc=progress, disable=progress is None) as bar:
            if fast is None:
                fast = getattr(model.config, "hidden_size", 0) >= FAST_MIN_HIDDEN
            if fast and supports_fast_path(model):
                samples = ContinuousBatcher(decoder, prompt_ids, rows, batch_size).run(bar)
                for (i, j), sample in zip(rows, samples, strict=True):
                    results[i][j] = sample
                return results  # type: ignore[return-value]
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                for (i, j), sample in zip(batch, decoder.run([prompt_ids[i] for i, _ in batch], bar), strict=True):
                    results[i][j] = sample
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


class CastSampler:
    """:func:`generate` from a copy of the policy in ``dtype`` (the run's bf16 or fp16 compute dtype), for a policy
    whose float32 weights are the trainer's master copy.

    Why a copy rather than autocast: the fast path's fused kernels and KV buffers take one dtype, and autocast
    mixes float32 weights with bf16 activations (they fail on it). The copy costs half the policy's memory in bf16
    and one cast per weight update; it is made again whenever :func:`weights_signature` changes (an optimizer step
    writes the parameters in place, a new model object replaces them), so every call samples the current policy.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.copy: PreTrainedModel | None = None
        self.signature: tuple[int, tuple[tuple[int, int], ...]] | None = None

    def __call__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        params: SamplingParams,
        **kwargs: object,
    ) -> list[list[Sample]]:
        signature = weights_signature(model)
        if self.copy is None or signature != self.signature:
            self.copy = None  # the old copy's memory is free before the new one is made
            self.copy = copy.deepcopy(model).to(self.dtype).eval().requires_grad_(False)
            self.signature = signature
        return generate(self.copy, tokenizer, prompts, params, **kwargs)  # type: ignore[arg-type]
