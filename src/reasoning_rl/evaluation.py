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
from reasoning_rl.metrics import majority_vote, mean, pass_at_k, pass_at_k_ladder, rerank_pick
from reasoning_rl.prompts import STOP_STRINGS
from reasoning_rl.rollout import SamplingParams, generate
from reasoning_rl.tasks import Problem, answers_match, canonical_answer, extract_answer


class Reranker(Protocol):
    """Scores complete solutions (higher = more likely correct); the ORM implements it."""

    def score(self, prompts: Sequence[str], completions: Sequence[Sequence[str]]) -> list[list[float]]: ...


@dataclass
class EvalResult:
    metrics: dict[str, float]  # eval/... metric name -> value
    records: list[dict]  # one per problem: its samples, answers and correctness


def voted_answer(completion: str) -> str | None:
    """The canonical final answer of a completion, or None when it has none; what majority voting counts."""
    answer = extract_answer(completion)
    if answer is None:
        return None
    return canonical_answer(answer)


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
) -> EvalResult:
    prompts = [build_prompt(p.question) for p in problems]
    greedy = generate(
        model,
        tokenizer,
        prompts,
        SamplingParams(0.0, 1.0, cfg.max_new_tokens, STOP_STRINGS, banned_token_ids),
        num_samples=1,
        seed=seed,
        batch_size=batch_size,
        progress="eval greedy" if progress else None,
    )
    sampled = generate(
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

    ks = pass_at_k_ladder(cfg.k)
    per_metric: dict[str, list[float]] = {"maj_at_1": [], "maj_at_k": [], "pass_at_k": [], "sample_accuracy": []}
    per_metric.update({f"pass_at_{k}_unbiased": [] for k in ks})
    if scores is not None:
        per_metric["rerank_at_k"] = []
    lengths: list[float] = []
    records = []
    for i, problem in enumerate(problems):
        greedy_text = greedy[i][0].text
        greedy_answer = voted_answer(greedy_text)
        sample_texts = [s.text for s in sampled[i]]
        sample_answers = [voted_answer(t) for t in sample_texts]
        sample_correct = [answers_match(a, problem.answer) for a in sample_answers]
        majority = majority_vote(sample_answers)
        num_correct = sum(sample_correct)
        per_metric["maj_at_1"].append(float(answers_match(greedy_answer, problem.answer)))
        per_metric["maj_at_k"].append(float(answers_match(majority, problem.answer)))
        per_metric["pass_at_k"].append(float(num_correct > 0))
        per_metric["sample_accuracy"].append(num_correct / cfg.k)
        for k in ks:
            per_metric[f"pass_at_{k}_unbiased"].append(pass_at_k(cfg.k, num_correct, k))
        record = {
            "id": problem.id,
            "question": problem.question,
            "answer": problem.answer,
            "greedy": {
                "text": greedy_text,
                "answer": greedy_answer,
                "correct": bool(per_metric["maj_at_1"][-1]),
            },
            "samples": [
                {"text": t, "answer": a, "correct": c, "num_tokens": len(s.token_ids), "finish_reason": s.finish_reason}
                for t, a, c, s in zip(sample_texts, sample_answers, sample_correct, sampled[i], strict=True)
            ],
            "majority_answer": majority,
        }
        if scores is not None:
            picked = rerank_pick(sample_answers, scores[i])
            per_metric["rerank_at_k"].append(float(answers_match(picked, problem.answer)))
            record["rerank_answer"] = picked
            for sample, score in zip(record["samples"], scores[i], strict=True):
                sample["score"] = score
        lengths.extend(len(s.token_ids) for s in sampled[i])
        records.append(record)

    metrics = {f"eval/{name}": mean(values) for name, values in per_metric.items()}
    metrics["eval/mean_completion_tokens"] = mean(lengths)
    metrics["eval/num_problems"] = float(len(problems))
    return EvalResult(metrics, records)


def write_records(records: Sequence[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path
