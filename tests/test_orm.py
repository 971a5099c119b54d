"""The outcome reward model: label construction, held-out metrics, ORM EI filtering, and a tiny ORM that learns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from reasoning_rl.algos.context import RunContext, training_questions
from reasoning_rl.algos.ei import orm_keep
from reasoning_rl.algos.orm import heldout_metrics, orm_questions, split_questions, summed_outcome_loss
from reasoning_rl.config import (
    ArithTaskConfig,
    ConfigError,
    EIConfig,
    EvalConfig,
    ExperimentConfig,
    LoggerConfig,
    LoggerName,
    ModelConfig,
    ModelSource,
    ORMConfig,
    ORMFilter,
    RewardConfig,
    RewardName,
    SFTInitConfig,
)
from reasoning_rl.models.loading import load_policy
from reasoning_rl.models.outcome_reward import OutcomeRewardModel
from reasoning_rl.run.tracking import NullTracker
from reasoning_rl.scoring.metrics import roc_auc
from reasoning_rl.tasks import Problem, TaskSplits
from reasoning_rl.training.finetune import FinetuneParams, collate, finetune, tokenize_examples

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ModelConfig(name="tiny", source=ModelSource.tiny, max_seq_len=64, hidden_size=32, num_layers=2, num_heads=2)
CPU = torch.device("cpu")


def test_roc_auc_by_hand():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 0.35 beats 0.1 only, 0.8 beats both -> 3 of 4 pairs
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert roc_auc([0.5, 0.5], [True, False]) == 0.5  # a tie counts one half
    assert roc_auc([0.9, 0.1], [True, False]) == 1.0
    assert roc_auc([0.9, 0.1], [False, True]) == 0.0
    assert math.isnan(roc_auc([0.2, 0.3], [True, True]))  # one class only


def test_heldout_metrics_by_hand():
    metrics = heldout_metrics([0.9, 0.6, 0.4, 0.2], [True, False, False, False], ["q1", "q1", "q2", "q2"])
    assert metrics["train/orm_heldout_accuracy"] == 0.75  # 0.6 >= 0.5 predicts correct, wrongly
    assert metrics["train/orm_heldout_auc"] == 1.0  # the only positive has the top score
    assert metrics["train/orm_heldout_fraction_correct"] == 0.25
    # q1: its correct sample (0.9) beats its wrong one (0.6): 1 pair won; q2 has no correct sample, no pair
    assert metrics["train/orm_heldout_within_auc"] == 1.0 and metrics["train/orm_heldout_within_pairs"] == 1
    # rerank: q1's top sample is correct, q2's is not -> 0.5; random pick: (1/2 + 0/2) / 2 = 0.25; gain 0.25
    assert metrics["train/orm_heldout_rerank"] == 0.5 and metrics["train/orm_heldout_rerank_gain"] == 0.25


def test_a_question_ranking_orm_has_a_high_pooled_auc_and_no_within_question_auc():
    # The ORM scores by question: q1 (easy, 2 of 3 correct) all 0.8, q2 (hard, 1 of 3) all 0.2. Pooled, correct
    # samples are mostly q1's and score higher: positives (0.8, 0.8, 0.2) vs negatives (0.8, 0.2, 0.2): of 9 pairs,
    # 0.8 > 0.2 wins 2 x 2 = 4, ties (0.8 = 0.8: 2 x 1, 0.2 = 0.2: 1 x 2) give 4 x 1/2 = 2 -> 6/9 = 0.667.
    # Within a question every pair ties: 0.5, and picking the top-scored sample is no better than a random one.
    scores = [0.8, 0.8, 0.8, 0.2, 0.2, 0.2]
    correct = [True, True, False, True, False, False]
    metrics = heldout_metrics(scores, correct, ["q1"] * 3 + ["q2"] * 3)
    assert metrics["train/orm_heldout_auc"] == pytest.approx(2 / 3)
    assert metrics["train/orm_heldout_within_auc"] == 0.5 and metrics["train/orm_heldout_within_pairs"] == 4
    # ties go to the first sample: q1's first is correct, q2's first is correct -> 1.0; random: (2/3 + 1/3) / 2
    assert metrics["train/orm_heldout_rerank"] == 1.0
    assert metrics["train/orm_heldout_rerank_gain"] == pytest.approx(0.5)


def test_split_questions_is_seeded_disjoint_and_by_question():
    ids = ["q1", "q1", "q2", "q3", "q3", "q4", "q5", "q6", "q7", "q8", "q9", "q10"]  # 10 questions, some repeated
    train, heldout = split_questions(ids, 0.2, seed=0)
    assert len(heldout) == 2 and len(train) == 8 and not train & heldout and train | heldout == set(ids)
    assert split_questions(ids, 0.2, seed=0) == (train, heldout)
    assert len(split_questions(ids, 0.001, seed=0)[1]) == 1  # at least one held out
    with pytest.raises(ValueError, match="at least 2 questions"):
        split_questions(["q1", "q1"], 0.5, seed=0)


class ConstantScorer(torch.nn.Module):
    """Scores every position with the same logit: the loss then follows from counting labelled tokens."""

    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.full(input_ids.shape, self.logit)


def test_every_completion_token_carries_its_samples_label():
    _, tok = load_policy(TINY, seed=0, cache_dir=Path("unused"), device=CPU)
    # the character tokenizer: "12" is 2 tokens, "345" is 3; each gets EOS appended -> 3 and 4 labelled positions
    data = tokenize_examples(tok, [("Q:", "12", 1.0), ("Q:", "345", 0.0)], max_seq_len=64)
    batch = collate(data, tok.pad_token_id)
    assert batch["outcomes"].tolist() == [1.0, 0.0]
    labelled = (batch["labels"] != -100).sum(dim=1).tolist()
    assert labelled == [3, 4]
    # logit 0: every labelled token costs ln 2, whatever its label
    assert summed_outcome_loss(ConstantScorer(0.0), batch).item() == pytest.approx(7 * math.log(2))
    # logit c: a correct sample's token costs softplus(-c), a wrong one's softplus(c)
    c = 2.0
    expected = 3 * math.log1p(math.exp(-c)) + 4 * math.log1p(math.exp(c))
    assert summed_outcome_loss(ConstantScorer(c), batch).item() == pytest.approx(expected, rel=1e-5)


def test_orm_keep_by_hand():
    scores, correct = [0.9, 0.7, 0.3, 0.6], [True, False, True, True]
    assert orm_keep(scores, correct, 0.5, ORMFilter.orm) == [True, True, False, True]
    assert orm_keep(scores, correct, 0.5, ORMFilter.orm_and_correct) == [True, False, False, True]
    assert orm_keep(scores, correct, 0.8, ORMFilter.orm) == [True, False, False, False]


def tiny_orm(seed: int = 0) -> OutcomeRewardModel:
    model, tok = load_policy(TINY, seed=seed, cache_dir=Path("unused"), device=CPU)
    torch.manual_seed(seed)
    return OutcomeRewardModel(model, tok, batch_size=4)


def test_orm_learns_to_tell_right_from_wrong_and_reloads_exactly(tmp_path):
    orm = tiny_orm()
    # the question asks for 2+3; the label is whether the final line says 5
    examples = [("2+3=?\n", f"2+3={a}\n#### {a}", float(a == 5)) for a in range(10)] * 8
    params = FinetuneParams(lr=3e-3, epochs=20, batch_size=16, micro_batch_size=8, max_seq_len=64, seed=0)
    finetune(orm, orm.tokenizer, examples, params, NullTracker(), metric_prefix="orm", loss_fn=summed_outcome_loss,
             progress=False)  # fmt: skip
    prompts, completions = ["2+3=?\n"] * 3, ["2+3=5\n#### 5", "2+3=6\n#### 6", "2+3=1\n#### 1"]
    right, *wrong = orm.score_prefixes(prompts, completions)
    assert right > 0.5 > max(wrong)
    # the reranker interface: K completions per prompt
    assert orm.score(prompts[:1], [completions]) == [[right, *wrong]]
    # dense: the lowest score after any step; a one-step prefix "2+3=5\n" is scored as well
    step_scores = orm.score_prefixes(["2+3=?\n"] * 2, ["2+3=5\n", "2+3=5\n#### 5"])
    assert orm.min_step_scores(["2+3=?\n"], ["2+3=5\n#### 5"]) == [min(step_scores)]

    orm.save(tmp_path / "orm")
    again = OutcomeRewardModel.load(tmp_path / "orm", CPU, torch.float32, batch_size=2)
    assert again.score_prefixes(prompts, completions) == pytest.approx([right, *wrong], abs=1e-6)


# ------------------------------------------------------------------------- the ORM's questions stay its own


def test_orm_questions_leave_half_for_orm_guided_training_by_default():
    train = [Problem(f"p{i}", f"q{i}", "#### 1", "1", ()) for i in range(10)]
    assert len(orm_questions(train, None, disjoint=True, seed=0)) == 5  # None + disjoint: a seeded half
    assert orm_questions(train, None, disjoint=False, seed=0) == train  # None: all of them
    draw = orm_questions(train, 3, disjoint=True, seed=0)
    assert len(draw) == 3 and draw == orm_questions(train, 3, disjoint=True, seed=0)
    assert orm_questions(train, 30, disjoint=True, seed=0) == train


def test_orm_guided_training_draws_only_questions_the_orm_did_not_learn_from(tmp_path):
    train = [Problem(f"p{i}", f"q{i}", "#### 1", "1", ()) for i in range(6)]
    splits = TaskSplits(train, train[:1])

    def context(reward: RewardName, disjoint: bool = True) -> RunContext:
        cfg = ExperimentConfig(
            algo=EIConfig(max_new_tokens=16), reward=RewardConfig(name=reward), init=SFTInitConfig(), model=TINY,
            task=ArithTaskConfig(), logger=LoggerConfig(name=LoggerName.none),
            orm=ORMConfig(disjoint=disjoint, max_new_tokens=16), eval=EvalConfig(max_new_tokens=16),
        )  # fmt: skip
        ctx = RunContext(cfg, None, None, splits, str, NullTracker(), tmp_path, CPU)  # type: ignore[arg-type]
        ctx.orm_question_ids = frozenset({"p0", "p2", "p4"})
        return ctx

    for reward in (RewardName.orm, RewardName.orm_dense):  # ORM EI / ORM RCRL / ORM PPO: the other three
        assert [p.id for p in training_questions(context(reward))] == ["p1", "p3", "p5"]
    assert training_questions(context(RewardName.sparse)) == train  # the ORM only reranks: nothing to hide
    assert training_questions(context(RewardName.orm, disjoint=False)) == train
    ctx = context(RewardName.orm)
    ctx.orm_question_ids = frozenset(p.id for p in train)
    with pytest.raises(ConfigError, match="orm.n_questions"):
        training_questions(ctx)
