"""Evaluation on a task's test split (paper section 3, "Evaluation").

For every test problem: one greedy sample (maj@1) and K samples at temperature T, from which come maj@K
(majority vote over extracted final answers), pass@K (any sample correct), the unbiased pass@k estimator for
k = 1, 2, 4, ... K, rerank@K (the answer of the sample a :class:`Reranker` scores highest, filled once an ORM
exists) and the mean completion length. Every sample goes to a jsonl file for inspection.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reasoning_rl.config import EvalConfig
from reasoning_rl.rollout.native import generate
from reasoning_rl.rollout.sampler import Sample, Sampler, SamplingParams
from reasoning_rl.scoring.metrics import (
    majority_vote,
    mean,
    pass_at_k,
    pass_at_k_ladder,
    rerank_pick,
    within_question_auc,
)
from reasoning_rl.tasks import Problem, answers_match, canonical_answer, extract_answer
from reasoning_rl.tasks.prompts import STOP_STRINGS
from reasoning_rl.training.distributed import SINGLE, DataParallel


class Reranker(Protocol):
    """Scores complete solutions (higher = more likely correct); the ORM implements it."""

    def score(self, prompts: Sequence[str], completions: Sequence[Sequence[str]]) -> list[list[float]]: ...


@dataclass
class EvalResult:
    metrics: dict[str, float]  # eval/... metric name -> value
    records: list[dict]  # one per problem: its samples, answers and correctness


def voted_answer(completion: str) -> str | None:
    """The canonical final answer of a completion, or None when it has none; what majority voting counts. An answer
    that normalises to nothing ("#### ." gives "") is None too: it would otherwise out-vote a correct answer."""
    answer = extract_answer(completion)
    if answer is None:
        return None
    return canonical_answer(answer) or None


def metric_names(k: int, *, reranked: bool) -> list[str]:
    """The per-problem metrics :func:`score_problem` returns for K = ``k`` samples (``rerank_at_k`` with scores)."""
    names = ["maj_at_1", "maj_at_k", "pass_at_k", "sample_accuracy"]
    names += [f"pass_at_{j}_unbiased" for j in pass_at_k_ladder(k)]
    return [*names, *(["rerank_at_k", "rerank_gain"] if reranked else []), "mean_completion_tokens"]


def score_problem(
    problem: Problem, greedy_text: str, samples: Sequence[Sample], scores: Sequence[float] | None = None
) -> tuple[dict[str, float], dict]:
    """One problem's metric values (see :func:`metric_names`) and its record, from its greedy completion, its K
    samples and, when reranking, one score per sample. Pure: no model, so it is tested on hand-made completions.

    maj@1 grades the greedy answer; maj@K the majority vote over the samples' answers (samples without one do not
    vote); pass@K is whether any sample is correct; ``pass_at_{j}_unbiased`` the estimator of pass@j from the
    K samples' correct count (Chen et al. 2021); rerank@K grades the answer of the highest-scored sample, and
    rerank_gain is that minus sample_accuracy (what a random pick among the K gets: the reranker's own worth);
    sample_accuracy is the fraction of correct samples; mean_completion_tokens their mean length in tokens.
    """
    greedy_answer = voted_answer(greedy_text)
    sample_answers = [voted_answer(s.text) for s in samples]
    sample_correct = [answers_match(a, problem.answer) for a in sample_answers]
    majority = majority_vote(sample_answers)
    num_correct = sum(sample_correct)
    finish_reasons = [s.finish_reason for s in samples]
    values = {
        "maj_at_1": float(answers_match(greedy_answer, problem.answer)),
        "maj_at_k": float(answers_match(majority, problem.answer)),
        "pass_at_k": float(num_correct > 0),
        "sample_accuracy": num_correct / len(samples),
    }
    for k in pass_at_k_ladder(len(samples)):
        values[f"pass_at_{k}_unbiased"] = pass_at_k(len(samples), num_correct, k)
    record = {
        "id": problem.id,
        "question": problem.question,
        "answer": problem.answer,
        "greedy": {"text": greedy_text, "answer": greedy_answer, "correct": bool(values["maj_at_1"])},
        "samples": [
            {"text": s.text, "answer": a, "correct": c, "num_tokens": len(s.token_ids), "finish_reason": reason}
            for s, a, c, reason in zip(samples, sample_answers, sample_correct, finish_reasons, strict=True)
        ],
        "majority_answer": majority,
    }
    if scores is not None:
        picked = rerank_pick(sample_answers, scores)
        values["rerank_at_k"] = float(answers_match(picked, problem.answer))
        values["rerank_gain"] = values["rerank_at_k"] - values["sample_accuracy"]
        record["rerank_answer"] = picked
        for sample, score in zip(record["samples"], scores, strict=True):
            sample["score"] = score
    values["mean_completion_tokens"] = mean([len(s.token_ids) for s in samples])
    return values, record


def summarize(per_problem: Sequence[dict[str, float]], names: Sequence[str]) -> dict[str, float]:
    """The eval/ metrics: each per-problem value averaged over the problems (NaN when there are none), and the
    problem count. Every problem has K samples, so the mean of per-problem mean lengths is the mean over samples."""
    metrics = {f"eval/{name}": mean([values[name] for values in per_problem]) for name in names}
    metrics["eval/num_problems"] = float(len(per_problem))
    return metrics


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    build_prompt: Callable[[str], str],
    cfg: EvalConfig,
    *,
    seed: int,
    batch_size: int,
    reranker: Reranker | None = None,
    orm_prompt: Callable[[str], str] | None = None,
    banned_token_ids: tuple[int, ...] = (),
    progress: bool = True,
    sampler: Sampler = generate,
    data_parallel: DataParallel = SINGLE,
) -> EvalResult:
    """Greedy and K sampled solutions of every problem, their metrics and per-problem records.

    ``data_parallel``: each rank samples and scores its shard of the problems; the metrics and records are of all
    of them, on every rank."""
    problems = data_parallel.shard(problems)
    prompts = [build_prompt(p.question) for p in problems]
    greedy = sampler(
        model,
        tokenizer,
        prompts,
        SamplingParams(0.0, 1.0, cfg.max_new_tokens, STOP_STRINGS, banned_token_ids),
        num_samples=1,
        seed=seed,
        batch_size=batch_size,
        progress="eval greedy" if progress else None,
    )
    sampled = sampler(
        model,
        tokenizer,
        prompts,
        SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens, STOP_STRINGS, banned_token_ids),
        num_samples=cfg.k,
        seed=seed + 1,
        batch_size=batch_size,
        progress=f"eval K={cfg.k}" if progress else None,
    )
    scores = None
    if reranker is not None:
        orm_prompts = [orm_prompt(p.question) for p in problems] if orm_prompt else prompts
        scores = reranker.score(orm_prompts, [[s.text for s in group] for group in sampled])

    local = []
    for i, problem in enumerate(problems):
        problem_scores = None if scores is None else scores[i]
        values, record = score_problem(problem, greedy[i][0].text, sampled[i], problem_scores)
        local.append((values, record, problem_scores))
    gathered = data_parallel.gather(local)  # every problem's, in their order, on every rank
    records = [record for _, record, _ in gathered]
    metrics = summarize([values for values, _, _ in gathered], metric_names(cfg.k, reranked=reranker is not None))
    if reranker is not None:  # the ranking reranking needs: a question's correct samples above its wrong ones
        groups = [(group, [s["correct"] for s in record["samples"]]) for _, record, group in gathered]
        auc, pairs = within_question_auc(groups)
        metrics.update({"eval/orm_within_auc": auc, "eval/orm_within_pairs": float(pairs)} if pairs else {})
    return EvalResult(metrics, records)


def write_records(records: Sequence[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path
