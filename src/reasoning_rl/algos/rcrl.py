"""Return-Conditioned RL (Havrilla et al. 2024, section 4.3): train pi(a_t | s_t, g_t) with cross-entropy, where the
goal g_t is a token, [GOOD] or [BAD], that opens each step of the solution.

  1. the labelling policy: the best EI policy, i.e. the EI row's: ``algo=ei reward=sparse`` with the ``algo.ei``
     settings from the same init (a cached stage, ``ei.trained_policy``, shared with that EI run and with every
     RCRL run of the same init and EI settings, whatever their reward)
  2. sample ``algo.num_solutions`` solutions per training question from it; correct and incorrect ones are both
     kept (the [BAD] labels come from them)
  3. label every step. For the prefix s_1..s_i that ends with step i, sample K = ``algo.num_rollouts`` completions
     from the EI policy; with l_k the correctness of completion k, step i is [GOOD] when (1/K) Σ_k l_k >= T
     (``algo.threshold``), else [BAD]. The last prefix is the whole solution, so its rate is its own correctness
     (1 or 0) and needs no rollouts. ``reward=orm`` (the paper's "ORM RCRL" row): the rate of every prefix, the
     last one included, is the ORM's probability that the prefix leads to a correct answer; the ground truth is
     not consulted, as in ORM EI's default filter. With ``orm.disjoint`` the questions labelled are ones the ORM
     was not trained on.
  4. add [GOOD] and [BAD] to the tokenizer as special tokens (never split, dropped from decoded text) and grow the
     init policy's embeddings; the new rows start at the mean of the old ones (transformers' ``mean_resizing``)
  5. fine-tune the init policy (not the EI policy) with cross-entropy on (prompt, solution with its goal tokens)
  6. condition on [GOOD] at test time; the pipeline then evaluates
A run checkpoints the labelled examples after phase 3 and the policy after phase 5 (``run/checkpointing.py``); a killed
run resumes from the later of the two.

Choices where the paper is not explicit:
- A goal token sits at the start of its step's line ("[GOOD]a\\n\\n[BAD]b\\n[GOOD]#### 3"); blank lines stay with
  the step that follows them, as in ``step_prefixes``.
- The goal tokens are targets of the loss like every other completion token. The model so learns to open each
  step with a goal token, and at test time we append [GOOD] to the prompt (the first step) and ban [BAD] from
  sampling (``ctx.banned_token_ids``), so every later step the model opens is opened with [GOOD] too: the paper's
  "condition on [GOOD] at test time", step by step. Decoded texts drop the goal tokens, so grading is unchanged.
- Rollouts of a prefix shared by several solutions of one question are drawn once, and all rollouts of the run go
  through one ``generate`` call. Solutions with no step (an empty sample) are dropped.

    python main.py algo=rcrl init=sft model=tiny task=arith
    python main.py algo=rcrl reward=orm init=sft model=tiny task=arith   # ORM RCRL
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reasoning_rl.algos import ei
from reasoning_rl.algos.context import RunContext, finetune_params, training_questions
from reasoning_rl.config import RCRLConfig, RewardName
from reasoning_rl.rollout.native import generate
from reasoning_rl.rollout.sampler import Sampler, SamplingParams
from reasoning_rl.scoring.evaluation import EvalResult
from reasoning_rl.tasks import Problem, is_correct, step_prefixes
from reasoning_rl.tasks.prompts import STOP_STRINGS
from reasoning_rl.training.finetune import finetune

log = logging.getLogger(__name__)

GOOD = "[GOOD]"  # goal token: the step leads to a correct answer often enough (rate >= T)
BAD = "[BAD]"  # goal token: it does not


class PrefixScorer(Protocol):
    """What labelling needs from the ORM (``algos.orm.OutcomeRewardModel``)."""

    def score_prefixes(self, prompts: Sequence[str], prefixes: Sequence[str]) -> list[float]: ...


@dataclass(frozen=True)
class SampledSolution:
    problem: Problem
    text: str  # the EI policy's solution, as decoded (no special tokens)
    correct: bool  # its final answer is the reference answer
    prefixes: list[str]  # step_prefixes(text): the solution cut after each step; the last is the whole text


# ------------------------------------------------------------------------------------------ pure pieces


def success_rate(correct_flags: Sequence[bool]) -> float:
    """(1/K) Σ_k l_k: the fraction of a prefix's K completions whose final answer is correct."""
    if not correct_flags:
        raise ValueError("a success rate needs at least one completion (algo.num_rollouts >= 1).")
    return sum(correct_flags) / len(correct_flags)


def step_success_rates(rollouts_correct: Sequence[Sequence[bool]], solution_correct: bool) -> list[float]:
    """Per step of one solution: the success rate of each non-final prefix's rollouts, then the final step's.

    The last prefix is the whole solution, so its rate is its own correctness, 1.0 or 0.0.
    """
    return [success_rate(flags) for flags in rollouts_correct] + [float(solution_correct)]


def label_steps(success_rates: Sequence[float], threshold: float) -> list[bool]:
    """[GOOD] (True) when a step's success rate is >= T, else [BAD] (False)."""
    return [rate >= threshold for rate in success_rates]


def goal_conditioned(solution: str, labels: Sequence[bool]) -> str:
    """The training completion: the solution with [GOOD] or [BAD] at the start of each step's line.

    "a\\n\\nb\\n#### 3" with labels (True, False, True) -> "[GOOD]a\\n\\n[BAD]b\\n[GOOD]#### 3": the text is kept
    exactly otherwise (removing the goal tokens gives back the solution).
    """
    prefixes = step_prefixes(solution)
    if len(labels) != len(prefixes):
        raise ValueError(f"{len(labels)} labels for a solution of {len(prefixes)} steps.")
    text, start = "", 0
    for prefix, good in zip(prefixes, labels, strict=True):
        # the text between two prefixes is zero or more blank lines, then the step's own (non-blank) line
        *blank_lines, step_line = solution[start : len(prefix)].splitlines(keepends=True)
        text += "".join(blank_lines) + (GOOD if good else BAD) + step_line
        start = len(prefix)
    return text + solution[start:]


def goal_prompt(question: str, *, build_prompt: Callable[[str], str]) -> str:
    """The test-time prompt: the base prompt, then [GOOD], so the first step is conditioned on success."""
    return build_prompt(question) + GOOD


# ----------------------------------------------------------------------------------- sampling and labelling


def sample_solutions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[Problem],
    build_prompt: Callable[[str], str],
    sampling: SamplingParams,
    num_solutions: int,
    *,
    seed: int,
    batch_size: int,
    sampler: Sampler = generate,
) -> list[SampledSolution]:
    """``num_solutions`` graded solutions per question, good and bad; samples with no step are dropped."""
    samples = sampler(
        model,
        tokenizer,
        [build_prompt(p.question) for p in questions],
        sampling,
        num_samples=num_solutions,
        seed=seed,
        batch_size=batch_size,
        progress="RCRL: sample solutions",
    )
    solutions = [
        SampledSolution(p, s.text, is_correct(s.text, p.answer), step_prefixes(s.text))
        for p, group in zip(questions, samples, strict=True)
        for s in group
    ]
    kept = [s for s in solutions if s.prefixes]
    if len(kept) < len(solutions):
        log.info("RCRL: dropped %d of %d solutions with no step", len(solutions) - len(kept), len(solutions))
    return kept


def rollout_success_rates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    solutions: Sequence[SampledSolution],
    build_prompt: Callable[[str], str],
    sampling: SamplingParams,
    num_rollouts: int,
    *,
    seed: int,
    batch_size: int,
    sampler: Sampler = generate,
) -> tuple[list[list[float]], int]:
    """reward=sparse: per solution, per step, the fraction of K completions of its prefix that are correct.

    Every non-final prefix is rolled out in one ``generate`` call (prompt = question's prompt + prefix); a prefix
    that several solutions of one question share is rolled out once. Returns the rates and the rollouts drawn.
    """
    problems = {s.problem.id: s.problem for s in solutions}
    keys = list(dict.fromkeys((s.problem.id, prefix) for s in solutions for prefix in s.prefixes[:-1]))
    samples = sampler(
        model,
        tokenizer,
        [build_prompt(problems[pid].question) + prefix for pid, prefix in keys],
        sampling,
        num_samples=num_rollouts,
        seed=seed,
        batch_size=batch_size,
        progress="RCRL: roll out step prefixes",
    )
    # a rollout continues its prefix: the solution it completes is prefix + completion
    correct = {
        (pid, prefix): [is_correct(prefix + c.text, problems[pid].answer) for c in group]
        for (pid, prefix), group in zip(keys, samples, strict=True)
    }
    rates = [
        step_success_rates([correct[(s.problem.id, prefix)] for prefix in s.prefixes[:-1]], s.correct)
        for s in solutions
    ]
    return rates, len(keys) * num_rollouts


def orm_success_rates(
    orm: PrefixScorer, solutions: Sequence[SampledSolution], build_prompt: Callable[[str], str]
) -> list[list[float]]:
    """reward=orm: per solution, per step, the ORM's probability that the prefix leads to a correct answer."""
    scores = iter(
        orm.score_prefixes(
            [build_prompt(s.problem.question) for s in solutions for _ in s.prefixes],
            [prefix for s in solutions for prefix in s.prefixes],
        )
    )
    return [[next(scores) for _ in s.prefixes] for s in solutions]


# ------------------------------------------------------------------------------------------- goal tokens


def add_goal_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int) -> tuple[int, int]:
    """Add [GOOD] and [BAD] to ``tokenizer`` (in place) and grow ``model``'s embeddings; returns their ids.

    They are special added tokens: never split, skipped by ``decode(skip_special_tokens=True)``. ``add_tokens``
    rather than ``add_special_tokens({"additional_special_tokens": ...})`` because the latter's key and its
    replace-or-extend flag differ between transformers 4 and 5. The new embedding rows (and lm_head rows when
    untied) are drawn by transformers' ``mean_resizing`` from N(mean, 1e-9 * cov) of the old rows (Hewitt 2021:
    the new tokens start with average logits, so the policy's distribution barely moves); it draws from the
    global RNG, which we fork and seed. A model whose embedding matrix already has spare rows is not resized.
    """
    tokenizer.add_tokens([GOOD, BAD], special_tokens=True)
    good_id, bad_id = tokenizer.convert_tokens_to_ids([GOOD, BAD])
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return good_id, bad_id


# ----------------------------------------------------------------------------------------------- the loop


def labelled_examples(ctx: RunContext, cfg: RCRLConfig) -> list[tuple[str, str]]:
    """Phases 1-3: (prompt, solution with a goal token opening each step) for every sampled solution."""
    seed = ctx.cfg.seed
    batch_size = ctx.cfg.model.sample_batch_size
    sampling = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens, STOP_STRINGS)

    # 1. the labelling policy: the best EI policy, trained from the same init (ctx.model is left as it is)
    ei_model, ei_tokenizer = ei.trained_policy(ctx, cfg.ei)

    # 2. sample solutions from it, correct and incorrect
    questions = ei.round_questions(training_questions(ctx), cfg.n_questions, seed)
    solutions = sample_solutions(
        ei_model,
        ei_tokenizer,
        questions,
        ctx.build_prompt,
        sampling,
        cfg.num_solutions,
        seed=seed + 1,
        batch_size=batch_size,
        sampler=ctx.sampler,
    )

    # 3. label each step: [GOOD] when its prefix's success rate (rollouts, or the ORM) is >= T
    num_rollouts = 0
    if ctx.cfg.reward.name == RewardName.orm:
        if ctx.orm is None:
            raise RuntimeError("algo=rcrl reward=orm labels steps with the ORM, but the pipeline set no ctx.orm.")
        rates = orm_success_rates(ctx.orm, solutions, ctx.build_prompt)
    else:
        rates, num_rollouts = rollout_success_rates(
            ei_model,
            ei_tokenizer,
            solutions,
            ctx.build_prompt,
            sampling,
            cfg.num_rollouts,
            seed=seed + 2,
            batch_size=batch_size,
            sampler=ctx.sampler,
        )
    del ei_model  # only ctx.model is trained from here on
    labels = [label_steps(r, cfg.threshold) for r in rates]
    num_steps = sum(len(steps) for steps in labels)
    num_good = sum(sum(steps) for steps in labels)
    ctx.tracker.log_metrics(
        {
            "train/rcrl_solutions": len(solutions),
            "train/rcrl_solutions_correct": sum(s.correct for s in solutions) / max(1, len(solutions)),
            "train/rcrl_steps_labelled": num_steps,
            "train/rcrl_fraction_good": num_good / max(1, num_steps),
            "train/rcrl_rollouts": num_rollouts,
        }
    )
    log.info("RCRL: %d solutions, %d/%d steps labelled %s", len(solutions), num_good, num_steps, GOOD)
    return [
        (ctx.build_prompt(s.problem.question), goal_conditioned(s.text, steps))
        for s, steps in zip(solutions, labels, strict=True)
    ]


def run(ctx: RunContext) -> EvalResult | None:
    cfg: RCRLConfig = ctx.cfg.algo  # type: ignore[assignment]
    seed = ctx.cfg.seed
    checkpoints = ctx.checkpoints
    # A resumed run skips what its checkpoint holds: the labelled examples (step 1), the fine-tuned policy (step 2).
    saved = checkpoints.restore() if checkpoints is not None else None
    if saved is not None:
        examples = [(prompt, completion) for prompt, completion in saved.data["examples"]]
    else:
        examples = labelled_examples(ctx, cfg)  # 1.-3.: the labelling policy, its solutions, their step labels
        if checkpoints is not None:
            checkpoints.save(1, {"examples": examples}, {})
    if not examples:
        log.warning("RCRL: no solution with a step to learn from; the policy is unchanged")
        return None

    # 4. goal tokens. A copy of the tokenizer: the EI policy or the ORM may share the original object, and their
    #    embeddings do not grow.
    ctx.tokenizer = copy.deepcopy(ctx.tokenizer)
    _, bad_id = add_goal_tokens(ctx.model, ctx.tokenizer, seed)

    # 5. fine-tune the init policy on goal-conditioned solutions (the goal tokens are targets too)
    if saved is not None and saved.step >= 2:
        saved.load_modules(policy=ctx.model)
    else:
        params = finetune_params(ctx, lr=cfg.lr, epochs=cfg.epochs, max_steps=cfg.max_steps, seed=seed)
        finetune(ctx.model, ctx.tokenizer, examples, params, ctx.tracker, metric_prefix="rcrl")
        if checkpoints is not None:
            checkpoints.save(2, {"examples": examples}, {"policy": ctx.model})

    # 6. condition on [GOOD] at test time: the prompt opens the first step with it, and [BAD] is never sampled;
    #    the ORM (rerank@K) keeps scoring with the plain prompt it was trained on
    ctx.orm_prompt = ctx.build_prompt
    ctx.build_prompt = functools.partial(goal_prompt, build_prompt=ctx.build_prompt)
    ctx.banned_token_ids = (bad_id,)
    return None
