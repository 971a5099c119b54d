"""The fast path (shared-prefix attention, continuous batching) against the plain path and exact probabilities.

The plain path (``generate(..., fast=False)``) is itself checked against a cache-free reference loop and
``model.generate`` in test_rollout.py; here the fast path must give the same greedy tokens, the same log-probs and
the same sampling distribution, with small slot counts so that rows finish at different steps, move between slots,
and waiting rows (and new prompts) enter mid-batch.
"""

from __future__ import annotations

import pytest
import torch
from test_rollout import chi2_critical, chi2_statistic, full_forward_logprobs
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from reasoning_rl.models.loading import TINY_BOS_ID, TINY_EOS_ID, TINY_PAD_ID, build_tiny_tokenizer
from reasoning_rl.rollout import continuous
from reasoning_rl.rollout.continuous import merge_attention, partial_attention, supports_fast_path
from reasoning_rl.rollout.native import generate
from reasoning_rl.rollout.next_token import MULTINOMIAL_MAX_VOCAB, chosen_logprob, inverse_cdf_sample, sample_next_token
from reasoning_rl.rollout.sampler import SamplingParams

# Prompts of different lengths: the prefix table holds prompts padded to the longest.
PROMPTS = ["Question: 1+2?\nAnswer:", "Hi there", "What is 12 minus 7 plus 3? Think.\nAnswer:", "a", "xyz 42"]
# Few-shot-style prompts: a long common prefix (cached once for every row), then questions of different lengths;
# one prompt is a prefix of another, so the common part stops one token short of the shorter.
# (The tiny model's context is 96 tokens: longer prompts would be cut from the left.)
EXEMPLARS = "Q: 3+4?\nA: 3+4=7\n\nQ: 9-2?\nA: 9-2=7\n\nQ: "
SHARED_PROMPTS = [EXEMPLARS + q for q in ["1+2?\nAnswer:", "12 minus 7 plus 3?\nAnswer:", "5", "5*6?", ""]]
PROMPT_SETS = {"distinct": PROMPTS, "shared-prefix": SHARED_PROMPTS}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return build_tiny_tokenizer()


def scaled_llama(vocab_size: int, num_heads: int, num_kv_heads: int, early_eos: str = "") -> PreTrainedModel:
    """A random Llama with its matrices scaled 8x (a context-dependent, far-from-uniform next-token distribution);
    ``early_eos`` characters also end a sequence, so rows finish at different steps."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, max_position_embeddings=96,
        tie_word_embeddings=True, pad_token_id=TINY_PAD_ID, bos_token_id=TINY_BOS_ID, eos_token_id=TINY_EOS_ID,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    if early_eos:
        tok = build_tiny_tokenizer()
        model.generation_config.eos_token_id = [TINY_EOS_ID, *tok.convert_tokens_to_ids(list(early_eos))]
    return model


# Multi-head attention (the tiny model's layout) and grouped-query attention (SmolLM2's: 3 query heads per KV head).
MODELS = {"mha": (4, 4), "gqa": (6, 2)}


@pytest.mark.parametrize("prompt_set", sorted(PROMPT_SETS))
@pytest.mark.parametrize("kind", sorted(MODELS))
@torch.inference_mode()
def test_greedy_and_logprobs_equal_the_plain_path(
    kind: str, prompt_set: str, tokenizer: PreTrainedTokenizerBase
) -> None:  # fmt: skip
    model = scaled_llama(len(tokenizer), *MODELS[kind], early_eos="aeiou h}!IG0")
    assert supports_fast_path(model)
    params = SamplingParams(temperature=0, max_new_tokens=20)
    prompts = PROMPT_SETS[prompt_set]
    # 5 prompts x 3 copies = 15 rows through 4 slots: rows enter as others finish, prompts are prefilled mid-run.
    fast = generate(model, tokenizer, prompts, params, num_samples=3, batch_size=4, fast=True)
    plain = generate(model, tokenizer, prompts, params, num_samples=3, batch_size=4, fast=False)
    for f_samples, p_samples in zip(fast, plain, strict=True):
        for f, p in zip(f_samples, p_samples, strict=True):
            assert f.token_ids == p.token_ids and f.text == p.text and f.finish_reason == p.finish_reason
            assert f.logprobs == pytest.approx(p.logprobs, abs=1e-4)
    lengths = {len(s.token_ids) for group in fast for s in group}
    assert len(lengths) >= 2  # rows did finish at different steps
    assert len({t for group in fast for s in group for t in s.token_ids}) > 5  # not one repeated token


@pytest.mark.parametrize("prompt_set", sorted(PROMPT_SETS))
@pytest.mark.parametrize("kind", sorted(MODELS))
@torch.inference_mode()
def test_sampled_logprobs_match_a_full_forward(kind: str, prompt_set: str, tokenizer: PreTrainedTokenizerBase) -> None:
    # Sampled rows take different paths, so moved rows and merged prefix/suffix attention are checked on every token.
    model = scaled_llama(len(tokenizer), *MODELS[kind], early_eos="aeiou")
    params = SamplingParams(temperature=1.0, max_new_tokens=16)
    prompts = PROMPT_SETS[prompt_set]
    out = generate(model, tokenizer, prompts, params, num_samples=4, seed=5, batch_size=6, fast=True)
    for prompt, samples in zip(prompts, out, strict=True):
        assert len({tuple(s.token_ids) for s in samples}) > 1
        for s in samples:
            expected = full_forward_logprobs(model, tokenizer(prompt).input_ids, s.token_ids)
            torch.testing.assert_close(torch.tensor(s.logprobs), expected, atol=1e-4, rtol=0)


@torch.inference_mode()
@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "matmuls"])
def test_attention_split_into_prefix_and_suffix_equals_one_softmax(fused: bool, monkeypatch) -> None:  # noqa: ANN001
    """The step's two partial attentions, merged by their log-sum-exps, equal one softmax over all keys, on both the
    fused CPU kernel and the plain-matmul fallback (masked keys included)."""
    if not fused:
        monkeypatch.setattr(continuous, "_CPU_FLASH", None)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 2, 3, 8, generator=gen)
    k, v = torch.randn(5, 2, 11, 8, generator=gen), torch.randn(5, 2, 11, 8, generator=gen)
    masked = torch.rand(5, 1, 1, 11, generator=gen) < 0.3
    masked[..., 0] = masked[..., 7] = masked[..., 9] = False  # each part ([:7], [7:9], [9:]) keeps a key
    bias = torch.where(masked, torch.finfo(torch.float32).min / 2, 0.0)
    expected = torch.softmax((q @ k.transpose(-1, -2)) * 0.3 + bias, dim=-1) @ v
    o_a, lse_a = partial_attention(q, k[:, :, :7], v[:, :, :7], bias[..., :7], 0.3)
    o_b, lse_b = partial_attention(q, k[:, :, 7:], v[:, :, 7:], bias[..., 7:], 0.3)
    merged, merged_lse = merge_attention(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)
    scores = (q @ k.transpose(-1, -2)) * 0.3 + bias
    torch.testing.assert_close(lse_a, torch.logsumexp(scores[..., :7], dim=-1, keepdim=True))
    torch.testing.assert_close(merged_lse, torch.logsumexp(scores, dim=-1, keepdim=True))  # so a third part can join
    # three parts (the step's common prefix, prompt and suffix), merged two at a time
    o_c, lse_c = partial_attention(q, k[:, :, 9:], v[:, :, 9:], bias[..., 9:], 0.3)
    o_b, lse_b = partial_attention(q, k[:, :, 7:9], v[:, :, 7:9], bias[..., 7:9], 0.3)
    three = merge_attention(*merge_attention(o_a, lse_a, o_b, lse_b), o_c, lse_c)[0]
    torch.testing.assert_close(three, expected, rtol=1e-5, atol=1e-6)


def test_two_token_sequence_distribution(tokenizer: PreTrainedTokenizerBase) -> None:
    """Chi-square of 3,000 sampled two-token sequences against p(t1) p(t2 | t1) computed with full forwards."""
    model = scaled_llama(len(tokenizer), *MODELS["gqa"])
    prompt_ids = tokenizer(PROMPTS[0]).input_ids
    temperature, n, v = 0.8, 3000, len(tokenizer)
    first = torch.softmax(model(torch.tensor([prompt_ids])).logits[0, -1] / temperature, -1)  # (V,)
    every_first = torch.tensor([prompt_ids + [t] for t in range(v)])  # (V, P + 1): the prompt then each token
    second = torch.softmax(model(every_first).logits[:, -1] / temperature, -1)  # (V, V): p(t2 | t1)
    joint = (first[:, None] * second).flatten().double()  # (V * V,)
    # EOS as a first token ends the sequence: its mass stays on (EOS, anything) pooled into one cell, (EOS, 0).
    joint = joint.view(v, v)
    joint[TINY_EOS_ID] = 0
    joint[TINY_EOS_ID, 0] = first[TINY_EOS_ID]
    joint = joint.flatten()

    params = SamplingParams(temperature=temperature, max_new_tokens=2)
    out = generate(model, tokenizer, [PROMPTS[0]], params, num_samples=n, seed=3, batch_size=700, fast=True)[0]
    cells = torch.tensor([s.token_ids[0] * v + (s.token_ids[1] if len(s.token_ids) > 1 else 0) for s in out])
    counts = torch.bincount(cells, minlength=v * v).double()  # (V * V,)
    stat, df = chi2_statistic(counts, joint)
    assert stat < chi2_critical(df)
    # Power: the same counts reject the sequences' distribution at temperature 1.
    first_t1 = torch.softmax(model(torch.tensor([prompt_ids])).logits[0, -1], -1)
    second_t1 = torch.softmax(model(every_first).logits[:, -1], -1)
    wrong = (first_t1[:, None] * second_t1).double()
    wrong[TINY_EOS_ID] = 0
    wrong[TINY_EOS_ID, 0] = first_t1[TINY_EOS_ID]
    wrong_stat, wrong_df = chi2_statistic(counts, wrong.flatten())
    assert wrong_stat > chi2_critical(wrong_df)


def test_inverse_cdf_draw_matches_the_weights() -> None:
    # 600 tokens span three 256-token blocks (the last one padded). Zero weights, one the last of a block and one
    # the last token, must never be drawn; the rest must follow the weights (chi-square on 20,000 draws).
    weights = torch.softmax(torch.randn(600, generator=torch.Generator().manual_seed(0)) * 1.5, -1)  # (600,)
    weights[[0, 255, 256, 300, 599]] = 0.0
    weights = weights / weights.sum()
    drawn = inverse_cdf_sample(weights.repeat(20000, 1), torch.Generator().manual_seed(1))  # (20000,)
    counts = torch.bincount(drawn, minlength=600).double()
    assert counts[[0, 255, 256, 300, 599]].sum() == 0
    stat, df = chi2_statistic(counts, weights.double())
    assert stat < chi2_critical(df)
    shuffled = weights[torch.randperm(600, generator=torch.Generator().manual_seed(2))]  # power: wrong weights
    wrong_stat, wrong_df = chi2_statistic(counts, shuffled.double() / shuffled.sum())
    assert wrong_stat > chi2_critical(wrong_df)


def test_large_vocabulary_nucleus_uses_the_inverse_cdf_draw() -> None:
    # 5,000 tokens (above MULTINOMIAL_MAX_VOCAB): probs 0.5, 0.3, 0.15 on tokens 4999, 10, 2000 and the rest spread
    # thinly. top_p = 0.75: the mass ranked above token 10 is 0.5 < 0.75, above token 2000 it is 0.8, so tokens 4999
    # and 10 are kept, renormalised to 0.625 / 0.375.
    probs = torch.full((5000,), 0.05 / 4997)
    probs[[4999, 10, 2000]] = torch.tensor([0.5, 0.3, 0.15])
    assert probs.shape[0] > MULTINOMIAL_MAX_VOCAB
    drawn = sample_next_token(probs.log().repeat(4000, 1), 1.0, 0.75, torch.Generator().manual_seed(0))  # (4000,)
    assert set(drawn.tolist()) == {4999, 10}
    assert abs((drawn == 4999).double().mean() - 0.625) < 0.03  # sd of the mean ~0.008


def test_large_vocabulary_tempered_draw_follows_softmax_over_temperature() -> None:
    # 5,120 tokens (above MULTINOMIAL_MAX_VOCAB, so the tempered weights go straight to the inverse-CDF draw),
    # 40 of them likely: the draw must follow softmax(logits / 0.7), and must reject the untempered softmax.
    logits = torch.full((5120,), -30.0)
    logits[torch.arange(40) * 128] = torch.randn(40, generator=torch.Generator().manual_seed(0)) * 2  # 2 per block
    assert logits.shape[0] > MULTINOMIAL_MAX_VOCAB
    drawn = sample_next_token(logits.repeat(20000, 1), 0.7, 1.0, torch.Generator().manual_seed(3))  # (20000,)
    counts = torch.bincount(drawn, minlength=5120).double()
    stat, df = chi2_statistic(counts, torch.softmax(logits.double() / 0.7, -1))
    assert stat < chi2_critical(df)
    wrong_stat, wrong_df = chi2_statistic(counts, torch.softmax(logits.double(), -1))
    assert wrong_stat > chi2_critical(wrong_df)


def test_chosen_logprob_is_log_softmax_at_the_token() -> None:
    logits = torch.randn(6, 50_000, generator=torch.Generator().manual_seed(0)) * 4
    token = torch.tensor([0, 17, 49_999, 3, 25_000, 17])
    expected = torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1)
    torch.testing.assert_close(chosen_logprob(logits, token), expected)
