"""Expert Iteration (Havrilla et al. 2024, section 4.1; Anthony et al. 2017; STaR, Zelikman et al. 2022).

Round i = 1 .. algo.rounds:
  1. sample K = algo.num_samples solutions for every training question from pi_{i-1}
  2. grade them with the reward (reward=sparse: the final answer is correct)
  3. keep the good ones and drop duplicates: two solutions of one question are the same when their sequence of
     arithmetic operations is the same (``operation_signature``), or, for solutions with no arithmetic, their text
  4. D_i = R_i ∪ D_{i-1}
  5. fine-tune on D_i with cross-entropy, from the initial checkpoint (``algo.reinit_each_round=true``, the
     paper's and STaR's choice, which avoids overfitting to early rounds) or from pi_{i-1}
  6. evaluate pi_i on the test split: the accuracy-vs-round curve of the paper's figure 2, at step i

Deviations from the paper: K defaults to 4 (the paper's light setting; its table uses 96) and the fine-tuning
budget is ``algo.epochs`` over D_i rather than a tuned number of steps. Only ``reward=sparse`` is available until
the ORM exists (issue 3).

    python main.py algo=ei init=sft model=tiny task=arith
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Mapping, Sequence

from reasoning_rl.algos.sft import finetune
from reasoning_rl.config import EIConfig
from reasoning_rl.evaluation import EvalResult
from reasoning_rl.prompts import STOP_STRINGS
from reasoning_rl.rollout import SamplingParams, generate
from reasoning_rl.run_context import RunContext, evaluate_policy, finetune_params
from reasoning_rl.tasks import Problem, is_correct, operation_signature

log = logging.getLogger(__name__)

Dataset = dict[str, list[str]]  # problem id -> its kept solutions, in the order they were found


def dedupe_key(solution: str) -> tuple[str, ...]:
    """Solutions of one question with the same key are duplicates: the operation sequence, else the text."""
    signature = operation_signature(solution)
    return ("ops", *signature) if signature else ("text", solution.strip())


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


def run(ctx: RunContext) -> EvalResult:
    cfg: EIConfig = ctx.cfg.algo  # type: ignore[assignment]
    seed = ctx.cfg.seed
    initial_state = copy.deepcopy(ctx.model.state_dict()) if cfg.reinit_each_round else None
    problems_by_id = {p.id: p for p in ctx.splits.train}
    dataset: Dataset = {}
    samples_drawn = 0
    finetune_steps = 0
    result = evaluate_policy(ctx, step=0) if cfg.eval_init else None
    sampling = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens, STOP_STRINGS)

    for round_index in range(1, cfg.rounds + 1):
        # 1. sample K solutions per training question from pi_{i-1}
        questions = round_questions(ctx.splits.train, cfg.n_questions, seed + round_index)
        prompts = [ctx.build_prompt(p.question) for p in questions]
        samples = generate(
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

        # 2. grade: the sparse reward is 1 exactly when the final answer is correct
        candidates = {
            p.id: [(s.text, is_correct(s.text, p.answer)) for s in group]
            for p, group in zip(questions, samples, strict=True)
        }
        num_correct = sum(good for graded in candidates.values() for _, good in graded)

        # 3. + 4. filter, dedupe, and accumulate: D_i = R_i ∪ D_{i-1}
        dataset, added = merge_good_solutions(dataset, candidates)
        dataset_size = sum(len(solutions) for solutions in dataset.values())
        ctx.tracker.log_metrics(
            {
                "train/ei_samples_drawn": samples_drawn,
                "train/ei_fraction_correct": num_correct / (len(questions) * cfg.num_samples),
                "train/ei_new_unique_solutions": added,
                "train/ei_dataset_size": dataset_size,
                "train/ei_questions_covered": len(dataset) / len(ctx.splits.train),
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
        if not dataset:
            log.warning(
                "EI round %d: no correct sample yet, so nothing to fine-tune on; the policy is unchanged", round_index
            )
            result = evaluate_policy(ctx, step=round_index)
            continue

        # 5. fine-tune on D_i, from the initial checkpoint or from pi_{i-1}
        if initial_state is not None:
            ctx.model.load_state_dict(initial_state)
        examples = [
            (ctx.build_prompt(problems_by_id[pid].question), solution)
            for pid, solutions in dataset.items()
            for solution in solutions
        ]
        params = finetune_params(ctx, lr=cfg.lr, epochs=cfg.epochs, max_steps=cfg.max_steps, seed=seed + round_index)
        stats = finetune(
            ctx.model, ctx.tokenizer, examples, params, ctx.tracker, metric_prefix="ei", step_offset=finetune_steps
        )
        finetune_steps += int(stats["steps"])  # train/ei_loss is one curve over all rounds

        # 6. evaluate pi_i: one point of the accuracy-vs-round curve
        result = evaluate_policy(ctx, step=round_index)
    assert result is not None  # rounds >= 1, and every round evaluates
    return result
