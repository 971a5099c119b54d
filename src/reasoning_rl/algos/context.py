"""What an algorithm gets from the pipeline, and the plumbing every algorithm shares (evaluate, fine-tune)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reasoning_rl.config import ConfigError, ExperimentConfig, ModelConfig, RewardName
from reasoning_rl.rollout.native import generate
from reasoning_rl.rollout.sampler import Sampler
from reasoning_rl.run.tracking import Tracker
from reasoning_rl.scoring.evaluation import EvalResult, evaluate, write_records
from reasoning_rl.tasks import Problem, TaskSplits
from reasoning_rl.training.distributed import SINGLE, DataParallel
from reasoning_rl.training.finetune import FinetuneParams
from reasoning_rl.training.lora import LoraParams
from reasoning_rl.training.precision import FLOAT32, Precision

if TYPE_CHECKING:
    from reasoning_rl.models.outcome_reward import OutcomeRewardModel
    from reasoning_rl.run.checkpointing import Checkpointer


@dataclass
class RunContext:
    """The composed config, the policy, the data, and where to log and write."""

    cfg: ExperimentConfig
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    splits: TaskSplits
    build_prompt: Callable[[str], str]  # question -> prompt (few-shot prefix included for init=pretrained)
    tracker: Tracker
    output_dir: Path
    device: torch.device
    orm: OutcomeRewardModel | None = None  # set when the reward needs it or orm.rerank; evaluation reranks with it
    banned_token_ids: tuple[int, ...] = ()  # never sampled at evaluation (RCRL bans its [BAD] goal token)
    orm_prompt: Callable[[str], str] | None = None  # the prompt the ORM scores with; None = build_prompt (RCRL's
    # policy prompt ends in a goal token the ORM never saw)
    checkpoints: Checkpointer | None = None  # saves and restores the algorithm's state (EI, PPO); None = never
    sampler: Sampler = generate  # the rollout engine (rollout=native: ours; rollout=vllm: a VLLMSampler); every
    #   sample of the run is drawn through it
    data_parallel: DataParallel = SINGLE  # this process's rank among the job's processes (training/distributed.py)
    precision: Precision = FLOAT32  # the compute dtype of every forward pass (model.dtype, resolved for the device)
    orm_question_ids: frozenset[str] = frozenset()  # the training questions the ORM learnt from (orm.disjoint:
    #   ORM-guided training leaves them out, see training_questions)


def training_questions(ctx: RunContext) -> list[Problem]:
    """The training questions an algorithm draws from: all of them, less those the ORM was trained on when the
    reward consults the ORM (ORM EI, ORM RCRL, ORM PPO) and ``orm.disjoint`` (algos/orm.py says why)."""
    uses_orm = ctx.cfg.reward.name in (RewardName.orm, RewardName.orm_dense)
    if not (uses_orm and ctx.cfg.orm.disjoint):
        return list(ctx.splits.train)
    rest = [p for p in ctx.splits.train if p.id not in ctx.orm_question_ids]
    if not rest:
        raise ConfigError(
            f"reward={ctx.cfg.reward.name.value} with orm.disjoint=true trains on the questions the ORM was not "
            f"trained on, and the ORM took all {len(ctx.splits.train)}: lower orm.n_questions (or set it to null: "
            "half), or set orm.disjoint=false to let the ORM grade samples of its own training questions."
        )
    return rest


def evaluate_policy(ctx: RunContext, *, step: int | None = None, progress: bool = True) -> EvalResult:
    """Evaluate the current policy on the test split and log the eval/ metrics (at ``step``, e.g. an EI round)."""
    result = evaluate(
        ctx.model,
        ctx.tokenizer,
        ctx.splits.test,
        ctx.build_prompt,
        ctx.cfg.eval,
        seed=ctx.cfg.seed,
        batch_size=ctx.cfg.model.sample_batch_size,
        reranker=ctx.orm,
        orm_prompt=ctx.orm_prompt,
        banned_token_ids=ctx.banned_token_ids,
        progress=progress,
        sampler=ctx.sampler,
        data_parallel=ctx.data_parallel,
    )
    ctx.tracker.log_metrics(result.metrics, step=step)
    keep = step is not None and ctx.cfg.eval.save_samples and ctx.data_parallel.is_main
    if keep:  # every point of a curve keeps its samples, for paired
        # comparisons of one problem across steps (the final evaluation is eval/samples.jsonl as well)
        written = write_records(result.records, ctx.output_dir / "eval" / f"samples_step{step}.jsonl")
        ctx.tracker.log_artifact(written, "eval")
    return result


def finetune_params(
    ctx: RunContext, *, lr: float | None, epochs: float, max_steps: int | None, seed: int, **schedule: float
) -> FinetuneParams:
    """Fine-tuning settings from the model's scale (batch sizes, lengths, default lr) and the caller's overrides."""
    model = ctx.cfg.model
    return FinetuneParams(
        lr=lr or model.lr,
        epochs=epochs,
        batch_size=model.train_batch_size,
        micro_batch_size=model.micro_batch_size,
        max_seq_len=model.max_seq_len,
        seed=seed,
        max_steps=max_steps,
        gradient_checkpointing=model.gradient_checkpointing,
        lora=lora_params(model),
        compute_dtype=ctx.precision.dtype,
        shard=model.fsdp,
        **schedule,
    )


def lora_params(model: ModelConfig) -> LoraParams | None:
    """The LoRA settings of ``model.lora_*``; None when ``model.lora_rank`` is 0 (train every weight)."""
    if not model.lora_rank:
        return None
    return LoraParams(rank=model.lora_rank, alpha=model.lora_alpha, dropout=model.lora_dropout)
