"""The next-token draw of the native engine: greedy, temperature and nucleus (top-p) sampling, and the log-prob of
the chosen token under the untempered distribution."""

from __future__ import annotations

import torch


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


def draw_step(
    logits: torch.Tensor, banned: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, list[float], list[float]]:
    """One decode step of every live row from its logits (B, V): banned token ids (``banned``, (n,), may be empty)
    masked out, then :func:`sample_next_token` and :func:`chosen_logprob`. Returns the drawn tokens (B,), and the
    tokens and their log-probs as host lists, fetched in one device->host copy (float64 holds token ids exactly)."""
    if banned.numel():
        logits = logits.index_fill(-1, banned, float("-inf"))
    token = sample_next_token(logits, temperature, top_p, generator)  # (B,)
    token_logprob = chosen_logprob(logits, token)  # (B,)
    step_tokens, step_logprobs = torch.stack([token.double(), token_logprob.double()]).tolist()
    return token, step_tokens, step_logprobs


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
