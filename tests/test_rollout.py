"""The sampler against plain references: a full-forward argmax loop, `model.generate`, and softmax(logits / T)."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reasoning_rl.config import ModelConfig, ModelSource
from reasoning_rl.models.loading import TINY_EOS_ID, build_tiny_model, build_tiny_tokenizer
from reasoning_rl.rollout.kv_cache import BufferedLayer, new_cache
from reasoning_rl.rollout.native import generate
from reasoning_rl.rollout.next_token import sample_next_token
from reasoning_rl.rollout.sampler import SamplingParams

PROMPTS = ["Question: 1+2?\nAnswer:", "Hi there", "What is 12 minus 7 plus 3? Think.\nAnswer:", "a"]
MAX_POS = 96


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A small random Llama whose matrices are scaled up 8x: at the default init (std 0.02) the next-token
    distribution is nearly uniform and greedy decoding repeats one character, which would make the comparisons
    below weak; scaled, the output depends on the context and the distribution is far from uniform."""
    cfg = ModelConfig(
        name="tiny", source=ModelSource.tiny, max_seq_len=MAX_POS, hidden_size=64, num_layers=2, num_heads=4,
        intermediate_size=128,
    )  # fmt: skip
    model = build_tiny_model(cfg, len(tokenizer), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def early_eos_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The same model with a dozen frequent characters also counted as EOS, so sequences end at different steps
    (exercising EOS handling and the pruning of finished rows)."""
    early = copy.deepcopy(model)
    extra = tokenizer.convert_tokens_to_ids(list("aeiou h}!IG0"))
    early.generation_config.eos_token_id = [TINY_EOS_ID, *extra]
    return early


def reference_greedy(model: PreTrainedModel, prompt_ids: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """The plainest greedy decoder: a full forward pass over the whole sequence per token, no cache, no padding."""
    generated: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([prompt_ids + generated])).logits[0, -1]  # (V,)
        generated.append(int(logits.argmax()))
        if generated[-1] in eos:
            break
    return generated


def full_forward_logprobs(model: PreTrainedModel, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    """log p(token_t | prompt, tokens_<t) from one forward pass over the unpadded sequence."""
    logits = model(torch.tensor([prompt_ids + token_ids])).logits[0]  # (P + N, V)
    logprobs = torch.log_softmax(logits[len(prompt_ids) - 1 : -1].float(), dim=-1)  # (N, V): predicts tokens 0..N-1
    return logprobs.gather(-1, torch.tensor(token_ids)[:, None]).squeeze(-1)  # (N,)


@torch.inference_mode()
def test_greedy_matches_reference_loop(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    out = generate(model, tokenizer, PROMPTS, SamplingParams(temperature=0, max_new_tokens=16), batch_size=8)
    for prompt, (sample,) in zip(PROMPTS, out, strict=True):
        expected = reference_greedy(model, tokenizer(prompt).input_ids, 16, {TINY_EOS_ID})
        assert sample.token_ids == expected
    assert len({t for (s,) in out for t in s.token_ids}) > 10  # the scaled model does not just repeat one token
    assert isinstance(new_cache(model, 8).layers[0], BufferedLayer)  # the in-place cache is what was compared


@torch.inference_mode()
def test_greedy_matches_hf_generate(early_eos_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    model = early_eos_model
    eos = model.generation_config.eos_token_id
    out = generate(model, tokenizer, PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")  # left padding, as load_policy sets it
    hf = model.generate(**batch, do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    for row, (sample,) in zip(hf[:, batch.input_ids.shape[1] :].tolist(), out, strict=True):
        ends = [i for i, t in enumerate(row) if t in eos]
        assert sample.token_ids == (row[: ends[0] + 1] if ends else row)
    assert {s.finish_reason for (s,) in out} == {"eos", "length"}  # both kinds of ending were compared


@torch.inference_mode()
def test_batching_and_padding_do_not_change_greedy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    params = SamplingParams(temperature=0, max_new_tokens=12)
    one_by_one = generate(model, tokenizer, PROMPTS, params, num_samples=2, batch_size=1)
    together = generate(model, tokenizer, PROMPTS, params, num_samples=2, batch_size=8)
    odd_batches = generate(model, tokenizer, PROMPTS, params, num_samples=2, batch_size=3)
    for a, b, c in zip(one_by_one, together, odd_batches, strict=True):
        assert [s.token_ids for s in a] == [s.token_ids for s in b] == [s.token_ids for s in c]
        assert a[0].token_ids == a[1].token_ids  # greedy: both samples of a prompt agree


@torch.inference_mode()
def test_greedy_ignores_seed_and_sampling_is_seeded(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    ids = [[s.token_ids for s in p] for p in generate(model, tokenizer, PROMPTS, greedy, seed=1)]
    assert ids == [[s.token_ids for s in p] for p in generate(model, tokenizer, PROMPTS, greedy, seed=2)]

    hot = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8)
    first = generate(model, tokenizer, PROMPTS, hot, num_samples=3, seed=7, batch_size=4)
    again = generate(model, tokenizer, PROMPTS, hot, num_samples=3, seed=7, batch_size=4)
    other = generate(model, tokenizer, PROMPTS, hot, num_samples=3, seed=8, batch_size=4)
    assert first == again
    assert [[s.token_ids for s in p] for p in first] != [[s.token_ids for s in p] for p in other]
    assert all(len(p) == 3 for p in first)
    assert len({tuple(s.token_ids) for s in first[0]}) > 1  # the copies of a prompt are sampled independently


@torch.inference_mode()
def test_logprobs_match_full_forward(early_eos_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    # Temperature and top-p change which tokens are drawn, not the reported log-probs: those are log_softmax(logits).
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=20)
    out = generate(early_eos_model, tokenizer, PROMPTS, params, num_samples=4, batch_size=16)
    lengths = [len(s.token_ids) for p in out for s in p]
    assert min(lengths) < 10 and max(lengths) == 20  # rows finished at different steps, so some were pruned
    for prompt, samples in zip(PROMPTS, out, strict=True):
        for s in samples:
            expected = full_forward_logprobs(early_eos_model, tokenizer(prompt).input_ids, s.token_ids)
            torch.testing.assert_close(torch.tensor(s.logprobs), expected, atol=1e-4, rtol=0)


@torch.inference_mode()
def test_eos_is_kept_in_tokens_not_in_text(
    early_eos_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    eos = set(early_eos_model.generation_config.eos_token_id)
    out = generate(early_eos_model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=20), num_samples=4)
    for s in (s for p in out for s in p):
        assert s.finish_reason in ("eos", "length")
        if s.finish_reason == "eos":
            assert s.token_ids[-1] in eos and not eos & set(s.token_ids[:-1])
            assert s.text == tokenizer.decode(s.token_ids[:-1], skip_special_tokens=True)


@torch.inference_mode()
def test_stop_strings_cut_text(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    params = SamplingParams(temperature=0, max_new_tokens=16)
    (free,) = generate(model, tokenizer, PROMPTS[:1], params)[0]
    stop = free.text[4:6]  # two characters the greedy completion produces
    (stopped,) = generate(model, tokenizer, PROMPTS[:1], SamplingParams(0, 1.0, 16, ("@@@", stop)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]  # cut before the first occurrence of the stop string
    # The tokens run up to the one that completed the stop string (the shortest prefix whose text contains it).
    n = next(n for n in range(17) if stop in tokenizer.decode(free.token_ids[:n], skip_special_tokens=True))
    assert stopped.token_ids == free.token_ids[:n]
    assert stopped.logprobs == pytest.approx(free.logprobs[:n], abs=1e-5)


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
@torch.inference_mode()
def test_banned_tokens_are_never_sampled(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, fast: bool
) -> None:  # fmt: skip
    free = generate(model, tokenizer, PROMPTS, SamplingParams(temperature=0, max_new_tokens=12), fast=fast)
    banned = sorted({s.token_ids[0] for (s,) in free})  # what greedy decoding picks first: the ban must bite
    greedy = generate(model, tokenizer, PROMPTS, SamplingParams(0.0, 1.0, 12, (), tuple(banned)), fast=fast)
    for prompt, (sample,) in zip(PROMPTS, greedy, strict=True):
        logits = model(torch.tensor([tokenizer(prompt).input_ids])).logits[0, -1]  # (V,)
        logits[banned] = float("-inf")
        assert sample.token_ids[0] == int(logits.argmax())  # the best token that is not banned
    hot = SamplingParams(1.0, 1.0, 12, (), tuple(banned))
    drawn = generate(model, tokenizer, PROMPTS, hot, num_samples=4, seed=0, fast=fast)
    assert not set(banned) & {t for group in greedy + drawn for s in group for t in s.token_ids}


@torch.inference_mode()
def test_max_new_tokens_is_respected(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    out = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=5), num_samples=2, seed=3)
    for s in (s for p in out for s in p):
        assert len(s.token_ids) == len(s.logprobs) <= 5
        assert (s.finish_reason == "length") == (len(s.token_ids) == 5 and s.token_ids[-1] != TINY_EOS_ID)


def test_long_prompt_is_cut_from_the_left(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture
) -> None:
    long_prompt = "x" * 200 + PROMPTS[0]
    params = SamplingParams(temperature=0, max_new_tokens=8)
    with caplog.at_level(logging.WARNING):
        (sample,) = generate(model, tokenizer, [long_prompt], params)[0]
    assert "cut from the left" in caplog.text
    kept = tokenizer(long_prompt).input_ids[-(MAX_POS - 8) :]  # MAX_POS - max_new_tokens prompt tokens fit
    with torch.inference_mode():
        assert sample.token_ids == reference_greedy(model, kept, 8, {TINY_EOS_ID})
    with pytest.raises(ValueError, match="no room for a prompt"):
        generate(model, tokenizer, ["hi"], SamplingParams(max_new_tokens=MAX_POS))


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1 % point of chi-square(df), Wilson-Hilferty approximation (z = 3.09 is the normal's 0.999 point)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2_statistic(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic, pooling the categories expected fewer than 5 times into one; returns (stat, df)."""
    expected = probs * counts.sum()  # (V,)
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])  # (K + 1,)
    exp = torch.cat([expected[~small], expected[small].sum()[None]])  # (K + 1,)
    if exp[-1] == 0:
        assert obs[-1] == 0, "sampled a token of probability 0"
        obs, exp = obs[:-1], exp[:-1]
    return float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1


@pytest.mark.parametrize("temperature, top_p", [(0.7, 1.0), (1.3, 1.0), (1.0, 0.6)])
@torch.inference_mode()
def test_first_token_distribution(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, temperature: float, top_p: float
) -> None:
    n = 4000
    prompt = PROMPTS[0]
    logits = model(torch.tensor([tokenizer(prompt).input_ids])).logits[0, -1]  # (V,)
    probs = torch.softmax(logits / temperature, dim=-1)  # (V,)
    sorted_probs, order = probs.sort(descending=True)
    nucleus = order[(sorted_probs.cumsum(-1) - sorted_probs) < top_p]  # mass ranked above the token < top_p
    target = torch.zeros_like(probs)
    target[nucleus] = probs[nucleus] / probs[nucleus].sum()  # the nucleus, renormalised

    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=1)
    out = generate(model, tokenizer, [prompt], params, num_samples=n, seed=11, batch_size=n)[0]
    counts = torch.bincount(torch.tensor([s.token_ids[0] for s in out]), minlength=len(probs)).double()  # (V,)

    assert set(counts.nonzero().squeeze(-1).tolist()) <= set(nucleus.tolist())
    stat, df = chi2_statistic(counts, target.double())
    assert stat < chi2_critical(df)
    # Power: the same counts reject the untempered, unrestricted distribution.
    wrong_stat, wrong_df = chi2_statistic(counts, torch.softmax(logits, -1).double())
    assert wrong_stat > chi2_critical(wrong_df)


def test_sample_next_token_top_p_keeps_the_smallest_nucleus() -> None:
    # probs 0.5, 0.3, 0.15, 0.05. top_p = 0.8: mass above each token is 0, 0.5, 0.8, 0.95, so tokens 0 and 1 are kept
    # (0.5 + 0.3 = 0.8 reaches top_p); token 2 is dropped because 0.8 is already covered.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(2000, 1)  # (2000, 4)
    drawn = sample_next_token(logits, 1.0, 0.8, torch.Generator().manual_seed(0))  # (2000,)
    counts = torch.bincount(drawn, minlength=4)
    assert counts[2:].sum() == 0
    assert abs(counts[0] / 2000 - 0.5 / 0.8) < 0.05  # renormalised: 0.625 and 0.375
    # top_p below the top token's probability keeps the top token only: greedy.
    assert (sample_next_token(logits, 1.0, 0.1, None) == 0).all()
    # At the boundary, with probabilities exact in floating point: 0.5, 0.5, e^-100 / 2. With top_p = 0.5 the first
    # token's 0.5 already reaches top_p, so the nucleus is that one token (the mass above the second is 0.5, not < 0.5).
    tied = torch.tensor([0.0, 0.0, -100.0]).repeat(1000, 1)  # (1000, 3)
    assert len(set(sample_next_token(tied, 1.0, 0.5, torch.Generator().manual_seed(0)).tolist())) == 1


def test_progress_bar_and_empty_input(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    assert generate(model, tokenizer, [], SamplingParams()) == []
    out = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=3), num_samples=2, progress="sampling")
    assert [len(p) for p in out] == [2] * len(PROMPTS)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, tokenizer, [""], SamplingParams())
