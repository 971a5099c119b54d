"""Evaluation's values: maj@1, maj@K, pass@K, the unbiased pass@k ladder, rerank@K, sample accuracy and completion
length, worked by hand on hand-made completions (``score_problem``, ``summarize``); then ``evaluate`` itself on a
tiny model, whose metrics must be what those pure functions give on its own records."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from reasoning_rl.config import EvalConfig, ModelConfig, ModelSource
from reasoning_rl.models.loading import build_tiny_model, build_tiny_tokenizer
from reasoning_rl.rollout.native import generate
from reasoning_rl.rollout.sampler import Sample, SamplingParams
from reasoning_rl.scoring.evaluation import evaluate, metric_names, score_problem, summarize, voted_answer
from reasoning_rl.scoring.metrics import within_question_auc
from reasoning_rl.tasks import Problem
from reasoning_rl.tasks.prompts import STOP_STRINGS, build_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

SIX = Problem(id="t/0", question="What is 2*3?", reference="2*3=<<2*3=6>>6\n#### 6", answer="6", steps=("2*3=6",))


def sample(text: str, num_tokens: int = 1, finish_reason: str = "eos") -> Sample:
    """A hand-made completion: only its text, its token count and its finish reason are read."""
    return Sample(token_ids=[0] * num_tokens, text=text, logprobs=[0.0] * num_tokens, finish_reason=finish_reason)


def values_of(greedy: str, texts: Sequence[str], scores: Sequence[float] | None = None) -> dict[str, float]:
    return score_problem(SIX, greedy, [sample(t) for t in texts], scores)[0]


# ------------------------------------------------------------------------------------------ per problem


def test_voted_answer_is_the_canonical_answer_or_none():
    assert voted_answer("2*3=6\n#### 6.00") == "6"  # "6.00", "$6" and "6" are one answer
    assert voted_answer("so it is $6.") == "6"  # no "####": the last number
    assert voted_answer("no idea") is None
    assert voted_answer("#### .") is None  # normalises to "": no answer, not an answer ""


def test_maj_at_1_grades_the_greedy_completion_and_nothing_else():
    right, wrong = "2*3=6\n#### 6", "#### 7"
    assert values_of(right, [wrong, wrong])["maj_at_1"] == 1.0
    assert values_of(wrong, [right, right])["maj_at_1"] == 0.0
    assert values_of(wrong, [right, right])["maj_at_k"] == 1.0  # the samples are graded apart from the greedy one


def test_maj_at_k_votes_over_canonical_answers():
    # canonical answers 7, 7, 6, 6, 6: "6" wins 3 to 2. Counted as raw strings ("#### 6.00", "#### $6", "6.") it would
    # lose 1-1-1 to the two "7"s.
    assert values_of("", ["#### 7", "#### 7", "#### 6.00", "#### $6", "The answer is 6."])["maj_at_k"] == 1.0
    # 6, 7, 7: "7" wins 2 to 1, so maj@K is 0 although one sample is right (pass@K is 1)
    split = values_of("", ["#### 6", "#### 7", "#### 7"])
    assert (split["maj_at_k"], split["pass_at_k"]) == (0.0, 1.0)


def test_maj_at_k_ties_go_to_the_answer_seen_first():
    # two votes each for 6 and 7: the first sample's answer wins
    assert values_of("", ["#### 6", "#### 7", "#### 7", "#### 6"])["maj_at_k"] == 1.0
    assert values_of("", ["#### 7", "#### 6", "#### 6", "#### 7"])["maj_at_k"] == 0.0


def test_samples_without_an_answer_do_not_vote():
    # two samples have no answer and one empty answer ("#### ." normalises to ""): the one "6" is the majority
    assert values_of("", ["no answer", "#### 6", "still none", "#### .", "#### ."])["maj_at_k"] == 1.0
    nothing = values_of("", ["no answer", "#### ."])  # nobody voted: no majority answer, no credit
    assert (nothing["maj_at_k"], nothing["pass_at_k"], nothing["sample_accuracy"]) == (0.0, 0.0, 0.0)


def test_pass_at_k_sample_accuracy_and_the_unbiased_ladder_with_one_of_four_correct():
    values = values_of("", ["#### 7", "#### 6", "#### 8", "none"])  # n = 4 samples, c = 1 correct
    assert values["pass_at_k"] == 1.0  # any correct
    assert values["sample_accuracy"] == 0.25  # 1 / 4
    assert values["pass_at_1_unbiased"] == pytest.approx(0.25)  # 1 - C(3,1)/C(4,1) = 1 - 3/4
    assert values["pass_at_2_unbiased"] == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert values["pass_at_4_unbiased"] == 1.0  # n - c = 3 < k = 4: every 4-subset holds the correct one
    assert "pass_at_3_unbiased" not in values  # the ladder is 1, 2, 4 for K = 4


def test_the_ladder_for_k_3_with_two_correct():
    values = values_of("", ["#### 6", "#### 1", "#### 6"])  # n = 3, c = 2; ladder 1, 2, 3
    assert values["pass_at_1_unbiased"] == pytest.approx(2 / 3)  # 1 - C(1,1)/C(3,1) = 1 - 1/3
    assert values["pass_at_2_unbiased"] == 1.0  # n - c = 1 < 2
    assert values["pass_at_3_unbiased"] == 1.0
    assert values["sample_accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(("texts", "expected"), [(["#### 6"] * 3, 1.0), (["#### 5"] * 3, 0.0), (["#### 6"], 1.0)],
                         ids=["all-correct", "none-correct", "one-sample"])  # fmt: skip
def test_degenerate_cases_put_every_sample_metric_at_0_or_1(texts: list[str], expected: float):
    values = values_of("", texts)
    not_of_samples = ("maj_at_1", "mean_completion_tokens")  # the greedy sample's grade; a length
    per_sample = [n for n in metric_names(len(texts), reranked=False) if n not in not_of_samples]
    assert {n: values[n] for n in per_sample} == dict.fromkeys(per_sample, expected)


def test_rerank_at_k_grades_the_highest_scored_sample():
    texts = ["#### 7", "#### 6", "#### 7"]  # the majority (7) is wrong, sample 1 is right
    assert values_of("", texts, [0.2, 0.9, 0.5])["rerank_at_k"] == 1.0  # sample 1 scores highest
    assert values_of("", texts, [0.9, 0.1, 0.5])["rerank_at_k"] == 0.0  # the same samples, sample 0 scores highest
    assert values_of("", texts, [0.5, 0.5, 0.1])["rerank_at_k"] == 0.0  # tie 0.5-0.5: the earlier sample, 0
    assert values_of("", ["none", "#### 6"], [0.9, 0.1])["rerank_at_k"] == 0.0  # the pick has no answer: no credit
    assert "rerank_at_k" not in values_of("", texts)  # no scores, no rerank@K
    # rerank_gain: rerank@K minus the fraction of samples correct (1 of 3): 1 - 1/3 when the pick is right
    assert values_of("", texts, [0.2, 0.9, 0.5])["rerank_gain"] == pytest.approx(2 / 3)
    assert values_of("", texts, [0.9, 0.1, 0.5])["rerank_gain"] == pytest.approx(-1 / 3)


def test_mean_completion_tokens_counts_the_samples_tokens_not_the_greedy_ones():
    # samples of 2, 3 and 10 tokens: (2 + 3 + 10) / 3 = 5; not their characters ((6 + 6 + 6) / 3 = 6), not the greedy's
    samples = [sample("#### 6", 2), sample("#### 7", 3), sample("#### 6", 10)]
    values, _ = score_problem(SIX, "a greedy text of many characters", samples)
    assert values["mean_completion_tokens"] == 5.0


def test_the_record_holds_each_samples_answer_correctness_and_score():
    samples = [sample("2*3=6\n#### 6", 4, "eos"), sample("#### 7", 2, "stop"), sample("so 1,000", 9, "length")]
    values, record = score_problem(SIX, "#### 6.0", samples, [0.1, 0.8, 0.3])
    assert record == {
        "id": "t/0",
        "question": "What is 2*3?",
        "answer": "6",
        "greedy": {"text": "#### 6.0", "answer": "6", "correct": True},
        "samples": [
            {"text": "2*3=6\n#### 6", "answer": "6", "correct": True, "num_tokens": 4, "finish_reason": "eos",
             "score": 0.1},
            {"text": "#### 7", "answer": "7", "correct": False, "num_tokens": 2, "finish_reason": "stop", "score": 0.8},
            {"text": "so 1,000", "answer": "1000", "correct": False, "num_tokens": 9, "finish_reason": "length",
             "score": 0.3},
        ],
        "majority_answer": "6",  # 6, 7, 1000: one vote each, the first wins
        "rerank_answer": "7",  # the 0.8 sample
    }  # fmt: skip
    assert list(values) == metric_names(3, reranked=True)
    assert (values["maj_at_1"], values["maj_at_k"], values["rerank_at_k"]) == (1.0, 1.0, 0.0)


# ------------------------------------------------------------------------------------------- aggregated


def test_summarize_averages_over_problems():
    names = ["maj_at_1", "mean_completion_tokens"]
    # problem 0: maj@1 1, samples of 2, 4, 6 tokens (mean 4); problem 1: maj@1 0, samples of 1, 1, 1 tokens (mean 1)
    per_problem = [{"maj_at_1": 1.0, "mean_completion_tokens": 4.0}, {"maj_at_1": 0.0, "mean_completion_tokens": 1.0}]
    # maj@1 (1 + 0) / 2 = 0.5; tokens (4 + 1) / 2 = 2.5 = (2 + 4 + 6 + 1 + 1 + 1) / 6, the mean over all samples
    assert summarize(per_problem, names) == {"eval/maj_at_1": 0.5, "eval/mean_completion_tokens": 2.5,
                                             "eval/num_problems": 2.0}  # fmt: skip
    empty = summarize([], names)
    assert math.isnan(empty["eval/maj_at_1"]) and empty["eval/num_problems"] == 0.0


# ---------------------------------------------------------------------------------------- evaluate itself


class LengthReranker:
    """A real :class:`~reasoning_rl.scoring.evaluation.Reranker`: prefers longer completions, and keeps the prompts
    it was given."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def score(self, prompts: Sequence[str], completions: Sequence[Sequence[str]]) -> list[list[float]]:
        self.prompts += prompts
        return [[float(len(c)) for c in group] for group in completions]


def test_evaluate_on_the_tiny_model_reports_the_pure_functions_values_of_its_records():
    tok = build_tiny_tokenizer()
    cfg = ModelConfig(name="tiny", source=ModelSource.tiny, max_seq_len=96, hidden_size=32, num_layers=2,
                      num_heads=2, intermediate_size=64)  # fmt: skip
    model = build_tiny_model(cfg, len(tok), seed=0)
    with torch.no_grad():  # weights scaled 8x: at the default init every greedy completion is "" (it opens "\n\n")
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    eval_cfg = EvalConfig(k=4, temperature=1.0, max_new_tokens=16)
    questions = ["1+2?", "3*4?", "9-5?", "7+7?"]

    def run(answers: Sequence[str], reranker=None, banned: tuple[int, ...] = ()):
        problems = [Problem(f"t/{i}", q, f"#### {answers[i]}", answers[i], ()) for i, q in enumerate(questions)]
        result = evaluate(model, tok, problems, build_prompt, eval_cfg, seed=0, batch_size=8, reranker=reranker,
                          orm_prompt=(lambda q: f"ORM {q}") if reranker else None, banned_token_ids=banned,
                          progress=False)  # fmt: skip
        return problems, result

    # The random model solves nothing, so first read what it answers, then make each problem's reference its greedy
    # answer, or else the answer of its first sample that has one: the same seeds give the same completions, and now
    # some are correct.
    _, first = run(["1"] * 4)
    answers = [next((a for a in [r["greedy"]["answer"], *(s["answer"] for s in r["samples"])] if a), "1")
               for r in first.records]  # fmt: skip
    reranker = LengthReranker()
    problems, result = run(answers, reranker)
    assert reranker.prompts == [f"ORM {q}" for q in questions]  # the ORM scored its own prompts
    metrics = result.metrics
    assert metrics["eval/maj_at_1"] > 0 and metrics["eval/pass_at_k"] >= 0.5 and metrics["eval/sample_accuracy"] < 1

    per_problem = []
    for problem, record in zip(problems, result.records, strict=True):
        samples = [sample(s["text"], s["num_tokens"], s["finish_reason"]) for s in record["samples"]]
        assert len(samples) == eval_cfg.k
        values, expected_record = score_problem(problem, record["greedy"]["text"], samples,
                                                [s["score"] for s in record["samples"]])  # fmt: skip
        assert record == expected_record
        per_problem.append(values)
    within = {k: metrics.pop(k) for k in ("eval/orm_within_auc", "eval/orm_within_pairs") if k in metrics}
    assert metrics == summarize(per_problem, metric_names(eval_cfg.k, reranked=True))
    groups = [([s["score"] for s in r["samples"]], [s["correct"] for s in r["samples"]]) for r in result.records]
    auc, pairs = within_question_auc(groups)
    assert within == ({"eval/orm_within_auc": auc, "eval/orm_within_pairs": pairs} if pairs else {})
    assert len({s["text"] for r in result.records for s in r["samples"]}) > eval_cfg.k  # samples drawn, not greedy

    # The greedy completion is the temperature-0 one, with the evaluation's stop strings.
    greedy = generate(model, tok, [build_prompt(q) for q in questions],
                      SamplingParams(0.0, 1.0, eval_cfg.max_new_tokens, STOP_STRINGS), batch_size=8)  # fmt: skip
    assert [r["greedy"]["text"] for r in result.records] == [g[0].text for g in greedy]

    # Banned tokens reach both samplers: with the digits banned no completion holds a digit (the run above has some).
    digits = tuple(tok.convert_tokens_to_ids(list("0123456789")))
    assert any(ch.isdigit() for r in result.records for s in r["samples"] for ch in s["text"])
    _, banned = run(answers, banned=digits)
    texts = [r["greedy"]["text"] for r in banned.records] + [s["text"] for r in banned.records for s in r["samples"]]
    assert not any(ch.isdigit() for t in texts for ch in t)
    assert banned.metrics["eval/pass_at_k"] == 0.0


def test_evaluate_with_no_problems_reports_nan_not_an_error():
    tok = build_tiny_tokenizer()
    cfg = ModelConfig(name="tiny", source=ModelSource.tiny, max_seq_len=64, hidden_size=32, num_layers=2, num_heads=2)
    result = evaluate(build_tiny_model(cfg, len(tok), seed=0), tok, [], build_prompt, EvalConfig(k=2), seed=0,
                      batch_size=4, progress=False)  # fmt: skip
    assert result.records == [] and result.metrics["eval/num_problems"] == 0.0
    assert math.isnan(result.metrics["eval/maj_at_k"])
