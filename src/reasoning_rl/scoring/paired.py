"""Two evaluations of the same test problems compared problem by problem: each metric's difference with the standard
error of the paired difference.

Two cells of a table are evaluated on the same fixed test problems, so comparing them problem by problem removes the
problems' own difficulty from the noise: the standard error of the mean paired difference is sd(a_i - b_i) / sqrt(n),
often half the unpaired one. That is how ``docs/results.md`` says whether EI beats its SFT init on SmolLM2.

Each side is a run's ``eval/samples.jsonl`` (every run's artifact) or the per-problem table this writes from one
(``--write-problems``, a few kB: what is kept in ``docs/results/`` so the comparison outlives the run store).

    python -m reasoning_rl.scoring.paired A/eval/samples.jsonl B/eval/samples.jsonl     # A - B
    python -m reasoning_rl.scoring.paired A/eval/samples.jsonl --write-problems docs/results/smollm2/a.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reasoning_rl.scoring.metrics import mean
from reasoning_rl.tasks.answers import answers_match

# What is kept of each problem, in this order (the per-problem table's columns after ``id``).
PROBLEM_METRICS = ("maj_at_1", "maj_at_k", "rerank_at_k", "pass_at_k", "sample_accuracy", "distinct_answers")


def problem_values(record: Mapping[str, Any]) -> dict[str, float]:
    """One problem's values from its evaluation record: maj@1 (the greedy answer), maj@K, rerank@K (NaN when the run
    did not rerank), pass@K, the fraction of correct samples and the number of distinct answers among the samples
    (samples without an answer do not count): a policy that loses diversity has fewer."""
    samples = record["samples"]
    answers = {s["answer"] for s in samples if s["answer"] is not None}
    return {
        "maj_at_1": float(record["greedy"]["correct"]),
        "maj_at_k": float(answers_match(record["majority_answer"], record["answer"])),
        "rerank_at_k": (
            float(answers_match(record["rerank_answer"], record["answer"])) if "rerank_answer" in record else math.nan
        ),
        "pass_at_k": float(any(s["correct"] for s in samples)),
        "sample_accuracy": mean([float(s["correct"]) for s in samples]),
        "distinct_answers": float(len(answers)),
    }


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """The mean of a_i - b_i and its standard error, sd(a_i - b_i) / sqrt(n) with the n - 1 sample SD (NaN for one
    pair)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need two equal, non-empty lists of values, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    diff = sum(diffs) / n
    if n == 1:
        return diff, math.nan
    variance = sum((d - diff) ** 2 for d in diffs) / (n - 1)
    return diff, math.sqrt(variance / n)


def read_problems(path: Path) -> dict[str, dict[str, float]]:
    """Problem id -> its values, from an ``eval/samples.jsonl`` or a per-problem table (.csv) written from one."""
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        missing = set(PROBLEM_METRICS) - set(rows[0] if rows else {})
        if not rows or missing:
            raise ValueError(f"{path}: not a per-problem table written by --write-problems (missing {sorted(missing)})")
        return {row["id"]: {name: float(row[name]) for name in PROBLEM_METRICS} for row in rows}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path}: no evaluation records (expected one JSON object per test problem)")
    return {str(r["id"]): problem_values(r) for r in records}


def write_problems(problems: Mapping[str, Mapping[str, float]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", *PROBLEM_METRICS])
        for problem_id, values in problems.items():
            writer.writerow([problem_id, *(f"{values[name]:.6g}" for name in PROBLEM_METRICS)])


def compare(a: Mapping[str, Mapping[str, float]], b: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Metric -> {a, b, diff, se} over the problems both evaluated; an error unless both evaluated the same problems
    (a paired comparison of different test sets means nothing). Metrics NaN on either side (rerank@K of a run that
    did not rerank) are left out."""
    if set(a) != set(b):
        raise ValueError(
            f"the two evaluations cover different problems ({len(set(a) - set(b))} only in the first, "
            f"{len(set(b) - set(a))} only in the second): compare runs of the same task.n_test and task seed"
        )
    ids = sorted(a)
    table = {}
    for name in PROBLEM_METRICS:
        a_values, b_values = [a[i][name] for i in ids], [b[i][name] for i in ids]
        if any(math.isnan(v) for v in a_values + b_values):
            continue
        diff, se = paired_difference(a_values, b_values)
        table[name] = {"a": mean(a_values), "b": mean(b_values), "diff": diff, "se": se}
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="an eval/samples.jsonl or per-problem .csv")
    parser.add_argument("b", type=Path, nargs="?", help="the one to subtract (same problems)")
    parser.add_argument("--write-problems", type=Path, help="write A's per-problem table (.csv) here")
    args = parser.parse_args(argv)
    if args.b is None and args.write_problems is None:
        parser.error("give a second evaluation to compare with, or --write-problems")
    try:
        a = read_problems(args.a)
        if args.write_problems:
            write_problems(a, args.write_problems)
            print(f"wrote {len(a)} problems to {args.write_problems}")
        if args.b is None:
            return 0
        table = compare(a, read_problems(args.b))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        print(f"error: {args.a} / {args.b}: {error!r}. Give two eval/samples.jsonl files or per-problem tables.",
              file=sys.stderr)  # fmt: skip
        return 2
    print(f"| metric | A: {args.a} | B: {args.b} | A - B | SE | z |")
    print("|---|---|---|---|---|---|")
    for name, row in table.items():
        z = row["diff"] / row["se"] if row["se"] > 0 else math.nan
        print(f"| {name} | {row['a']:.3f} | {row['b']:.3f} | {row['diff']:+.3f} | {row['se']:.3f} | {z:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
