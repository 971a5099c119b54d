"""The outcome-based reward model (ORM; Havrilla et al. 2024, section 3; Cobbe et al. 2021).

The policy's architecture with a scalar head: from any prefix of a solution it predicts the probability that the
solution ends with a correct final answer. Used for rerank@K at evaluation, to filter ORM EI's samples and to
label ORM RCRL's steps.

``load_or_train(ctx)``, two cached stages (``stages.py``) shared by every run with the same init:
  1. ``orm_samples``: K = orm.num_samples samples per question of its pool (``orm_questions``: orm.n_questions
     training questions, a seeded draw) from the init policy at temperature 1, as EI's first round draws them but
     with a seed of their own, each graded by its final answer. With ``orm.disjoint`` (the default) the algorithms
     that consult the ORM while training (ORM EI, ORM RCRL, ORM PPO) draw their questions from the rest
     (``run_context.training_questions``): an ORM asked about samples of questions it was trained on would recall
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
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reasoning_rl.algos.sft import IGNORE_INDEX, finetune
from reasoning_rl.checkpointing import Checkpointer
from reasoning_rl.config import ConfigError
from reasoning_rl.metrics import mean, roc_auc, within_question_auc
from reasoning_rl.models import load_checkpoint, save_checkpoint
from reasoning_rl.packing import forward_kwargs
from reasoning_rl.precision import Precision
from reasoning_rl.prompts import STOP_STRINGS
from reasoning_rl.rollout import SamplingParams
from reasoning_rl.run_context import RunContext, finetune_params
from reasoning_rl.stages import cached_stage, init_stage_inputs, progress_dir, sampler_stage_inputs
from reasoning_rl.tasks import Problem, is_correct, step_prefixes

log = logging.getLogger(__name__)


class OutcomeRewardModel(torch.nn.Module):
    """A causal LM's trunk (``lm.base_model``) and a linear head: one logit per position (the LM head is unused).

    Scoring autocasts to ``compute_dtype``; a frozen ORM loaded for a run is held in it (:meth:`load`)."""

    def __init__(
        self,
        lm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 32,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.compute_dtype = compute_dtype
        self.head = torch.nn.Linear(lm.config.hidden_size, 1, device=lm.device, dtype=lm.dtype)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **packed: object
    ) -> torch.Tensor:
        """(B, T) logits of P(correct final answer); ``packed``: a packed row's position ids and span boundaries
        (:func:`reasoning_rl.packing.forward_kwargs`, inside :func:`~reasoning_rl.packing.packed_attention`)."""
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, **packed).last_hidden_state
        return self.head(hidden).squeeze(-1).float()  # (B, T)

    @torch.no_grad()
    def score_prefixes(self, prompts: Sequence[str], prefixes: Sequence[str]) -> list[float]:
        """P(correct final answer) after each (prompt, partial or whole solution) pair, tokenized as in training."""
        if len(prompts) != len(prefixes):
            raise ValueError(f"{len(prompts)} prompts but {len(prefixes)} prefixes")
        max_len = self.lm.config.max_position_embeddings
        sequences = [
            (self.tokenizer(p)["input_ids"] + self.tokenizer(c, add_special_tokens=False)["input_ids"])[-max_len:]
            for p, c in zip(prompts, prefixes, strict=True)
        ]
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths share a batch
        scores = [0.0] * len(sequences)
        self.eval()
        precision = Precision.of(self, self.compute_dtype)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = max(len(sequences[i]) for i in rows)
            input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
            for r, i in enumerate(rows):  # right padding: position len-1 is the last real token
                input_ids[r, : len(sequences[i])] = torch.tensor(sequences[i])
                attention_mask[r, : len(sequences[i])] = 1
            with precision.autocast():
                logits = self(input_ids.to(self.lm.device), attention_mask.to(self.lm.device))  # (B, T)
            last = torch.tensor([len(sequences[i]) - 1 for i in rows], device=logits.device)  # (B,)
            probs = torch.sigmoid(logits.gather(1, last[:, None]).squeeze(1)).tolist()  # (B,)
            for i, p in zip(rows, probs, strict=True):
                scores[i] = p
        return scores

    def score(self, prompts: Sequence[str], completions: Sequence[Sequence[str]]) -> list[list[float]]:
        """Whole-solution scores for K completions per prompt: the evaluation's :class:`Reranker`."""
        flat = [(p, c) for p, group in zip(prompts, completions, strict=True) for c in group]
        flat_scores = iter(self.score_prefixes([p for p, _ in flat], [c for _, c in flat]))
        return [[next(flat_scores) for _ in group] for group in completions]

    def min_step_scores(self, prompts: Sequence[str], solutions: Sequence[str]) -> list[float]:
        """The lowest score after any step of each solution ("Dense ORM"); the whole-solution score if it has none."""
        pairs = [(i, prefix) for i, s in enumerate(solutions) for prefix in step_prefixes(s) or [s]]
        flat = self.score_prefixes([prompts[i] for i, _ in pairs], [prefix for _, prefix in pairs])
        lowest = [1.0] * len(solutions)
        for (i, _), score in zip(pairs, flat, strict=True):
            lowest[i] = min(lowest[i], score)
        return lowest

    def save(self, directory: Path) -> None:
        save_checkpoint(self.lm, self.tokenizer, directory / "model")
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, directory / "head.safetensors")

    @classmethod
    def load(
        cls, directory: Path, device: torch.device, compute_dtype: torch.dtype, batch_size: int
    ) -> OutcomeRewardModel:
        """The trained ORM, frozen, with its weights in ``compute_dtype`` (it only scores)."""
        lm, tokenizer = load_checkpoint(directory / "model", device)
        orm = cls(lm, tokenizer, batch_size, compute_dtype)
        orm.head.load_state_dict(load_file(directory / "head.safetensors", device=str(device)))
        return orm.to(compute_dtype).eval().requires_grad_(False)


def summed_outcome_loss(orm: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Binary cross-entropy summed over completion tokens; every token's target is its sample's outcome.

    A packed batch (:func:`~reasoning_rl.packing.collate_packed`, inside
    :func:`~reasoning_rl.packing.packed_attention`) gives the same sum as the padded one (:func:`collate`)."""
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
    rerank = mean([float(oks[max(range(len(ss)), key=lambda i: (ss[i], -i))]) for ss, oks in by_question.values()])
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
