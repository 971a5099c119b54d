"""Expert Iteration (Havrilla et al. 2024, section 4.1; Anthony et al. 2017; STaR, Zelikman et al. 2022).

Round i = 1 .. algo.rounds:
  1. sample K = algo.num_samples solutions for every training question from pi_{i-1}
  2. grade them with the reward: reward=sparse keeps a sample whose final answer is correct; ORM EI (reward=orm)
     one whose ORM score is >= algo.orm_threshold, reward=orm_dense one whose lowest score after any step is, and
     algo.orm_filter=orm_and_correct asks for a correct final answer as well (the paper does not give its rule)
  3. keep the good ones and drop duplicates: two solutions of one question are the same when their sequence of
     arithmetic operations is the same (``operation_signature``), their calculator results and their final answer
     too (``dedupe_key``), or, for solutions with no arithmetic, their text
  4. D_i = R_i ∪ D_{i-1}
  5. fine-tune on D_i with cross-entropy, from the initial checkpoint (``algo.reinit_each_round=true``, the
     paper's and STaR's choice, which avoids overfitting to early rounds) or from pi_{i-1}
  6. evaluate pi_i on the test split: the accuracy-vs-round curve of the paper's figure 2, at step i (every
     ``algo.eval_every`` rounds and after the last; a table cell sets 0: only the final policy is evaluated)
  7. checkpoint pi_i, D_i and the counters (``run/checkpointing.py``): a killed run resumes at round i + 1 (the
     last round is checkpointed before its evaluation, so a run killed while evaluating only evaluates again)

Deviations from the paper: K defaults to 4 (the paper's light setting; its table uses 96) and the fine-tuning
budget is ``algo.epochs`` over D_i rather than a tuned number of steps.

    python main.py algo=ei init=sft model=tiny task=arith
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reasoning_rl.algos.context import RunContext, evaluate_policy, finetune_params, training_questions
from reasoning_rl.config import EIConfig, ExperimentConfig, ORMFilter, RewardConfig, RewardName
from reasoning_rl.models.loading import load_checkpoint, save_checkpoint
from reasoning_rl.rollout.sampler import Sample, SamplingParams
from reasoning_rl.run.checkpointing import Checkpointer, stop_if_not_finite
from reasoning_rl.run.stages import cached_stage, init_stage_inputs, plain, sampler_stage_inputs
from reasoning_rl.scoring.evaluation import EvalResult
from reasoning_rl.scoring.metrics import mean
from reasoning_rl.tasks import Problem, is_correct, operation_signature
from reasoning_rl.tasks.answers import canonical_answer, extract_answer, format_number, intermediate_results
from reasoning_rl.tasks.prompts import STOP_STRINGS
from reasoning_rl.training.finetune import finetune

log = logging.getLogger(__name__)

Dataset = dict[str, list[str]]  # problem id -> its kept solutions, in the order they were found
Graded = dict[str, list[tuple[str, bool, bool]]]  # problem id -> (sample text, kept by the reward, correct)


def dedupe_key(solution: str) -> tuple[str, ...]:
    """Solutions of one question with the same key are duplicates: the operation sequence with the results the
    solution wrote for them and its final answer, else (no arithmetic) the text.

    The results and the answer are part of the key because a sampled solution need not compute what it writes:
    ``5+3=<<5+3=9>>9`` performs the operations of the correct ``5+3=<<5+3=8>>8``, and under ORM filtering a wrong
    solution kept first would otherwise block the correct one in every later round.
    """
    signature = operation_signature(solution)
    if not signature:
        return ("text", solution.strip())
    results = tuple(format_number(value) for value in intermediate_results(solution))
    return ("ops", *signature, "results", *results, "answer", canonical_answer(extract_answer(solution)))


def merge_good_solutions(
    dataset: Mapping[str, Sequence[str]], candidates: Mapping[str, Sequence[tuple[str, bool]]]
) -> tuple[Dataset, int]:
    """D_i = R_i ∪ D_{i-1}: add each good candidate whose dedupe key is new for its question.

    ``candidates`` maps a problem id to (solution, is_good) pairs. Returns the new dataset and how many solutions
    were added. The input dataset is not modified.
    """
    merged: Dataset = {pid: list(solutions) for pid, solutions in dataset.items()}
    added = 0
    for pid, graded in candidates.items():
        kept = merged.setdefault(pid, [])
        seen = {dedupe_key(s) for s in kept}
        for solution, good in graded:
            key = dedupe_key(solution)
            if good and key not in seen:
                kept.append(solution)
                seen.add(key)
                added += 1
        if not kept:
            del merged[pid]
    return merged, added


def round_questions(train: Sequence[Problem], n_questions: int | None, seed: int) -> list[Problem]:
    """The training questions of one round: all of them, or a seeded draw of n_questions."""
    if n_questions is None or n_questions >= len(train):
        return list(train)
    return random.Random(seed).sample(list(train), n_questions)


def orm_keep(scores: Sequence[float], correct: Sequence[bool], threshold: float, rule: ORMFilter) -> list[bool]:
    """ORM EI's filter: a score >= threshold, and a correct final answer too under ``orm_and_correct``."""
    return [score >= threshold and (ok or rule == ORMFilter.orm) for score, ok in zip(scores, correct, strict=True)]


def grade(ctx: RunContext, cfg: EIConfig, questions: Sequence[Problem], samples: Sequence[Sequence[Sample]]) -> Graded:
    """Step 2: for each question, its samples as (text, kept by the reward, final answer correct)."""
    correct = [[is_correct(s.text, p.answer) for s in group] for p, group in zip(questions, samples, strict=True)]
    keep = correct
    if ctx.cfg.reward.name in (RewardName.orm, RewardName.orm_dense):
        assert ctx.orm is not None  # the pipeline loads it for these rewards
        prompts = [ctx.build_prompt(p.question) for p, group in zip(questions, samples, strict=True) for _ in group]
        texts = [s.text for group in samples for s in group]
        dense = ctx.cfg.reward.name == RewardName.orm_dense
        flat = ctx.orm.min_step_scores(prompts, texts) if dense else ctx.orm.score_prefixes(prompts, texts)
        kept = iter(orm_keep(flat, [c for cs in correct for c in cs], cfg.orm_threshold, cfg.orm_filter))
        keep = [[next(kept) for _ in group] for group in samples]
    return {
        p.id: [(s.text, k, c) for s, k, c in zip(group, ks, cs, strict=True)]
        for p, group, ks, cs in zip(questions, samples, keep, correct, strict=True)
    }


def run(ctx: RunContext) -> EvalResult:
    """algo=ei: train in place, evaluating after every round. The EI row (reward=sparse) then publishes its policy
    as the ``ei_policy`` stage, which RCRL's labeller with the same EI settings reuses instead of training again."""
    cfg: EIConfig = ctx.cfg.algo  # type: ignore[assignment]
    result = expert_iteration(ctx, cfg, evaluate_rounds=True, checkpoints=ctx.checkpoints)
    assert result is not None
    if ctx.cfg.reward.name == RewardName.sparse:
        cached_stage(
            Path(ctx.cfg.cache_dir),
            "ei_policy",
            ei_policy_inputs(ctx.cfg, cfg, ctx.splits.train),
            lambda directory: save_checkpoint(ctx.model, ctx.tokenizer, directory / "model"),
            ctx.tracker,
        )
    return result


# The EIConfig fields that say when the policy is evaluated, not what it trains: left out of the ei_policy stage's key
EVALUATION_FIELDS = ("eval_init", "eval_every")


def ei_policy_inputs(run_cfg: ExperimentConfig, cfg: EIConfig, train: Sequence[Problem]) -> dict[str, object]:
    """What determines the EI row's final policy: the init, the EI settings (whether it evaluates does not
    change what it trains), the sampler's batch size and the ground-truth reward."""
    return {
        **init_stage_inputs(run_cfg, train),
        "sample_batch_size": run_cfg.model.sample_batch_size,
        **sampler_stage_inputs(run_cfg),
        "reward": RewardConfig(name=RewardName.sparse),
        "ei": {k: v for k, v in plain(cfg).items() if k not in EVALUATION_FIELDS},
    }


def trained_policy(ctx: RunContext, cfg: EIConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The EI row's policy: what ``algo=ei reward=sparse`` with the settings ``cfg`` trains from this run's init
    (RCRL's labelling policy, "the best EI policy"); ctx.model is untouched.

    A cached stage ("ei_policy"), shared with that EI run (whichever comes first computes it). The labeller is the
    ground-truth EI policy whatever this run's reward: ORM RCRL consults the ORM for its labels only.
    """
    run_cfg = ctx.cfg

    def build(directory: Path) -> None:
        sparse_cfg = dataclasses.replace(run_cfg, reward=RewardConfig(name=RewardName.sparse))
        policy = dataclasses.replace(ctx, cfg=sparse_cfg, model=copy.deepcopy(ctx.model), orm=None, checkpoints=None)
        expert_iteration(policy, cfg, evaluate_rounds=False)
        save_checkpoint(policy.model, policy.tokenizer, directory / "model")

    inputs = ei_policy_inputs(run_cfg, cfg, ctx.splits.train)
    stage = cached_stage(Path(run_cfg.cache_dir), "ei_policy", inputs, build, ctx.tracker)
    return load_checkpoint(stage.path / "model", ctx.device)


def expert_iteration(
    ctx: RunContext, cfg: EIConfig, *, evaluate_rounds: bool, checkpoints: Checkpointer | None = None
) -> EvalResult | None:
    """Rounds 1..cfg.rounds on ctx.model, in place; the last evaluation when ``evaluate_rounds``.

    With ``checkpoints``, the state after every round is saved, and a resumed run continues after its last one.
    """
    seed = ctx.cfg.seed
    initial_state = copy.deepcopy(ctx.model.state_dict()) if cfg.reinit_each_round else None
    pool = training_questions(ctx)  # all of them, less the ORM's own under ORM EI (orm.disjoint)
    problems_by_id = {p.id: p for p in pool}
    dataset: Dataset = {}
    samples_drawn = 0
    finetune_steps = 0
    first_round = 1
    saved = checkpoints.restore() if checkpoints is not None else None
    if saved is not None:  # resume after the last completed round: pi_i, D_i and the counters
        saved.load_modules(policy=ctx.model)
        first_round = saved.step + 1
        dataset, samples_drawn, finetune_steps = (saved.data[k] for k in ("dataset", "samples_drawn", "finetune_steps"))
    elif cfg.eval_init and evaluate_rounds:
        evaluate_policy(ctx, step=0)
    sampling = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens, STOP_STRINGS)

    data_parallel = ctx.data_parallel
    for round_index in range(first_round, cfg.rounds + 1):
        # 1. sample K solutions per training question from pi_{i-1} (each rank: its shard of the questions)
        questions = round_questions(pool, cfg.n_questions, seed + round_index)
        rank_questions = data_parallel.shard(questions)
        prompts = [ctx.build_prompt(p.question) for p in rank_questions]
        samples = ctx.sampler(
            ctx.model,
            ctx.tokenizer,
            prompts,
            sampling,
            num_samples=cfg.num_samples,
            seed=seed + 1000 * round_index,
            batch_size=ctx.cfg.model.sample_batch_size,
            progress=f"EI round {round_index}: sample",
        )
        samples_drawn += len(questions) * cfg.num_samples

        # 2. grade with the reward (every rank then holds every question's grades, in the same order)
        graded = dict(data_parallel.gather(list(grade(ctx, cfg, rank_questions, samples).items())))
        candidates = {pid: [(text, keep) for text, keep, _ in rows] for pid, rows in graded.items()}
        num_correct = sum(correct for rows in graded.values() for _, _, correct in rows)
        kept = [correct for rows in graded.values() for _, keep, correct in rows if keep]

        # 3. + 4. filter, dedupe, and accumulate: D_i = R_i ∪ D_{i-1}
        dataset, added = merge_good_solutions(dataset, candidates)
        dataset_size = sum(len(solutions) for solutions in dataset.values())
        ctx.tracker.log_metrics(
            {
                "train/ei_samples_drawn": samples_drawn,
                "train/ei_fraction_correct": num_correct / (len(questions) * cfg.num_samples),
                "train/ei_fraction_kept": len(kept) / (len(questions) * cfg.num_samples),
                "train/ei_kept_precision": mean(kept),  # kept samples that are correct (< 1 only for ORM EI)
                "train/ei_new_unique_solutions": added,
                "train/ei_dataset_size": dataset_size,
                "train/ei_questions_covered": len(dataset) / len(pool),
            },
            step=round_index,
        )
        log.info(
            "EI round %d: %d/%d samples correct, %d new unique, |D|=%d",
            round_index,
            num_correct,
            len(questions) * cfg.num_samples,
            added,
            dataset_size,
        )
        if dataset:
            # 5. fine-tune on D_i, from the initial checkpoint or from pi_{i-1}
            if initial_state is not None:
                ctx.model.load_state_dict(initial_state)
            examples = [
                (ctx.build_prompt(problems_by_id[pid].question), solution)
                for pid, solutions in dataset.items()
                for solution in solutions
            ]
            params = finetune_params(
                ctx, lr=cfg.lr, epochs=cfg.epochs, max_steps=cfg.max_steps, seed=seed + round_index
            )
            with stop_if_not_finite(f"EI round {round_index}", checkpoints):  # a NaN loss names the round
                stats = finetune(
                    ctx.model,
                    ctx.tokenizer,
                    examples,
                    params,
                    ctx.tracker,
                    metric_prefix="ei",
                    step_offset=finetune_steps,
                    data_parallel=data_parallel,
                )
            finetune_steps += int(stats["steps"])  # train/ei_loss is one curve over all rounds
        else:  # an empty round (no good sample yet) is not an error: the next round samples again
            log.warning("EI round %d: no sample kept yet, nothing to fine-tune on; policy unchanged", round_index)

        # 6. evaluate pi_i: one point of the accuracy-vs-round curve, every algo.eval_every rounds (the last round's
        #    evaluation follows its checkpoint, below)
        if evaluate_rounds and cfg.eval_every and round_index % cfg.eval_every == 0 and round_index < cfg.rounds:
            evaluate_policy(ctx, step=round_index)

        # 7. checkpoint: a run killed from here on resumes at round i + 1
        if checkpoints is not None:
            state = {"dataset": dataset, "samples_drawn": samples_drawn, "finetune_steps": finetune_steps}
            checkpoints.save(round_index, state, {"policy": ctx.model})
    # the final policy, evaluated after its checkpoint: a run killed while evaluating (~30 min on SmolLM2) resumes
    # after the last round and only evaluates again
    return evaluate_policy(ctx, step=cfg.rounds) if evaluate_rounds else None
