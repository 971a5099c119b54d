"""GRPO, RLOO and Dr. GRPO: policy gradient without a critic, each solution's advantage taken against the other
solutions of its question (beyond the paper: Shao et al. 2024, "DeepSeekMath", section 4.1; Ahmadian et al. 2024,
"Back to Basics"; Liu et al. 2025, "Understanding R1-Zero-Like Training").

Step k = 1 .. algo.steps:
  1. sample K = algo.num_samples solutions for each of algo.rollout_questions training questions from pi_{k-1}
  2. score every generated token with the reward (``scoring/rewards.py``: sparse, dense, orm or orm_dense); a solution's
     reward R is the sum of its token rewards
  3. one no-grad forward pass over the rollouts: old log-probs and entropy (policy), and reference log-probs (the
     frozen initial policy) when algo.kl_coef > 0
  4. advantages within each question's group of K (``grpo_math.py``): GRPO (R - mean) / std, Dr. GRPO R - mean,
     RLOO R - the mean of the other K - 1; every token of a solution gets its solution's advantage
  5. algo.epochs passes over the rollouts in shuffled minibatches of algo.minibatch_size sequences: per token PPO's
     clipped ratio loss plus kl_coef x the k3 estimate of KL(pi || pi_ref); per sequence the mean of its token
     losses (GRPO, RLOO) or their sum / algo.max_new_tokens (Dr. GRPO); the mean over the minibatch's sequences,
     accumulated over micro-batches, then gradient-norm clipping and an AdamW step
  6. log train/grpo_* metrics
  7. evaluate every algo.eval_every steps and after the last step (and the init at step 0)
  8. checkpoint every ``checkpoint_every`` steps and after the last (``run/checkpointing.py``); a killed run resumes
     after its last checkpoint

algo=grpo, rloo and dr_grpo are this one loop with different algo.baseline, algo.scale_by_std and algo.loss_norm
(``config.py``); they are separate options so that each run's ``algo`` tag, hence its row of the report's tables,
says which it is. Everything but phases 4 and 5 is PPO's (``ppo.py``: sampling, rewards, packing, old and reference
log-probs, truncated importance sampling, the optimizer step, LoRA, mixed precision, data parallelism, checkpoints),
so a GRPO row differs from a PPO row in the baseline and the loss, not in the plumbing.

Choices where the sources differ or are silent:
- The KL term is in the loss (DeepSeekMath), not in the reward as PPO's, with the k3 estimator: its gradient pulls
  toward the reference, where k1's (grad log pi) is 0 in expectation under the sampling policy. The default
  kl_coef 0.04 (DeepSeekMath's) is the same for the three options, so each row differs from GRPO only in what its
  name says (the Dr. GRPO paper trains without it: algo.kl_coef=0, which keeps no reference model at all).
- The std is the sample std (divide by K - 1, as TRL and verl), eps 1e-6 beside it; a group whose K rewards are
  equal gets advantage 0 (logged as train/grpo_zero_variance_fraction).
- Dense and ORM rewards are summed into the solution's reward: a group baseline is per solution, so where in the
  solution a reward fell does not matter here (it does for PPO's GAE).
- One metric prefix, train/grpo_*, for the three options (one loop, one list of metrics; the ``algo`` tag tells
  them apart), so dashboards and the report compare the rows on the same names.
- With several processes, each rank samples whole questions, so it holds whole groups and the group statistics are
  local and exact; a minibatch's loss is the sum of its per-sequence losses over the sequences of all ranks.
- The model stays in eval mode (no dropout); the learning rate is constant, model.lr / 10 unless algo.lr is set.

    python main.py algo=grpo init=sft model=tiny task=arith
    python main.py algo=rloo init=sft model=tiny task=arith
    python main.py algo=dr_grpo init=sft model=tiny task=arith algo.kl_coef=0
"""

from __future__ import annotations

import copy
import logging
import time
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from reasoning_rl.algos.context import RunContext, evaluate_policy, lora_params, training_questions
from reasoning_rl.algos.grpo_math import group_advantages, sequence_mean_loss, token_sum_loss, zero_variance_fraction
from reasoning_rl.algos.ppo import (
    Batch,
    PolicyValue,
    check_divisible,
    check_finite,
    evaluate_rollouts,
    optimizer_step,
    pack_rollouts,
    question_batches,
    rollout_logprob_gap,
    sample_groups,
    score_samples,
    select_rows,
    weight_push_metrics,
)
from reasoning_rl.algos.ppo_math import (
    clipped_policy_loss,
    kl_estimate,
    masked_mean,
    token_logprobs,
    truncated_importance_weights,
)
from reasoning_rl.config import GRPOConfig, KLEstimator, LossNorm
from reasoning_rl.rollout.sampler import SamplingParams
from reasoning_rl.scoring.evaluation import EvalResult
from reasoning_rl.tasks.prompts import STOP_STRINGS
from reasoning_rl.training.distributed import SINGLE, DataParallel
from reasoning_rl.training.lora import attach_adapters, merge_adapters
from reasoning_rl.training.precision import FLOAT32, Precision
from reasoning_rl.training.sharding import (
    full_optimizer_state,
    gather_weights,
    is_sharded,
    load_full_optimizer_state,
    shard,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ phase 4


def group_relative_advantages(batch: Batch, num_questions: int, cfg: GRPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 4: each solution's reward (the sum of its token rewards) against its question's group of K, put at every
    token of the solution as ``batch["advantages"]`` (N, T); returns the rewards and advantages, (Q, K) each.

    The rows of ``batch`` are the questions' K samples together, in question order (as the sampler returns them)."""
    rewards = batch["scores"].sum(1).view(num_questions, cfg.num_samples)  # (Q, K)
    advantages = group_advantages(rewards, cfg.baseline, cfg.scale_by_std)  # (Q, K)
    batch["advantages"] = advantages.reshape(-1, 1) * batch["mask"]  # (N, T)
    return rewards, advantages


# ------------------------------------------------------------------------------------------------ phase 5


def sequence_losses(token_losses: torch.Tensor, mask: torch.Tensor, cfg: GRPOConfig) -> torch.Tensor:
    """Each sequence's loss from its token losses, as ``algo.loss_norm`` says (``grpo_math.py``). (B, T) -> (B,)"""
    if cfg.loss_norm == LossNorm.sequence_mean:
        return sequence_mean_loss(token_losses, mask)
    return token_sum_loss(token_losses, mask, cfg.max_new_tokens)


def accumulate_gradients(
    policy: PolicyValue,
    mb_batch: Batch,
    micro_batch_size: int,
    cfg: GRPOConfig,
    precision: Precision = FLOAT32,
    scaler: torch.amp.GradScaler | None = None,
    num_sequences: float | None = None,
    num_tokens: float | None = None,
) -> dict[str, float]:
    """Backward of one minibatch's loss, micro-batch by micro-batch; returns its statistics.

    The loss is the mean over the minibatch's sequences of each sequence's loss: every micro-batch's sequence losses
    are summed and divided by the whole minibatch's sequence count (``num_sequences``: of the minibatch of all ranks;
    None: ``mb_batch``'s), so accumulation gives the one-batch update. The token statistics (clip fraction,
    approximate KL) are means over the minibatch's tokens (``num_tokens``, likewise).
    """
    num_rows = mb_batch["mask"].shape[0]
    num_sequences = num_sequences or float(num_rows)
    num_tokens = num_tokens or float(mb_batch["mask"].sum())
    device = next(policy.parameters()).device
    totals: dict[str, float] = defaultdict(float)
    for start in range(0, num_rows, micro_batch_size):
        mb = select_rows(mb_batch, range(start, min(start + micro_batch_size, num_rows)))
        mb = {k: v.to(device) for k, v in mb.items()}
        with precision.autocast():  # the losses below are float32: forward() returns float32 logits
            logits, _ = policy(mb["input_ids"], mb["attention_mask"], mb["positions"])  # (B, T, V)
        logprobs = token_logprobs(logits, mb["response_ids"])  # (B, T)
        mask = mb["mask"]  # (B, T)
        token_losses = clipped_policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], cfg.clip_coef)  # (B, T)
        if cfg.tis_cap is not None:  # the rollout engine's numerics differ from the trainer's: correct for it
            token_losses = token_losses * truncated_importance_weights(
                mb["old_logprobs"], mb["sampler_logprobs"], cfg.tis_cap
            )
        if cfg.kl_coef > 0:  # KL(pi || pi_ref) at each sampled token, with the gradient of the current policy
            token_losses = token_losses + cfg.kl_coef * kl_estimate(logprobs, mb["ref_logprobs"], cfg.kl_estimator)
        loss = sequence_losses(token_losses, mask, cfg).sum() / num_sequences
        (loss if scaler is None else scaler.scale(loss)).backward()
        with torch.no_grad():
            ratio = torch.exp(logprobs - mb["old_logprobs"])  # (B, T)
            totals["loss"] += float(loss)
            totals["clip_fraction"] += float((((ratio - 1).abs() > cfg.clip_coef).float() * mask).sum()) / num_tokens
            approx_kl = kl_estimate(mb["old_logprobs"], logprobs, KLEstimator.k3)  # KL(pi_old || pi), (B, T)
            totals["approx_kl"] += float((approx_kl * mask).sum()) / num_tokens
    return dict(totals)


def grpo_update(
    policy: PolicyValue,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    cfg: GRPOConfig,
    *,
    minibatch_size: int,
    micro_batch_size: int,
    generator: torch.Generator,
    progress: str | None = None,
    precision: Precision = FLOAT32,
    scaler: torch.amp.GradScaler | None = None,
    data_parallel: DataParallel = SINGLE,
) -> dict[str, float]:
    """Phase 5: ``cfg.epochs`` shuffled passes of minibatch updates; the statistics averaged over minibatches.

    ``data_parallel``: ``batch`` is this rank's rows and ``minibatch_size`` its share of a minibatch; the gradients
    and statistics are summed over the ranks' minibatches (as ``ppo.ppo_update``). ``policy`` may be FSDP2-sharded
    (``training/sharding.py``), whose backward pass sums the gradients itself."""
    scaler = scaler or precision.grad_scaler()
    params = [p for p in policy.parameters() if p.requires_grad]
    gradient_sum = SINGLE if is_sharded(policy) else data_parallel  # FSDP2's reduce-scatter sums them
    stats: dict[str, list[float]] = defaultdict(list)
    num_rows = batch["mask"].shape[0]
    bar = tqdm(total=cfg.epochs * -(-num_rows // minibatch_size), desc=progress, disable=progress is None,
               dynamic_ncols=True)  # fmt: skip
    for _ in range(cfg.epochs):
        order = torch.randperm(num_rows, generator=generator).tolist()
        for start in range(0, num_rows, minibatch_size):
            mb_batch = select_rows(batch, order[start : start + minibatch_size])
            num_sequences = data_parallel.sum(float(mb_batch["mask"].shape[0]))  # the minibatch of all ranks
            num_tokens = data_parallel.sum(float(mb_batch["mask"].sum()))
            minibatch = accumulate_gradients(
                policy, mb_batch, micro_batch_size, cfg, precision, scaler, num_sequences, num_tokens
            )
            for name, value in data_parallel.sum_metrics(minibatch).items():
                stats[name].append(value)
            stats["grad_norm"].append(optimizer_step(optimizer, params, scaler, cfg.grad_clip, gradient_sum))
            bar.update()
    bar.close()
    return {name: sum(values) / len(values) for name, values in stats.items()}


# --------------------------------------------------------------------------------------------------- loop


def run(ctx: RunContext) -> EvalResult:
    """algo=grpo | rloo | dr_grpo: train ctx.model in place; returns the evaluation after the last step."""
    cfg: GRPOConfig = ctx.cfg.algo  # type: ignore[assignment]
    seed = ctx.cfg.seed
    model, tokenizer = ctx.model, ctx.tokenizer
    minibatch_size = cfg.minibatch_size or ctx.cfg.model.train_batch_size
    micro_batch_size = cfg.micro_batch_size or ctx.cfg.model.micro_batch_size
    data_parallel = ctx.data_parallel
    check_divisible(cfg.rollout_questions, minibatch_size, data_parallel.world_size, cfg.name)
    minibatch_size //= data_parallel.world_size  # each rank's share of a minibatch
    use_reference = cfg.kl_coef > 0  # no KL term: no reference model, and no forward pass through one
    adapters = lora_params(ctx.cfg.model)
    ref_model = None  # with LoRA pi_ref is the policy with its adapters off: no second copy of the weights
    if adapters is not None:
        attach_adapters(model, adapters)
    elif use_reference:  # pi_ref: the initial policy, frozen, held in the compute dtype (it only infers)
        ref_model = copy.deepcopy(model).to(ctx.precision.dtype).eval().requires_grad_(False)
    model.eval()  # no dropout: old and new log-probs agree before the first update
    saved = ctx.checkpoints.restore() if ctx.checkpoints is not None else None
    if saved is not None:  # resume after the last checkpointed step; the weights first: a sharded copy is made of them
        saved.load_modules(policy=model)
    policy = PolicyValue(model)
    # model.fsdp on several processes: the update trains an FSDP2-sharded copy, and the whole policy (which samples
    # and scores the rollouts) takes its weights after every update
    sharding = ctx.cfg.model.fsdp and data_parallel.active
    trained = shard(policy, data_parallel, ctx.precision.dtype) if sharding else policy
    lr = cfg.lr if cfg.lr is not None else ctx.cfg.model.lr / 10
    optimizer = torch.optim.AdamW(trained.trained_parameters()[0], lr=lr, weight_decay=0.0)
    scaler = ctx.precision.grad_scaler()  # float16's loss scale, kept across steps (off for float32 and bf16)
    generator = torch.Generator().manual_seed(seed)  # minibatch order
    sampling = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens, STOP_STRINGS)
    batches = question_batches(training_questions(ctx), cfg.rollout_questions, seed)
    samples_drawn = 0
    first_step = 1
    if saved is not None:  # the training state of the last checkpointed step (the RNG states came with it)
        load_full_optimizer_state(trained, optimizer, saved.data["optimizer"])
        if saved.data.get("grad_scaler"):  # empty unless float16
            scaler.load_state_dict(saved.data["grad_scaler"])
        generator.set_state(saved.data["generator"])
        samples_drawn = saved.data["samples_drawn"]
        first_step = saved.step + 1
        for _ in range(saved.step):  # the question batches already used
            next(batches)
    elif cfg.eval_init:
        evaluate_policy(ctx, step=0)

    for step in range(first_step, cfg.steps + 1):
        started = time.perf_counter()
        # 1. sample K solutions per question from the current policy (each rank: its shard of the questions, so
        #    whole groups)
        questions = data_parallel.shard(next(batches))
        problems, samples = sample_groups(ctx, questions, sampling, cfg.num_samples, seed + 1000 * step + 1,
                                          f"{cfg.name} step {step}: sample")  # fmt: skip
        samples_drawn += len(samples) * data_parallel.world_size
        sampled = time.perf_counter()

        # 2. token-level rewards
        scores, correct = score_samples(ctx, cfg, problems, samples)
        batch = pack_rollouts(tokenizer, [ctx.build_prompt(p.question) for p in problems], samples, scores)
        mask = batch["mask"]  # (N, T)
        check_finite(ctx, step, {"reward": batch["scores"]}, cfg.name)

        # 3. old log-probs, and the reference's when there is a KL term
        evaluate_rollouts(model, None, ref_model, batch, micro_batch_size, progress=f"{cfg.name} step {step}: score",
                          precision=ctx.precision, reference=use_reference)  # fmt: skip
        gap = rollout_logprob_gap(batch, cfg.tis_cap)

        # 4. each solution's reward against the other solutions of its question
        rewards, advantages = group_relative_advantages(batch, len(questions), cfg)  # (Q, K) each

        # 5. epochs of clipped minibatch updates
        stats = grpo_update(
            trained,
            optimizer,
            batch,
            cfg,
            minibatch_size=minibatch_size,
            micro_batch_size=micro_batch_size,
            generator=generator,
            progress=f"{cfg.name} step {step}: update",
            precision=ctx.precision,
            scaler=scaler,
            data_parallel=data_parallel,
        )
        if sharding:  # the updated weights, whole, for the next step's sampling and scoring
            gather_weights(trained, policy)
        check_finite(ctx, step, {f"{cfg.name} {name}": torch.tensor(v) for name, v in stats.items()}, cfg.name)

        # 6. log (every rank's rows: the ranks' means averaged, their shards are equal)
        kl = {}
        if use_reference:  # KL(pi_old || pi_ref) per sequence, estimated on the rollouts
            per_token = kl_estimate(batch["old_logprobs"], batch["ref_logprobs"], cfg.kl_estimator) * mask  # (N, T)
            kl = {"train/grpo_kl": float(per_token.sum(1).mean())}
        metrics = {
            "train/grpo_reward_mean": float(rewards.mean()),
            "train/grpo_fraction_correct": sum(correct) / len(correct),
            "train/grpo_zero_variance_fraction": zero_variance_fraction(rewards),
            "train/grpo_advantage_abs_mean": float(advantages.abs().mean()),
            "train/grpo_entropy": float(masked_mean(batch["entropy"], mask)),
            "train/grpo_response_length": float(mask.sum(1).mean()),
            **kl,
            **{f"train/grpo_{name}": value for name, value in stats.items()},
            **gap,
            **weight_push_metrics(ctx),
            "perf/grpo_sample_seconds": sampled - started,
            "perf/grpo_step_seconds": time.perf_counter() - started,
        }
        metrics = {**data_parallel.mean_metrics(metrics), "train/grpo_samples_drawn": samples_drawn}
        ctx.tracker.log_metrics(metrics, step=step)
        log.info(
            "%s step %d: reward %.3f, correct %.3f, zero-variance groups %.2f, clipped %.3f",
            cfg.name,
            step,
            metrics["train/grpo_reward_mean"],
            metrics["train/grpo_fraction_correct"],
            metrics["train/grpo_zero_variance_fraction"],
            metrics["train/grpo_clip_fraction"],
        )

        # 7. evaluate every algo.eval_every steps (the last step's evaluation follows its checkpoint, below)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            evaluate_policy(ctx, step=step)

        # 8. checkpoint every checkpoint_every steps and after the last: a run killed later resumes at step + 1
        if ctx.checkpoints is not None and ctx.checkpoints.due(step, last=step == cfg.steps):
            state = {  # whole tensors, as an unsharded run writes them (sharded: gathered to rank 0, the writer)
                "optimizer": full_optimizer_state(trained, optimizer),
                "grad_scaler": scaler.state_dict(),
                "generator": generator.get_state(),
                "samples_drawn": samples_drawn,
            }
            ctx.checkpoints.save(step, state, {"policy": model})
    # the final policy, evaluated after its checkpoint: a run killed while evaluating resumes after the last step and
    # only evaluates again
    result = evaluate_policy(ctx, step=cfg.steps)
    if adapters is not None:
        merge_adapters(model)  # the trained policy, as a plain model
    return result
