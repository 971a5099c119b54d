"""What tells a question's correct samples from its wrong ones, and whether the ORM's scores see it.

Reranking picks among the K samples of one question, so an ORM helps only if it orders those samples (issue 19
point 6). On SmolLM2 the ORM's pooled held-out AUC was 0.79, yet its rerank@16 fell below a random pick: this reads an
evaluation's per-problem records (``eval/samples.jsonl``, every run's artifact, with the ORM's score per sample) and
measures why, beside a check that needs no model: whether every calculator annotation's result is its expression's
value (``<<44-34=8>>`` is a slip). Nothing here changes a run; it diagnoses finished ones.

    python -m reasoning_rl.scoring.orm_diagnosis results/multirun/smollm2_sft_seeds/0/eval/samples.jsonl [...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reasoning_rl.scoring.metrics import majority_vote, mean, within_question_auc
from reasoning_rl.tasks.answers import answers_match, check_annotation, parse_annotations

Record = Mapping[str, Any]  # one line of eval/samples.jsonl: answer, majority_answer, rerank_answer, samples


def arithmetic_is_consistent(solution: str) -> bool:
    """Whether every calculator annotation ``<<expr=result>>`` of ``solution`` states its expression's value (a
    solution with none is consistent)."""
    return all(check_annotation(expr, result) for expr, result in parse_annotations(solution))


def checked_vote(samples: Sequence[Mapping[str, Any]]) -> str | None:
    """The majority answer among the samples whose arithmetic is consistent (among all of them when none is): a
    reranker with a calculator and no model."""
    consistent = [s["answer"] for s in samples if arithmetic_is_consistent(s["text"])]
    return majority_vote(consistent or [s["answer"] for s in samples])


def diagnose(records: Sequence[Record]) -> dict[str, float]:
    """The diagnosis of one evaluation (records with ``score`` on each sample, i.e. an ORM reranked):

    - ``slip_rate_wrong`` / ``slip_rate_correct``: the fraction of wrong / correct samples with a wrong annotation;
    - ``orm_within_auc`` and ``check_within_auc``: how often a question's correct sample outranks its wrong one, by
      the ORM's score and by the arithmetic check (1 consistent, 0 not; ties 1/2), over ``pairs`` such pairs;
    - ``orm_within_sd`` / ``orm_between_sd``: the ORM scores' spread inside a question (mean over questions of the
      standard deviation of its K scores) against the spread of the questions' mean scores: an ORM that has learnt
      which questions are hard, not which samples are right, has the first far below the second;
    - ``maj_at_k``, ``orm_rerank_at_k``, ``checked_vote_at_k``, ``pass_at_k``: the answers each pick gets right.
    """
    samples = [s for r in records for s in r["samples"]]
    wrong = [s for s in samples if not s["correct"]]
    correct = [s for s in samples if s["correct"]]
    slips = {id(s): not arithmetic_is_consistent(s["text"]) for s in samples}
    orm_auc, pairs = within_question_auc([([s["score"] for s in r["samples"]], [s["correct"] for s in r["samples"]])
                                          for r in records])  # fmt: skip
    check_auc, _ = within_question_auc(
        [([float(not slips[id(s)]) for s in r["samples"]], [s["correct"] for s in r["samples"]]) for r in records]
    )
    return {
        "problems": len(records),
        "samples": len(samples),
        "slip_rate_wrong": mean([float(slips[id(s)]) for s in wrong]),
        "slip_rate_correct": mean([float(slips[id(s)]) for s in correct]),
        "pairs": pairs,
        "orm_within_auc": orm_auc,
        "check_within_auc": check_auc,
        "orm_within_sd": mean([statistics.pstdev([s["score"] for s in r["samples"]]) for r in records]),
        "orm_between_sd": statistics.pstdev([mean([s["score"] for s in r["samples"]]) for r in records]),
        "maj_at_k": mean([float(answers_match(r["majority_answer"], r["answer"])) for r in records]),
        "orm_rerank_at_k": mean([float(answers_match(r["rerank_answer"], r["answer"])) for r in records]),
        "checked_vote_at_k": mean([float(answers_match(checked_vote(r["samples"]), r["answer"])) for r in records]),
        "pass_at_k": mean([float(any(s["correct"] for s in r["samples"])) for r in records]),
    }


def read_records(path: Path) -> list[Record]:
    """The records of one eval/samples.jsonl; a clear error when it has no ORM scores (the run did not rerank)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records or any("score" not in s for r in records for s in r["samples"]):
        raise ValueError(
            f"{path}: no ORM score on every sample. This reads the eval/samples.jsonl of a run that reranked "
            "(reward=orm / orm_dense, or orm.rerank=true), as the smollm2_135m scale does."
        )
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", type=Path, nargs="+", help="eval/samples.jsonl files (one column each)")
    args = parser.parse_args(argv)
    try:
        columns = [diagnose(read_records(path)) for path in args.samples]
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("| | " + " | ".join(str(p) for p in args.samples) + " |")
    print("|---|" + "---|" * len(columns))
    for name in columns[0]:
        values = [c[name] for c in columns]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in values) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
