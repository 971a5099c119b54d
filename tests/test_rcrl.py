"""RCRL's pieces: step labels worked by hand, the goal-conditioned text, goal tokens in the tiny tokenizer and
model, rollout grading, the banned [BAD] token at sampling, and one run of the loop with a stand-in EI policy."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from reasoning_rl.algos import ei, rcrl
from reasoning_rl.algos.context import RunContext
from reasoning_rl.algos.rcrl import (
    BAD,
    GOOD,
    SampledSolution,
    add_goal_tokens,
    goal_conditioned,
    goal_prompt,
    label_steps,
    orm_success_rates,
    rollout_success_rates,
    step_success_rates,
    success_rate,
)
from reasoning_rl.config import (
    ArithTaskConfig,
    EvalConfig,
    ExperimentConfig,
    LoggerConfig,
    LoggerName,
    ModelConfig,
    ModelSource,
    RCRLConfig,
    RewardConfig,
    RewardName,
    SFTInitConfig,
)
from reasoning_rl.models.loading import build_tiny_model, build_tiny_tokenizer
from reasoning_rl.rollout.native import generate
from reasoning_rl.rollout.sampler import SamplingParams
from reasoning_rl.run.tracking import NullTracker
from reasoning_rl.tasks import Problem, generate_arith, step_prefixes
from reasoning_rl.training.finetune import tokenize_examples

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ModelConfig(name="tiny", source=ModelSource.tiny, max_seq_len=64, hidden_size=32, num_layers=2, num_heads=2)
PROBLEM = Problem("p0", "What is 2+3 then times 2?", "2+3=<<2+3=5>>5\n5*2=<<5*2=10>>10\n#### 10", "10", ())
SOLUTION = "2+3=<<2+3=5>>5\n5*2=<<5*2=10>>10\n#### 10"  # 3 steps, correct


def prompt_of(question: str) -> str:
    return f"Q: {question}\nA:\n"


# ------------------------------------------------------------------------------------------ labels by hand


def test_success_rate_is_the_fraction_of_correct_rollouts():
    assert success_rate([True, False, True, True]) == 0.75  # 3 of K=4
    assert success_rate([False, False]) == 0.0  # none correct
    assert success_rate([True, True]) == 1.0  # all correct
    assert success_rate([True]) == 1.0  # K=1
    with pytest.raises(ValueError, match="at least one"):
        success_rate([])


def test_label_steps_with_a_threshold():
    rates = [0.75, 0.5, 0.25]
    # T=0.5: 0.75 >= 0.5 GOOD, 0.5 >= 0.5 GOOD (a tie is GOOD), 0.25 < 0.5 BAD
    assert label_steps(rates, 0.5) == [True, True, False]
    # T=0.6: 0.75 GOOD, 0.5 < 0.6 BAD, 0.25 BAD
    assert label_steps(rates, 0.6) == [True, False, False]
    assert label_steps(rates, 0.0) == [True, True, True]  # T=0: everything is GOOD
    assert label_steps(rates, 1.0) == [False, False, False]  # T=1: only a step whose rollouts all succeed
    assert label_steps([], 0.5) == []


def test_the_final_step_is_labelled_by_its_own_correctness():
    # a 3-step solution: prefixes s_1 and s_1 s_2 are rolled out (K=4), the whole solution is graded
    rollouts = [[True, True, False, True], [False, True, False, False]]  # rates 3/4 and 1/4
    assert step_success_rates(rollouts, solution_correct=True) == [0.75, 0.25, 1.0]
    assert step_success_rates(rollouts, solution_correct=False) == [0.75, 0.25, 0.0]
    # a correct solution's last step is GOOD at any threshold, an incorrect one's BAD (T <= 1 and T > 0)
    assert label_steps(step_success_rates(rollouts, True), 0.5) == [True, False, True]
    assert label_steps(step_success_rates(rollouts, False), 0.5) == [True, False, False]
    assert step_success_rates([], solution_correct=True) == [1.0]  # a one-step solution needs no rollout


def test_goal_conditioned_puts_a_goal_token_at_the_start_of_each_step_line():
    solution = "a=1\n\nb=2\n#### 3"
    assert step_prefixes(solution) == ["a=1\n", "a=1\n\nb=2\n", solution]
    # the blank line belongs to step 2, and its goal token goes on step 2's own line
    assert goal_conditioned(solution, [True, False, True]) == "[GOOD]a=1\n\n[BAD]b=2\n[GOOD]#### 3"
    # trailing blank lines after the last step and indented lines are kept exactly
    assert goal_conditioned("  x\n#### 1\n\n", [False, True]) == "[BAD]  x\n[GOOD]#### 1\n\n"
    for text, labels in [(solution, [False, True, False]), (SOLUTION, [True, True, True]), ("#### 4", [False])]:
        assert goal_conditioned(text, labels).replace(GOOD, "").replace(BAD, "") == text  # only tokens added
    with pytest.raises(ValueError, match="2 labels for a solution of 3 steps"):
        goal_conditioned(solution, [True, True])


def test_goal_prompt_appends_good_to_the_base_prompt():
    assert goal_prompt("1+1?", build_prompt=prompt_of) == "Q: 1+1?\nA:\n[GOOD]"


def test_orm_rates_are_split_back_per_solution():
    class FixedORM:  # scores each prefix by its length, so the split is easy to check by hand
        def __init__(self) -> None:
            self.calls: list[tuple[list[str], list[str]]] = []

        def score_prefixes(self, prompts: Sequence[str], prefixes: Sequence[str]) -> list[float]:
            self.calls.append((list(prompts), list(prefixes)))
            return [len(p) / 100 for p in prefixes]

    two_steps = SampledSolution(PROBLEM, "a\n#### 9", False, step_prefixes("a\n#### 9"))  # prefixes of 2, 8 chars
    one_step = SampledSolution(PROBLEM, "#### 10", True, step_prefixes("#### 10"))  # 7 chars
    orm = FixedORM()
    rates = orm_success_rates(orm, [two_steps, one_step], prompt_of)
    assert rates == [[0.02, 0.08], [0.07]]
    assert len(orm.calls) == 1  # one batched call, the question's prompt paired with every prefix
    assert orm.calls[0] == ([prompt_of(PROBLEM.question)] * 3, ["a\n", "a\n#### 9", "#### 10"])
    # T=0.05: 0.02 BAD, 0.08 GOOD: the ORM labels the last step too, so this wrong solution's last step is GOOD
    assert label_steps(rates[0], 0.05) == [False, True]


# ------------------------------------------------------------------------------------- tiny model pieces


@pytest.fixture
def tiny() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(TINY, len(tokenizer), seed=0), tokenizer


def test_goal_tokens_in_the_tiny_tokenizer_and_model(tiny, tmp_path: Path):
    model, tokenizer = tiny
    old_vocab = len(tokenizer)  # 100
    old_embeddings = model.get_input_embeddings().weight.detach().clone()  # (100, 32)
    good_id, bad_id = add_goal_tokens(model, tokenizer, seed=0)
    assert (good_id, bad_id) == (old_vocab, old_vocab + 1) and len(tokenizer) == old_vocab + 2

    # one id each, also inside text and in a completion tokenized without special tokens (as finetune does)
    assert tokenizer(GOOD).input_ids == [good_id]
    ids = tokenizer("[GOOD]a\n[BAD]b", add_special_tokens=False).input_ids
    assert ids == [good_id, *tokenizer("a\n").input_ids, bad_id, *tokenizer("b").input_ids]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a\nb"  # dropped from decoded text
    tokenizer.save_pretrained(tmp_path)  # checkpoints keep them
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(GOOD + "x").input_ids == [good_id, *tokenizer("x").input_ids]

    # the embedding matrix grows; old rows are untouched, new rows start (almost exactly) at the mean row
    weight = model.get_input_embeddings().weight  # (102, 32)
    assert weight.shape == (old_vocab + 2, TINY.hidden_size) and model.config.vocab_size == old_vocab + 2
    assert torch.equal(weight[:old_vocab], old_embeddings)
    assert torch.allclose(weight[old_vocab:], old_embeddings.mean(0).expand(2, -1), atol=1e-3)
    assert model.lm_head.weight.data_ptr() == weight.data_ptr()  # still tied
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits  # (1, T, 102)
    assert logits.shape == (1, len(ids), old_vocab + 2) and torch.isfinite(logits).all()

    # a training example carries one goal token per step, as targets (after the prompt)
    completion = goal_conditioned(SOLUTION, [True, False, True])
    (example,) = tokenize_examples(tokenizer, [(prompt_of(PROBLEM.question), completion)], max_seq_len=200)
    targets = example.input_ids[example.prompt_len :]
    assert (targets.count(good_id), targets.count(bad_id)) == (2, 1)

    # adding them again changes nothing
    assert add_goal_tokens(model, tokenizer, seed=0) == (good_id, bad_id) and len(tokenizer) == old_vocab + 2


def test_a_banned_bad_token_is_never_sampled_even_when_it_dominates(tiny):
    model, tokenizer = tiny
    _, bad_id = add_goal_tokens(model, tokenizer, seed=0)
    # make [BAD] the most likely token at every position: add 100 to its logit
    boost = torch.zeros(len(tokenizer))
    boost[bad_id] = 100.0
    model.lm_head.register_forward_hook(lambda module, args, logits: logits + boost)  # (B, T, V)
    prompts = [prompt_of("1+1?"), prompt_of("2+2?")]
    free = generate(model, tokenizer, prompts, SamplingParams(0.0, max_new_tokens=5), num_samples=1)
    assert all(s.token_ids == [bad_id] * 5 for group in free for s in group)  # the construction works
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature, max_new_tokens=8, banned_token_ids=(bad_id,))
        banned = generate(model, tokenizer, prompts, params, num_samples=3, seed=1)
        assert all(bad_id not in s.token_ids for group in banned for s in group)
        assert all(len(s.token_ids) > 0 for group in banned for s in group)


def test_rollouts_are_graded_as_prefix_plus_completion_in_one_call(tiny):
    model, tokenizer = tiny
    # every rollout ends at once: make EOS the most likely token, so each completion is "" and a rollout is graded
    # on its prefix alone (no "####": the last number, the fallback of extract_answer)
    boost = torch.zeros(len(tokenizer))
    boost[tokenizer.eos_token_id] = 100.0
    model.lm_head.register_forward_hook(lambda module, args, logits: logits + boost)  # (B, T, V)
    calls: list[int] = []

    def counting_generate(*args, **kwargs):
        calls.append(len(args[2]))  # prompts in this call
        return generate(*args, **kwargs)

    correct = SampledSolution(PROBLEM, SOLUTION, True, step_prefixes(SOLUTION))
    wrong_text = "2+3=<<2+3=5>>5\n#### 7"  # shares its first step with the correct solution
    wrong = SampledSolution(PROBLEM, wrong_text, False, step_prefixes(wrong_text))
    rates, drawn = rollout_success_rates(
        model,
        tokenizer,
        [correct, wrong, correct],
        prompt_of,
        SamplingParams(1.0, max_new_tokens=6),
        4,
        seed=0,
        batch_size=8,
        sampler=counting_generate,
    )
    # non-final prefixes: "2+3=<<2+3=5>>5\n" (shared by all three) and "...5*2=<<5*2=10>>10\n": 2 distinct, K=4 each
    assert calls == [2] and drawn == 8
    # correct: s_1 ends with 5 != 10: 0/4; s_1 s_2 ends with 10: 4/4; the whole solution is correct: 1
    # wrong:   s_1 shared: 0/4;                                           the whole solution is wrong:   0
    assert rates == [[0.0, 1.0, 1.0], [0.0, 0.0], [0.0, 1.0, 1.0]]
    assert label_steps(rates[0], 0.5) == [False, True, True]


def test_run_labels_fine_tunes_and_conditions_the_policy_on_good(tiny, monkeypatch, tmp_path: Path):
    model, tokenizer = tiny
    ei_model = copy.deepcopy(model)
    # the labelling policy: a stand-in for the EI stage that writes short lines (a likely newline), so solutions
    # have several steps and prefixes get rolled out
    boost = torch.zeros(len(tokenizer))
    boost[tokenizer("\n").input_ids[0]] = 4.0
    ei_model.lm_head.register_forward_hook(lambda module, args, logits: logits + boost)  # (B, T, V)
    monkeypatch.setattr(ei, "trained_policy", lambda ctx, ei_cfg: (ei_model, ctx.tokenizer))
    algo = RCRLConfig(num_solutions=2, num_rollouts=2, n_questions=3, max_new_tokens=24, max_steps=2)
    cfg = ExperimentConfig(
        algo=algo,
        reward=RewardConfig(name=RewardName.sparse),
        init=SFTInitConfig(),
        model=dataclasses.replace(TINY, max_seq_len=256, train_batch_size=4, micro_batch_size=4, sample_batch_size=8),
        task=ArithTaskConfig(),
        logger=LoggerConfig(name=LoggerName.none),
        eval=EvalConfig(k=1, max_new_tokens=16),
    )
    splits = generate_arith(5, 2, 2, 2, 20, "+-", seed=0)
    tracker = RecordingTracker()
    ctx = RunContext(cfg, model, tokenizer, splits, prompt_of, tracker, tmp_path, torch.device("cpu"))
    assert rcrl.run(ctx) is None  # the pipeline evaluates

    (labelling,) = [m for m in tracker.metrics if "train/rcrl_solutions" in m]
    assert labelling["train/rcrl_solutions"] <= 3 * 2  # 3 questions x 2 solutions, minus empty ones
    non_final_steps = labelling["train/rcrl_steps_labelled"] - labelling["train/rcrl_solutions"]
    assert 0 < labelling["train/rcrl_rollouts"] <= 2 * non_final_steps  # K=2 per distinct non-final prefix
    assert 0 <= labelling["train/rcrl_fraction_good"] <= 1 and 0 <= labelling["train/rcrl_solutions_correct"] <= 1
    assert any("train/rcrl_loss" in m for m in tracker.metrics)
    # the goal tokens live in a copy of the tokenizer and in the fine-tuned policy only
    good_id, bad_id = ctx.tokenizer.convert_tokens_to_ids([GOOD, BAD])
    assert len(ctx.tokenizer) == 102 and len(tokenizer) == 100
    assert ctx.model.get_input_embeddings().num_embeddings == 102
    assert ei_model.get_input_embeddings().num_embeddings == 100
    # test time: prompts open the first step with [GOOD], and [BAD] is never sampled
    assert ctx.build_prompt("1+1?") == "Q: 1+1?\nA:\n[GOOD]"
    assert ctx.tokenizer(ctx.build_prompt("1+1?")).input_ids[-1] == good_id
    assert ctx.banned_token_ids == (bad_id,)


class RecordingTracker(NullTracker):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.append(dict(metrics))
