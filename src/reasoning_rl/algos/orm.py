"""The outcome-based reward model (ORM; Havrilla et al. 2024, section 3; Cobbe et al. 2021).

The policy's architecture with a scalar head: from any prefix of a solution it predicts the probability that the
solution ends with a correct final answer. Used for rerank@K at evaluation, to filter ORM EI's samples and to
label ORM RCRL's steps.

``load_or_train(ctx)``, two cached stages (``run/stages.py``) shared by every run with the same init:
  1. ``orm_samples``: K = orm.num_samples samples per question of its pool (``orm_questions``: orm.n_questions
     training questions, a seeded draw) from the init policy at temperature 1, as EI's first round draws them but
     with a seed of their own, each graded by its final answer. With ``orm.disjoint`` (the default) the algorithms
     that consult the ORM while training (ORM EI, ORM RCRL, ORM PPO) draw their questions from the rest
     (``algos.context.training_questions``): an ORM asked about samples of questions it was trained on would recall
     their labels, not judge them.
  2. ``orm``: split the questions into train / held-out (orm.heldout_fraction); start from the init policy's
     weights plus a fresh head; binary cross-entropy at every completion token, the target being its sample's
     correctness (the label applies to every prefix); report held-out accuracy (score >= 0.5) and ROC AUC of the
     whole-solution score
A solution's score is the head's output after the solution's last token; a prefix's, after the prefix's last token.
"""

from __future__ import annotations

import copy
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from reasoning_rl.algos.context import RunContext, finetune_params
from reasoning_rl.config import ConfigError
from reasoning_rl.models.outcome_reward import OutcomeRewardModel
from reasoning_rl.rollout.sampler import SamplingParams
from reasoning_rl.run.checkpointing import Checkpointer
from reasoning_rl.run.stages import cached_stage, init_stage_inputs, progress_dir, sampler_stage_inputs
from reasoning_rl.scoring.metrics import mean, rerank_index, roc_auc, within_question_auc
from reasoning_rl.tasks import Problem, is_correct
from reasoning_rl.tasks.prompts import STOP_STRINGS
from reasoning_rl.training.finetune import IGNORE_INDEX, finetune
from reasoning_rl.training.packing import forward_kwargs

log = logging.getLogger(__name__)


def summed_outcome_loss(orm: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Binary cross-entropy summed over completion tokens; every token's target is its sample's outcome.

    A packed batch (:func:`~reasoning_rl.training.packing.collate_packed`, inside
    :func:`~reasoning_rl.training.packing.packed_attention`) gives the same sum as the padded one (:func:`collate`)."""
    logits = orm(**forward_kwargs(batch))  # (B, T); packed: (1, N)
    if "cu_seq_lens" in batch:
        targets = batch["outcomes"]  # (1, N): each token's sequence's outcome
    else:
        targets = batch["outcomes"][:, None].expand_as(logits)  # (B, T)
    mask = batch["labels"] != IGNORE_INDEX  # (B, T): completion tokens and EOS, as in supervised fine-tuning
    return torch.nn.functional.binary_cross_entropy_with_logits(logits[mask], targets[mask], reduction="sum")


def split_questions(problem_ids: Sequence[str], heldout_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """A seeded (train, held-out) split of the distinct question ids; at least one question on each side."""
    ids = sorted(set(problem_ids))
    if len(ids) < 2:
        raise ConfigError(  # a user error: no ORM can be built from these settings
            f"the ORM needs samples of at least 2 questions to hold some out, got {len(ids)}; raise orm.n_questions "
            "(or task.n_train)."
        )
    num_heldout = min(len(ids) - 1, max(1, round(heldout_fraction * len(ids))))
    heldout = set(random.Random(seed).sample(ids, num_heldout))
    return set(ids) - heldout, heldout


def heldout_metrics(scores: Sequence[float], correct: Sequence[bool], problem_ids: Sequence[str]) -> dict[str, float]:
    """The ORM on held-out questions: accuracy (score >= 0.5 predicts correct), ROC AUC pooled over all samples,
    the base rate to compare them with, and the ranking that reranking needs.

    The pooled AUC also credits knowing which questions are hard; reranking only ever compares samples of one
    question. So: ``within_auc``, the AUC over pairs of samples of the same question (0.5 = no better than chance);
    ``rerank``, the fraction of questions whose top-scored sample is correct; and ``rerank_gain``, that minus the
    mean fraction of a question's samples that are correct (the unbiased pass@1, what a random pick gets).
    """
    by_question: dict[str, tuple[list[float], list[bool]]] = {}
    for score, ok, pid in zip(scores, correct, problem_ids, strict=True):
        group = by_question.setdefault(pid, ([], []))
        group[0].append(score)
        group[1].append(ok)
    within_auc, pairs = within_question_auc(list(by_question.values()))
    rerank = mean([float(oks[rerank_index(ss)]) for ss, oks in by_question.values()])  # the pick rerank@K makes
    pass_at_1 = mean([mean([float(ok) for ok in oks]) for _, oks in by_question.values()])
    return {
        "train/orm_heldout_accuracy": mean([(s >= 0.5) == c for s, c in zip(scores, correct, strict=True)]),
        "train/orm_heldout_auc": roc_auc(scores, correct),
        "train/orm_heldout_within_auc": within_auc,
        "train/orm_heldout_within_pairs": float(pairs),
        "train/orm_heldout_rerank": rerank,
        "train/orm_heldout_rerank_gain": rerank - pass_at_1,
        "train/orm_heldout_fraction_correct": mean([float(c) for c in correct]),
        "train/orm_heldout_samples": float(len(scores)),
    }


ORM_SAMPLE_SEED_OFFSET = 500  # the ORM's samples are drawn with seed + 500: EI round i draws with seed + 1000 i,
# PPO step k with seed + 1000 k + 1, RCRL with seed + 1, 2 and the evaluation with seed, seed + 1, so none of them
# redraws the ORM's own training samples


def orm_questions(train: Sequence[Problem], n_questions: int | None, disjoint: bool, seed: int) -> list[Problem]:
    """The training questions whose samples the ORM learns from: a seeded draw of ``n_questions``; None = all of
    them, or a seeded half when ``disjoint`` (the other half is left for ORM-guided training)."""
    if n_questions is None:
        n_questions = len(train) // 2 if disjoint else len(train)
    if n_questions >= len(train):
        return list(train)
    return random.Random(seed).sample(list(train), n_questions)


def load_or_train(ctx: RunContext) -> OutcomeRewardModel:
    """The ORM of this run's init: reused from the cache, or sampled for and trained now (two stages)."""
    cfg = ctx.cfg
    orm_cfg = cfg.orm
    cache_dir = Path(cfg.cache_dir)

    # 1. graded samples of the init policy (the first round of EI)
    def sample_and_grade(directory: Path) -> None:
        questions = orm_questions(ctx.splits.train, orm_cfg.n_questions, orm_cfg.disjoint, cfg.seed)
        prompts = [ctx.build_prompt(p.question) for p in questions]
        samples = ctx.sampler(
            ctx.model,
            ctx.tokenizer,
            prompts,
            SamplingParams(orm_cfg.temperature, orm_cfg.top_p, orm_cfg.max_new_tokens, STOP_STRINGS),
            num_samples=orm_cfg.num_samples,
            seed=cfg.seed + ORM_SAMPLE_SEED_OFFSET,
            batch_size=cfg.model.sample_batch_size,
            progress="ORM: sample",
        )
        with (directory / "samples.jsonl").open("w") as f:
            for problem, prompt, group in zip(questions, prompts, samples, strict=True):
                for s in group:
                    record = {"problem_id": problem.id, "prompt": prompt, "completion": s.text}
                    f.write(json.dumps({**record, "correct": is_correct(s.text, problem.answer)}) + "\n")

    sampling_inputs = {
        k: getattr(orm_cfg, k)
        for k in ("num_samples", "n_questions", "disjoint", "temperature", "top_p", "max_new_tokens")
    } | sampler_stage_inputs(cfg)
    samples_stage = cached_stage(
        cache_dir,
        "orm_samples",
        {
            **init_stage_inputs(cfg, ctx.splits.train),
            "sample_batch_size": cfg.model.sample_batch_size,
            "sampling": sampling_inputs,
        },
        sample_and_grade,
        ctx.tracker,
    )

    # 2. train the ORM on the samples of most questions, measure it on the rest
    def train(directory: Path) -> None:
        records = [json.loads(line) for line in (samples_stage.path / "samples.jsonl").open()]
        train_ids, heldout_ids = split_questions([r["problem_id"] for r in records], orm_cfg.heldout_fraction, cfg.seed)
        torch.manual_seed(cfg.seed)  # the head's initial weights
        orm = OutcomeRewardModel(copy.deepcopy(ctx.model), copy.deepcopy(ctx.tokenizer), cfg.model.sample_batch_size,
                                 ctx.precision.dtype)  # fmt: skip
        trained_on = [r for r in records if r["problem_id"] in train_ids]
        examples = [(r["prompt"], r["completion"], float(r["correct"])) for r in trained_on]
        log.info("ORM: %d training samples, %.1f%% correct", len(examples), 100 * mean([e[2] for e in examples]))
        params = finetune_params(ctx, lr=orm_cfg.lr, epochs=orm_cfg.epochs, max_steps=orm_cfg.max_steps, seed=cfg.seed)
        # checkpoints of the training itself: a job killed half-way is continued by the next that needs the ORM
        checkpoints = Checkpointer(progress_dir(cache_dir, "orm", orm_inputs), 0, restore=cfg.resume)
        finetune(orm, orm.tokenizer, examples, params, ctx.tracker, metric_prefix="orm", loss_fn=summed_outcome_loss,
                 checkpoints=checkpoints, checkpoint_every=cfg.stage_checkpoint_every)  # fmt: skip
        heldout = [r for r in records if r["problem_id"] in heldout_ids]
        scores = orm.score_prefixes([r["prompt"] for r in heldout], [r["completion"] for r in heldout])
        outcomes, ids = [r["correct"] for r in heldout], [r["problem_id"] for r in heldout]
        metrics = {**heldout_metrics(scores, outcomes, ids), "train/orm_samples": len(examples)}
        orm.save(directory)
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    training_inputs = {k: getattr(orm_cfg, k) for k in ("heldout_fraction", "epochs", "max_steps", "lr")}
    orm_inputs = {**init_stage_inputs(cfg, ctx.splits.train), "samples": samples_stage.key, "training": training_inputs}
    orm_stage = cached_stage(cache_dir, "orm", orm_inputs, train, ctx.tracker)
    metrics = json.loads((orm_stage.path / "metrics.json").read_text())
    ctx.tracker.log_metrics(metrics)
    log.info("ORM held-out: %s", ", ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in metrics.items()))
    return OutcomeRewardModel.load(orm_stage.path, ctx.device, ctx.precision.dtype, cfg.model.sample_batch_size)
