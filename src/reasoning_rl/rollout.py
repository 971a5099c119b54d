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
   :class:`BufferedLayer`). A sequence stops at an EOS token (the tokenizer's and any the model's generation
   config lists), when its decoded completion contains a stop string (checked on a short decoded tail, so the
   check costs O(1) per step), or at ``max_new_tokens``. Finished rows are dropped from the batch (cache
   included) once enough of them accumulate, and the batch ends when every row has stopped. Texts are decoded
   with ``skip_special_tokens=True``.

Plain Llama stacks of width >= ``FAST_MIN_HIDDEN`` (SmolLM2, Llama-2) take the fast path of
:mod:`reasoning_rl.rollout_fast` instead of steps 2-4: one shared prefix cache per prompt and continuous batching.
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
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicLayer

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
    """What every sampling engine is: :func:`generate` (``rollout=native``) or a
    :class:`~reasoning_rl.rollout_vllm.VLLMSampler` (``rollout=vllm``). Algorithms call ``ctx.sampler``."""

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


# Narrower models take the plain path by default: their operations are so small that Python overhead decides, and
# the plain path makes fewer, fused calls (measured on the 128-wide tiny model, 64 prompts x 4 samples x 48 tokens,
# one thread: plain 11.4 s, fast 15.2 s). SmolLM2 is 576 wide.
FAST_MIN_HIDDEN = 256

# A batch is dropped to its unfinished rows once this fraction of them has finished: pruning copies the whole KV
# cache, so doing it for every single finished row would cost more than the compute it saves.
PRUNE_FRACTION = 0.25


def sample_next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row: argmax when temperature is 0, else a draw from softmax(logits / T) cut to the nucleus.

    The nucleus keeps a token when the probability mass ranked above it is below ``top_p``: the smallest set of
    most likely tokens whose mass reaches ``top_p`` (Holtzman et al. 2020); the top token is always kept.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    if top_p >= 1 and logits.shape[-1] > MULTINOMIAL_MAX_VOCAB:
        # exp((logits - max) / T), proportional to softmax(logits / T), built in one buffer: on CPU every fresh
        # (B, V) tensor costs page faults (glibc hands large blocks back to the OS when they are freed), and the
        # softmax's divide, normalise and pad passes each made one; this took 32 of the 65 ms a 128-row step
        # spent sampling from SmolLM2's 49,152 tokens.
        weights = logits.float() - logits.amax(dim=-1, keepdim=True)  # (B, V)
        return inverse_cdf_sample(weights.div_(temperature).exp_(), generator)  # (B,)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p >= 1:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)  # (B, V)
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V)
    sorted_probs = sorted_probs.masked_fill(mass_above >= top_p, 0.0)  # the draw renormalises
    if probs.shape[-1] <= MULTINOMIAL_MAX_VOCAB:
        choice = torch.multinomial(sorted_probs, 1, generator=generator).squeeze(-1)  # (B,)
    else:
        choice = inverse_cdf_sample(sorted_probs, generator)  # (B,)
    return sorted_ids.gather(-1, choice[:, None]).squeeze(-1)  # (B,)


def chosen_logprob(logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[token] per row, (B, V), (B,) -> (B,), without writing the (B, V) log_softmax."""
    logits = logits.float()
    return logits.gather(-1, token[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


SAMPLE_BLOCK = 256  # tokens per block of the two-level inverse-CDF draw
# Below this vocabulary size one torch.multinomial call is cheaper than the dozen small ops of the inverse-CDF draw.
MULTINOMIAL_MAX_VOCAB = 4096


def inverse_cdf_sample(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row, drawn with probability proportional to ``weights`` (B, V), from one uniform per row.

    ``torch.multinomial`` took ~100 ms per step for 32 rows of SmolLM2's 49,152-token vocabulary here (drawing an
    exponential per token costs as much). Inverse CDF needs one uniform u per row: the index whose cumulative
    weight interval holds u * total. It is done in two levels (which block of 256 tokens, then which token in it),
    with the cumulative sums in float64 (each block's own sum of 256 weights in float32, relative error ~1e-7);
    a zero-weight index is never drawn.
    """
    b, v = weights.shape
    pad = -v % SAMPLE_BLOCK
    blocks = (torch.nn.functional.pad(weights, (0, pad)) if pad else weights).view(b, -1, SAMPLE_BLOCK)  # (B, NB, 256)
    block_mass = blocks.sum(-1).double()  # (B, NB); summing in float64 took 27 ms at 128 x 49,152, float32 2 ms
    cdf = block_mass.cumsum(-1)  # (B, NB)
    u = torch.rand(b, 1, generator=generator, dtype=torch.float64, device=weights.device) * cdf[:, -1:]  # (B, 1)
    block = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[1] - 1)  # (B, 1)
    within = u - (cdf.gather(-1, block) - block_mass.gather(-1, block))  # (B, 1): mass into the chosen block
    inner = blocks.gather(1, block[:, :, None].expand(b, 1, SAMPLE_BLOCK)).squeeze(1).double().cumsum(-1)  # (B, 256)
    index = torch.searchsorted(inner, within, right=True)  # (B, 1)
    # Rounding can put `within` at or past the block's total: take its last token of nonzero weight instead.
    index = torch.where(index >= SAMPLE_BLOCK, inner.argmax(-1, keepdim=True), index)
    return (block * SAMPLE_BLOCK + index).squeeze(-1)  # (B,)


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


class BufferedLayer(DynamicLayer):
    """A KV-cache layer that writes each step into one buffer sized for prompt + completion.

    transformers' DynamicLayer grows by ``torch.cat`` and so copies the whole cache at every step: O(T^2) memory
    traffic over a sequence, as much as the attention itself reads. Here a step writes only its own column.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity  # positions the buffer holds
        self.length = 0  # positions filled

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        self.key_buffer = key_states.new_empty(b, h, self.capacity, d)  # (B, H, capacity, D)
        self.value_buffer = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV buffer of {self.capacity} positions overflowed")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]  # (B, H, T, D) views
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep (or repeat) batch rows ``beam_idx``, copying only the filled part of the buffer."""
        if not self.is_initialized:
            return
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(len(beam_idx), *old.shape[1:])
            new[:, :, : self.length] = old[:, :, : self.length].index_select(0, beam_idx.to(old.device))
            setattr(self, name, new)
        self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)


def new_cache(model: PreTrainedModel, capacity: int) -> Cache:
    """Buffered layers when every layer is plain full attention (Llama); else transformers' DynamicCache, which
    knows sliding-window and other layer kinds."""
    dynamic = DynamicCache(config=model.config)
    if dynamic.layers and all(type(layer) is DynamicLayer for layer in dynamic.layers):
        return Cache(layers=[BufferedLayer(capacity) for _ in dynamic.layers])
    return dynamic


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

    ``fast=True`` uses :mod:`reasoning_rl.rollout_fast` (shared-prefix attention, continuous batching) when the
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
    decoder = _Decoder(model, tokenizer, params, eos_token_ids(model, tokenizer), device, seed)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(rows), desc=progress, disable=progress is None) as bar:
            from reasoning_rl.rollout_fast import ContinuousBatcher, supports_fast_path  # it imports this module

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


def weights_signature(model: torch.nn.Module) -> tuple[int, tuple[tuple[int, int], ...]]:
    """Changes whenever the model's weights may have: another model object, another parameter storage, or an
    in-place write to a parameter (each bumps its tensor's version counter)."""
    return id(model), tuple((p.data_ptr(), p._version) for p in model.parameters())


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


class _Decoder:
    """The decoding loop of one batch; holds what stays fixed across batches (model, params, generator)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        params: SamplingParams,
        eos_ids: frozenset[int],
        device: torch.device,
        seed: int,
    ) -> None:
        self.model, self.tokenizer, self.params, self.eos_ids, self.device = model, tokenizer, params, eos_ids, device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # A stop string of n characters is produced by at most n tokens; 2 more cover a tokenizer that drops the
        # leading space of the first decoded token.
        self.stop_window = max((len(s) for s in params.stop_strings), default=0) + 2
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
        self.pad_id = pad

    def prefill(self, prompts: list[list[int]]) -> tuple[Cache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the distinct prompts once, then repeat cache rows: returns cache, last logits, mask and positions."""
        distinct: list[list[int]] = []
        expand: list[int] = []  # row -> index into `distinct`; copies of a prompt are adjacent
        for ids in prompts:
            if not distinct or ids != distinct[-1]:
                distinct.append(ids)
            expand.append(len(distinct) - 1)
        width = max(len(ids) for ids in distinct)
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in distinct], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in distinct], device=self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (U, T): 0 at each prompt's first real token
        cache = new_cache(self.model, width + self.params.max_new_tokens)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1].float()  # (U, V)
        if len(distinct) < len(prompts):
            index = torch.tensor(expand, device=self.device)  # (B,)
            cache.reorder_cache(index)
            logits, mask, position_ids = logits[index], mask[index], position_ids[index]
        # The mask grows one column per step; allocate all of it now and slice.
        full_mask = torch.ones(len(prompts), width + self.params.max_new_tokens, dtype=mask.dtype, device=self.device)
        full_mask[:, :width] = mask  # (B, T + max_new_tokens)
        return cache, logits, full_mask, position_ids[:, -1] + 1

    def run(self, prompts: list[list[int]], bar: tqdm) -> list[Sample]:
        params = self.params
        cache, logits, full_mask, positions = self.prefill(prompts)  # logits (B, V), positions (B,)
        width = full_mask.shape[1] - params.max_new_tokens
        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        finish: list[str | None] = [None] * len(prompts)
        live = list(range(len(prompts)))  # batch row -> sequence; shrinks as finished rows are pruned
        finished_live = 0  # rows of `live` that have finished but are still in the batch
        banned = torch.tensor(params.banned_token_ids, dtype=torch.long, device=self.device)
        for step in range(params.max_new_tokens):
            if params.banned_token_ids:
                logits = logits.index_fill(-1, banned, float("-inf"))
            token = sample_next_token(logits, params.temperature, params.top_p, self.generator)  # (B,)
            token_logprob = chosen_logprob(logits, token)  # (B,)
            # One device->host copy per step; float64 holds token ids exactly.
            step_tokens, step_logprobs = torch.stack([token.double(), token_logprob.double()]).tolist()
            newly_done = self._record(live, step_tokens, step_logprobs, tokens, logprobs, finish)
            if newly_done:  # an update of 0 still redraws the bar: one line per step in a log file
                bar.update(newly_done)
            finished_live += newly_done
            if finished_live == len(live) or step == params.max_new_tokens - 1:
                break
            if finished_live >= PRUNE_FRACTION * len(live):  # drop finished rows from the batch and its cache
                keep = [r for r, seq in enumerate(live) if finish[seq] is None]
                index = torch.tensor(keep, device=self.device)  # (B',)
                cache.reorder_cache(index)
                token, full_mask, positions = token[index], full_mask[index], positions[index]
                live, finished_live = [live[r] for r in keep], 0
            out = self.model(
                input_ids=token[:, None],  # (B, 1)
                attention_mask=full_mask[:, : width + step + 1],  # (B, T + step + 1)
                position_ids=positions[:, None],  # (B, 1)
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1].float()  # (B, V)
            positions = positions + 1
        bar.update(sum(f is None for f in finish))  # the rest stopped at max_new_tokens
        return [self._sample(t, lp, f or "length") for t, lp, f in zip(tokens, logprobs, finish, strict=True)]

    def _record(
        self,
        live: list[int],
        step_tokens: list[float],
        step_logprobs: list[float],
        tokens: list[list[int]],
        logprobs: list[list[float]],
        finish: list[str | None],
    ) -> int:
        """Append this step's token to every unfinished sequence, mark those that stop; return how many did."""
        newly_done = 0
        check_rows: list[int] = []
        for r, seq in enumerate(live):
            if finish[seq] is not None:  # finished earlier, not yet pruned: its tokens are ignored
                continue
            tok = int(step_tokens[r])
            tokens[seq].append(tok)
            logprobs[seq].append(step_logprobs[r])
            if tok in self.eos_ids:
                finish[seq] = "eos"
                newly_done += 1
            elif self.params.stop_strings:
                check_rows.append(seq)
        if check_rows:
            tails = self.tokenizer.batch_decode(
                [tokens[seq][-self.stop_window :] for seq in check_rows], skip_special_tokens=True
            )
            for seq, tail in zip(check_rows, tails, strict=True):
                if any(s in tail for s in self.params.stop_strings):
                    finish[seq] = "stop"
                    newly_done += 1
        return newly_done

    def _sample(self, token_ids: list[int], logprobs: list[float], finish_reason: str) -> Sample:
        text = completion_text(self.tokenizer, token_ids, finish_reason, self.params.stop_strings)
        return Sample(token_ids=token_ids, text=text, logprobs=logprobs, finish_reason=finish_reason)


def completion_text(
    tokenizer: PreTrainedTokenizerBase, token_ids: list[int], finish_reason: str, stop_strings: Sequence[str]
) -> str:
    """A sample's text: its tokens decoded without special tokens (and without the EOS it ended with), cut before
    the earliest stop string. Every engine's samples get their text this way."""
    content = token_ids[:-1] if finish_reason == "eos" else token_ids
    text = tokenizer.decode(content, skip_special_tokens=True)
    cut = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return text[: min(cut)] if cut else text
