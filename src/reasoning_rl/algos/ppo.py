"""Proximal Policy Optimization with a value head and a KL penalty to the initial policy (Havrilla et al. 2024,
section 4.2; Schulman et al. 2017; the language-model recipe of Ziegler et al. 2019 and Stiennon et al. 2020).

Step k = 1 .. algo.steps:
  1. sample algo.num_samples solutions for each of algo.rollout_questions training questions from pi_{k-1}
  2. score every generated token with the reward (``scoring/rewards.py``): sparse, dense, orm or orm_dense
  3. one no-grad forward pass over the rollouts: old log-probs and values (policy and value head), reference
     log-probs (the frozen initial policy), entropy
  4. KL penalty: r_t <- r_t - kl_coef * KL_t, with KL_t the per-token estimate of KL(pi_{k-1} || pi_ref) (k1 or k3)
  5. advantages and returns with GAE(gamma, lam), advantages whitened over the batch
  6. algo.ppo_epochs passes over the rollouts in shuffled minibatches of algo.minibatch_size sequences: the clipped
     policy loss plus vf_coef x the clipped value loss, a token mean over the minibatch, accumulated over
     micro-batches, then gradient-norm clipping and an AdamW step. The first algo.critic_warmup_steps steps fit the
     value head alone instead (least squares on the trunk's features), so the first policy update has a baseline
  7. adapt kl_coef toward kl_target (Ziegler et al.'s controller) when algo.adaptive_kl; log train/ppo_* metrics
  8. evaluate every algo.eval_every steps and after the last step (and the init at step 0)
  9. checkpoint every ``checkpoint_every`` steps and after the last (``run/checkpointing.py``); a killed run resumes
     after its last checkpoint

Choices where the paper is silent (it used trlx's PPO):
- The value head is a linear layer on the policy's last hidden state (shared trunk), initialised to zero; it is
  trained with the policy by one AdamW optimizer (its own learning rate, algo.value_lr, 10x the policy's by
  default) and is not part of the saved or evaluated policy. The learning rate is constant after
  algo.warmup_updates steps of linear warm-up.
- gamma = lam = 1 by default: the advantage of a token is the solution's return minus the value there, so a
  poor early value head adds variance but no bias, and a reward at the last token reaches the first one whole.
- The loss is a token mean over the whole minibatch (not a mean of per-sequence means), so accumulating micro-batches
  gives the same update as one large batch.
- The model stays in eval mode throughout (no dropout), so old and new log-probs agree before the first update.
- An episode ends at its last generated token (EOS, a stop string or the length limit); nothing is bootstrapped.
- Log-probs are those of the untempered policy, whatever the rollout temperature (see ``rollout/native.py``).
- ``whiten_rewards`` scales the task rewards only, before the KL penalty, so kl_coef keeps its meaning.

Several processes (``training/distributed.py``): each rank samples and scores its shard of a step's questions and the
gradients are summed over the ranks. With ``model.fsdp`` the update trains an FSDP2-sharded copy of
:class:`PolicyValue` (``training/sharding.py``), made once; its weights are gathered into the whole policy and value
head after every update, which sample and score the next step.

    python main.py algo=ppo reward=sparse init=sft model=tiny task=arith
    python main.py algo=ppo reward=dense init=sft model=tiny task=arith

At the tiny scale the defaults move the policy too fast (lr = model.lr / 10 = 3e-4, 2 epochs of minibatches of 16);
tests/test_ppo.py uses what was calibrated there: algo.lr=1e-4 algo.ppo_epochs=1 algo.minibatch_size=64.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import nullcontext

import torch
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reasoning_rl.algos.context import RunContext, evaluate_policy, lora_params, training_questions
from reasoning_rl.algos.ppo_math import (
    adaptive_kl_coef,
    clipped_policy_loss,
    clipped_value_loss,
    entropy,
    explained_variance,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    ridge_normal_equations,
    solve_ridge,
    token_logprobs,
    truncated_importance_weights,
)
from reasoning_rl.config import ConfigError, GRPOConfig, KLEstimator, PPOConfig, RewardName
from reasoning_rl.rollout.sampler import Sample, SamplingParams
from reasoning_rl.scoring.evaluation import EvalResult
from reasoning_rl.scoring.rewards import (
    dense_rewards,
    orm_dense_rewards,
    orm_rewards,
    orm_step_prefixes,
    sparse_rewards,
    token_char_ends,
)
from reasoning_rl.tasks import Problem, is_correct
from reasoning_rl.tasks.prompts import STOP_STRINGS
from reasoning_rl.training.distributed import SINGLE, DataParallel
from reasoning_rl.training.finetune import TokenizedExample, collate
from reasoning_rl.training.lora import adapters_disabled, attach_adapters, merge_adapters
from reasoning_rl.training.precision import FLOAT32, Precision
from reasoning_rl.training.sharding import (
    full_optimizer_state,
    gather_weights,
    is_sharded,
    load_full_optimizer_state,
    scatter_weights,
    shard,
)

log = logging.getLogger(__name__)

# A rollout batch: tensors keyed by name. Per-sequence-position tensors (N, L): "input_ids", "attention_mask" (prompt
# + generated tokens, right-padded). Per-generated-token tensors (N, T): "positions" (the sequence position whose
# output predicts generated token t), "response_ids", "mask", "scores" (task rewards), then "old_logprobs",
# "ref_logprobs", "old_values", "entropy", "advantages", "returns" as phases 3-5 fill them.
Batch = dict[str, torch.Tensor]
SEQUENCE_KEYS = ("input_ids", "attention_mask")


# --------------------------------------------------------------------------------------------- plumbing


def question_batches(train: Sequence[Problem], size: int, seed: int) -> Iterator[list[Problem]]:
    """Endless batches of ``size`` training questions: a seeded shuffle, reshuffled at every pass over the data."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        while len(order) < size:
            order += rng.sample(range(len(train)), len(train))
        yield [train[i] for i in order[:size]]
        order = order[size:]


def new_value_head(model: PreTrainedModel) -> torch.nn.Linear:
    """A scalar per position on the policy's last hidden state, zero at the start (V = 0 everywhere)."""
    head = torch.nn.Linear(model.config.hidden_size, 1, device=model.device, dtype=model.dtype)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


def pack_rollouts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    samples: Sequence[Sample],
    scores: Sequence[torch.Tensor],
) -> Batch:
    """Prompt + generated tokens per sample (the prompt tokenized as the sampler does), right-padded."""
    prompt_ids = {p: tokenizer(p)["input_ids"] for p in set(prompts)}
    examples = [
        TokenizedExample(prompt_ids[p] + s.token_ids, len(prompt_ids[p])) for p, s in zip(prompts, samples, strict=True)
    ]
    batch = collate(examples, tokenizer.pad_token_id)
    del batch["labels"]
    num_positions = max(len(s.token_ids) for s in samples)
    prompt_lens = torch.tensor([ex.prompt_len for ex in examples])  # (N,)
    positions = prompt_lens[:, None] - 1 + torch.arange(num_positions)[None]  # (N, T)
    batch["positions"] = positions.clamp(max=batch["input_ids"].shape[1] - 1)
    batch["response_ids"] = torch.zeros(len(samples), num_positions, dtype=torch.long)  # (N, T)
    batch["mask"] = torch.zeros(len(samples), num_positions)  # (N, T)
    batch["scores"] = torch.zeros(len(samples), num_positions)  # (N, T)
    batch["sampler_logprobs"] = torch.zeros(len(samples), num_positions)  # (N, T): the rollout engine's own
    for row, (sample, score) in enumerate(zip(samples, scores, strict=True)):
        n = len(sample.token_ids)
        batch["response_ids"][row, :n] = torch.tensor(sample.token_ids)
        batch["sampler_logprobs"][row, :n] = torch.tensor(sample.logprobs)
        batch["mask"][row, :n] = 1.0
        batch["scores"][row, :n] = score
    return batch


def select_rows(batch: Batch, rows: Sequence[int]) -> Batch:
    """The given sequences, with the padding columns none of them uses cut off."""
    index = torch.tensor(list(rows))
    width = int(batch["attention_mask"][index].sum(1).max())
    num_positions = int(batch["mask"][index].sum(1).max())
    selected = {k: v[index, :width] if k in SEQUENCE_KEYS else v[index, :num_positions] for k, v in batch.items()}
    selected["positions"] = selected["positions"].clamp(max=width - 1)  # padding positions point inside the rows
    return selected


def response_features(model: PreTrainedModel, mb: Batch) -> torch.Tensor:
    """The trunk's last hidden state at the positions that predict generated tokens. (B, T, H)"""
    device = next(model.parameters()).device
    hidden = model.base_model(
        input_ids=mb["input_ids"].to(device), attention_mask=mb["attention_mask"].to(device)
    ).last_hidden_state  # (B, L, H)
    index = mb["positions"].to(device)[..., None].expand(-1, -1, hidden.shape[-1])  # (B, T, H)
    return hidden.gather(1, index)  # (B, T, H)


def forward(
    model: PreTrainedModel, value_head: torch.nn.Module | None, mb: Batch
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (B, T, V) at the positions that predict generated tokens, and values (B, T) (None without a head).

    The trunk runs once; the LM head (and value head) only at the positions that predict generated tokens.
    """
    hidden = response_features(model, mb)  # (B, T, H)
    logits = model.get_output_embeddings()(hidden).float()  # (B, T, V)
    values = value_head(hidden).squeeze(-1).float() if value_head is not None else None  # (B, T)
    return logits, values


class PolicyValue(torch.nn.Module):
    """The policy and its value head (None: a critic-free algorithm) as one module whose forward is :func:`forward`'s:
    what the update trains. With ``model.fsdp`` it is what FSDP2 shards (``training/sharding.py``): its own forward
    gathers the root unit (embeddings, LM head, value head), which calling the policy's trunk directly would not."""

    def __init__(self, policy: PreTrainedModel, value_head: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # integer tensors only: FSDP2's mixed precision casts a forward's floating-point inputs to the compute dtype
        mb = {"input_ids": input_ids, "attention_mask": attention_mask, "positions": positions}
        return forward(self.policy, self.value_head, mb)

    def trained_parameters(self) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """The policy's trainable parameters (all, or its LoRA adapters) and the value head's."""
        policy = [p for p in self.policy.parameters() if p.requires_grad]
        return policy, list(self.value_head.parameters()) if self.value_head is not None else []


# ----------------------------------------------------------------------------------------- phases 2 and 3


def sample_groups(
    ctx: RunContext, questions: Sequence[Problem], sampling: SamplingParams, num_samples: int, seed: int, progress: str
) -> tuple[list[Problem], list[Sample]]:
    """Phase 1: ``num_samples`` solutions per question from the current policy, through the run's sampler, flattened
    with each sample's problem beside it (a question's samples adjacent)."""
    grouped = ctx.sampler(
        ctx.model,
        ctx.tokenizer,
        [ctx.build_prompt(p.question) for p in questions],
        sampling,
        num_samples=num_samples,
        seed=seed,
        batch_size=ctx.cfg.model.sample_batch_size,
        progress=progress,
    )
    problems = [p for p, group in zip(questions, grouped, strict=True) for _ in group]
    return problems, [s for group in grouped for s in group]


def score_samples(
    ctx: RunContext, cfg: PPOConfig | GRPOConfig, problems: Sequence[Problem], samples: Sequence[Sample]
) -> tuple[list[torch.Tensor], list[bool]]:
    """Phase 2: the token-level rewards of each sample (one (T,) tensor each), and whether it is correct."""
    reward = ctx.cfg.reward
    correct = [is_correct(s.text, p.answer) for p, s in zip(problems, samples, strict=True)]
    pairs = list(zip(problems, samples, correct, strict=True))
    if reward.name == RewardName.sparse:
        rewards = [sparse_rewards(len(s.token_ids), c, reward.correct_reward) for _, s, c in pairs]
    elif reward.name == RewardName.dense:
        rewards = [
            dense_rewards(
                p.reference, s.text, token_char_ends(ctx.tokenizer, s.token_ids), c, reward.correct_reward,
                reward.step_reward,
            )
            for p, s, c in pairs
        ]  # fmt: skip
    elif reward.name == RewardName.orm:
        scores = orm_scores(ctx, problems, [[s.text] for s in samples])
        rewards = [orm_rewards(len(s.token_ids), xs[0]) for s, xs in zip(samples, scores, strict=True)]
    else:  # orm_dense
        scores = orm_scores(ctx, problems, [orm_step_prefixes(s.text) for s in samples])
        rewards = [
            orm_dense_rewards(s.text, token_char_ends(ctx.tokenizer, s.token_ids), xs)
            for s, xs in zip(samples, scores, strict=True)
        ]
    if reward.name in (RewardName.orm, RewardName.orm_dense) and cfg.orm_add_correct:  # the ORM's + the ground truth's
        rewards = [r + sparse_rewards(len(r), c, reward.correct_reward) for r, c in zip(rewards, correct, strict=True)]
    return rewards, correct


def orm_scores(ctx: RunContext, problems: Sequence[Problem], prefixes: Sequence[Sequence[str]]) -> list[list[float]]:
    """The ORM's P(correct) after each of a sample's prefixes, grouped like ``prefixes``, in one batched call."""
    assert ctx.orm is not None  # the pipeline loads it for reward=orm|orm_dense
    orm_prompt = ctx.orm_prompt or ctx.build_prompt
    flat = iter(
        ctx.orm.score_prefixes(
            [orm_prompt(p.question) for p, group in zip(problems, prefixes, strict=True) for _ in group],
            [prefix for group in prefixes for prefix in group],
        )
    )
    return [[next(flat) for _ in group] for group in prefixes]


@torch.no_grad()
def evaluate_rollouts(
    model: PreTrainedModel,
    value_head: torch.nn.Module | None,
    ref_model: PreTrainedModel | None,
    batch: Batch,
    micro_batch_size: int,
    progress: str | None = None,
    precision: Precision = FLOAT32,
    reference: bool = True,
) -> None:
    """Phase 3: fill old_logprobs, old_values, entropy (policy) and ref_logprobs (reference) in ``batch``.

    ``value_head`` None: no old_values (a critic-free algorithm). ``ref_model`` None: the reference is ``model`` with
    its LoRA adapters switched off (``model.lora_rank > 0``); ``reference=False``: no reference at all, no
    ref_logprobs. ``progress``: a progress bar over the micro-batches with this description (None: no bar)."""
    shape = batch["mask"].shape
    keys = ["old_logprobs", "entropy", *(["old_values"] if value_head is not None else []),
            *(["ref_logprobs"] if reference else [])]  # fmt: skip
    for key in keys:
        batch[key] = torch.zeros(shape)  # (N, T)
    starts = range(0, shape[0], micro_batch_size)
    for start in tqdm(starts, desc=progress, disable=progress is None, dynamic_ncols=True):
        rows = list(range(start, min(start + micro_batch_size, shape[0])))
        mb = select_rows(batch, rows)
        n = mb["mask"].shape[1]
        response_ids = mb["response_ids"].to(next(model.parameters()).device)
        with precision.autocast():
            logits, values = forward(model, value_head, mb)  # (B, n, V), (B, n)
        batch["old_logprobs"][rows, :n] = token_logprobs(logits, response_ids).cpu()
        batch["entropy"][rows, :n] = entropy(logits).cpu()
        if values is not None:
            batch["old_values"][rows, :n] = values.cpu()
        if reference:
            with precision.autocast(), adapters_disabled(model) if ref_model is None else nullcontext():
                ref_logits, _ = forward(model if ref_model is None else ref_model, None, mb)
            batch["ref_logprobs"][rows, :n] = token_logprobs(ref_logits, response_ids).cpu()
    for key in keys:
        batch[key] *= batch["mask"]


def rollout_logprob_gap(batch: Batch, tis_cap: float | None) -> dict[str, float]:
    """How far the rollout engine's log-probs of the sampled tokens are from the trainer's (``old_logprobs``):
    mean and max of |difference| over the batch's tokens, and the mean truncated importance weight. The gap is
    ~1e-6 for our sampler (the same model in other batches); vLLM's own kernels, or another dtype, widen it."""
    mask = batch["mask"].bool()
    gap = (batch["old_logprobs"] - batch["sampler_logprobs"]).abs()[mask]
    metrics = {"rollout/logprob_gap_mean": float(gap.mean()), "rollout/logprob_gap_max": float(gap.max())}
    if tis_cap is not None:
        weights = truncated_importance_weights(batch["old_logprobs"], batch["sampler_logprobs"], tis_cap)
        metrics["rollout/tis_weight_mean"] = float(weights[mask].mean())
    return metrics


def weight_push_metrics(ctx: RunContext) -> dict[str, float]:
    """``perf/weight_push_seconds`` since the last call, for an engine that is pushed the policy's weights."""
    pop = getattr(ctx.sampler, "pop_push_seconds", None)
    return {"perf/weight_push_seconds": pop()} if pop is not None else {}


# ------------------------------------------------------------------------------------------------ phase 6


def accumulate_gradients(
    policy_value: PolicyValue,
    mb_batch: Batch,
    micro_batch_size: int,
    cfg: PPOConfig,
    precision: Precision = FLOAT32,
    scaler: torch.amp.GradScaler | None = None,
    num_tokens: float | None = None,
) -> dict[str, float]:
    """Backward of one minibatch's loss, micro-batch by micro-batch; returns its token-mean statistics.

    Every micro-batch's summed token losses are divided by the whole minibatch's token count (``num_tokens``: of
    the minibatch of all ranks; None: ``mb_batch``'s), so the accumulated gradient is that of the minibatch's
    token-mean loss whatever the micro-batch size.
    """
    num_tokens = num_tokens or float(mb_batch["mask"].sum())
    totals: dict[str, float] = defaultdict(float)
    num_rows = mb_batch["mask"].shape[0]
    for start in range(0, num_rows, micro_batch_size):
        mb = select_rows(mb_batch, range(start, min(start + micro_batch_size, num_rows)))
        device = next(policy_value.parameters()).device
        mb = {k: v.to(device) for k, v in mb.items()}
        with precision.autocast():  # the losses below are float32: forward() returns float32 logits and values
            logits, values = policy_value(mb["input_ids"], mb["attention_mask"], mb["positions"])  # (B, T, V), (B, T)
        logprobs = token_logprobs(logits, mb["response_ids"])  # (B, T)
        mask = mb["mask"]  # (B, T)
        policy_loss = clipped_policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], cfg.clip_coef)  # (B, T)
        if cfg.tis_cap is not None:  # the rollout engine's numerics differ from the trainer's: correct for it
            policy_loss = policy_loss * truncated_importance_weights(
                mb["old_logprobs"], mb["sampler_logprobs"], cfg.tis_cap
            )
        value_loss = clipped_value_loss(values, mb["old_values"], mb["returns"], cfg.value_clip)  # (B, T)
        loss = ((policy_loss + cfg.vf_coef * value_loss) * mask).sum() / num_tokens
        (loss if scaler is None else scaler.scale(loss)).backward()
        with torch.no_grad():
            ratio = torch.exp(logprobs - mb["old_logprobs"])  # (B, T)
            value_moved = (values - mb["old_values"]).abs() > cfg.value_clip  # (B, T)
            for name, per_token in (
                ("policy_loss", policy_loss),
                ("value_loss", value_loss),
                ("clip_fraction", ((ratio - 1).abs() > cfg.clip_coef).float()),
                ("value_clip_fraction", value_moved.float()),
                ("approx_kl", kl_estimate(mb["old_logprobs"], logprobs, KLEstimator.k3)),  # KL(pi_old || pi)
            ):
                totals[name] += float((per_token * mask).sum()) / num_tokens
    return dict(totals)


def ppo_update(
    policy_value: PolicyValue,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    cfg: PPOConfig,
    *,
    minibatch_size: int,
    micro_batch_size: int,
    generator: torch.Generator,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    progress: str | None = None,
    precision: Precision = FLOAT32,
    scaler: torch.amp.GradScaler | None = None,
    data_parallel: DataParallel = SINGLE,
) -> dict[str, float]:
    """Phase 6: ``cfg.ppo_epochs`` shuffled passes of minibatch updates; the statistics averaged over minibatches.

    ``progress``: a progress bar over the optimizer steps with this description (None: no bar). ``precision``: the
    forward passes' autocast; ``scaler``: float16's loss scaling, kept across calls (None: one for this call).
    ``data_parallel``: ``batch`` is this rank's rows and ``minibatch_size`` its share of a minibatch; the
    gradients and statistics are summed over the ranks' minibatches. ``policy_value`` may be FSDP2-sharded
    (``training/sharding.py``), whose backward pass sums the gradients itself."""
    scaler = scaler or precision.grad_scaler()
    params = [p for p in policy_value.parameters() if p.requires_grad]
    gradient_sum = SINGLE if is_sharded(policy_value) else data_parallel  # FSDP2's reduce-scatter sums them
    stats: dict[str, list[float]] = defaultdict(list)
    num_rows = batch["mask"].shape[0]
    updates = cfg.ppo_epochs * -(-num_rows // minibatch_size)
    bar = tqdm(total=updates, desc=progress, disable=progress is None, dynamic_ncols=True)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(num_rows, generator=generator).tolist()
        for start in range(0, num_rows, minibatch_size):
            mb_batch = select_rows(batch, order[start : start + minibatch_size])
            num_tokens = data_parallel.sum(float(mb_batch["mask"].sum()))  # the minibatch of all ranks
            minibatch = accumulate_gradients(
                policy_value, mb_batch, micro_batch_size, cfg, precision, scaler, num_tokens
            )
            for name, value in data_parallel.sum_metrics(minibatch).items():
                stats[name].append(value)
            stats["grad_norm"].append(optimizer_step(optimizer, params, scaler, cfg.grad_clip, gradient_sum))
            if scheduler is not None:
                scheduler.step()
            bar.update()
    bar.close()
    return {name: sum(values) / len(values) for name, values in stats.items()}


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    scaler: torch.amp.GradScaler,
    grad_clip: float,
    data_parallel: DataParallel = SINGLE,
) -> float:
    """The accumulated gradients summed over the ranks, unscaled (float16), clipped to ``grad_clip``, one optimizer
    step, then zeroed; returns the gradient norm before clipping."""
    data_parallel.sum_gradients(params)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if isinstance(grad_norm, DTensor):  # the norm of sharded gradients: the same value on every rank
        grad_norm = grad_norm.full_tensor()
    scaler.step(optimizer)  # float16: skipped when the gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


@torch.no_grad()
def fit_value_head(
    model: PreTrainedModel,
    value_head: torch.nn.Linear,
    batch: Batch,
    micro_batch_size: int,
    ridge: float,
    precision: Precision = FLOAT32,
    data_parallel: DataParallel = SINGLE,
) -> float:
    """The critic warm-up: set the value head to the least-squares fit of the batch's returns on the trunk's
    features at every generated token (ridge-regularised, ``ppo_math.solve_ridge``); returns the fit's explained
    variance on the batch. The trunk is untouched, so the policy is too.

    Why a fit rather than gradient steps: the zero head must first learn the mean return (~0.7 for a good SFT
    init) and AdamW moves a weight about one learning rate per update, so at PPO's learning rates it took most of
    a run to get there (explained variance stayed below 0 for 16 steps of 4 updates at value_lr 1e-3).
    """
    xtx, xty = None, None
    for start in range(0, batch["mask"].shape[0], micro_batch_size):
        mb = select_rows(batch, range(start, min(start + micro_batch_size, batch["mask"].shape[0])))
        with precision.autocast():
            features = response_features(model, mb)  # (B, T, H)
        sums = ridge_normal_equations(features.float().cpu(), mb["returns"], mb["mask"])  # the solve in float32
        xtx, xty = sums if xtx is None else (xtx + sums[0], xty + sums[1])
    # the normal equations of all ranks' rows: every rank fits the same head
    weight, bias = solve_ridge(data_parallel.sum_tensor(xtx), data_parallel.sum_tensor(xty), ridge)
    value_head.weight.copy_(weight.to(value_head.weight)[None])
    value_head.bias.fill_(bias)
    fitted = torch.zeros_like(batch["returns"])  # (N, T)
    for start in range(0, batch["mask"].shape[0], micro_batch_size):
        rows = list(range(start, min(start + micro_batch_size, batch["mask"].shape[0])))
        mb = select_rows(batch, rows)
        with precision.autocast():
            fitted[rows, : mb["mask"].shape[1]] = value_head(response_features(model, mb)).squeeze(-1).float().cpu()
    return explained_variance(fitted, batch["returns"], batch["mask"])


def check_divisible(rollout_questions: int, minibatch_size: int, world_size: int, algo: str = "ppo") -> None:
    """With several ranks each samples an equal share of a step's questions and trains on an equal share of each
    minibatch (the ranks meet once per optimizer step, so they must take the same number of them)."""
    if rollout_questions % world_size or minibatch_size % world_size:
        raise ConfigError(
            f"algo={algo} on {world_size} processes splits each step's algo.rollout_questions={rollout_questions} "
            f"questions and each minibatch of {minibatch_size} rows (algo.minibatch_size, or model.train_batch_size) "
            f"evenly between them: make both multiples of {world_size}, or launch a number of processes that divides "
            "them."
        )


def check_finite(ctx: RunContext, step: int, values: dict[str, torch.Tensor], algo: str = "PPO") -> None:
    """Stop the run at the first NaN or infinity in a reward or the loss: nothing after it can be trusted, and the
    state it would poison is not checkpointed, so the last good checkpoint stays the one a rerun resumes from."""
    for name, value in values.items():
        if not bool(torch.isfinite(value).all()):
            kept = ctx.checkpoints.describe_latest() if ctx.checkpoints is not None else "no checkpoint (none asked)"
            raise FloatingPointError(
                f"{algo} step {step}: the {name} is not finite (NaN or infinity); lower algo.lr or check the reward. "
                f"The run stops here; kept: {kept}."
            )


# --------------------------------------------------------------------------------------------------- loop


def run(ctx: RunContext) -> EvalResult:
    """algo=ppo: train ctx.model in place; returns the evaluation after the last step."""
    cfg: PPOConfig = ctx.cfg.algo  # type: ignore[assignment]
    seed = ctx.cfg.seed
    model, tokenizer = ctx.model, ctx.tokenizer
    minibatch_size = cfg.minibatch_size or ctx.cfg.model.train_batch_size
    micro_batch_size = cfg.micro_batch_size or ctx.cfg.model.micro_batch_size
    data_parallel = ctx.data_parallel
    check_divisible(cfg.rollout_questions, minibatch_size, data_parallel.world_size)
    minibatch_size //= data_parallel.world_size  # each rank's share of a minibatch
    adapters = lora_params(ctx.cfg.model)
    if adapters is None:
        # pi_ref: the initial policy, frozen, held in the compute dtype (it only infers)
        ref_model = copy.deepcopy(model).to(ctx.precision.dtype).eval().requires_grad_(False)
    else:  # pi_ref is the policy with its adapters off: no second copy of the weights
        ref_model = None
        attach_adapters(model, adapters)
    model.eval()  # no dropout: see the module docstring
    value_head = new_value_head(model)
    saved = ctx.checkpoints.restore() if ctx.checkpoints is not None else None
    if saved is not None:  # resume after the last checkpointed step; the weights first: a sharded copy is made of them
        saved.load_modules(policy=model, value_head=value_head)
    policy_value = PolicyValue(model, value_head)
    # model.fsdp on several processes: the update trains an FSDP2-sharded copy, and the whole policy and value head
    # (which sample and score the rollouts) take its weights after every update
    sharding = ctx.cfg.model.fsdp and data_parallel.active
    trained = shard(policy_value, data_parallel, ctx.precision.dtype) if sharding else policy_value
    lr = cfg.lr if cfg.lr is not None else ctx.cfg.model.lr / 10
    policy_params, head_params = trained.trained_parameters()
    optimizer = torch.optim.AdamW(
        [{"params": policy_params}, {"params": head_params, "lr": cfg.value_lr or 10 * lr}], lr=lr, weight_decay=0.0
    )
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda update: min(1.0, (update + 1) / (cfg.warmup_updates + 1))
    )
    scaler = ctx.precision.grad_scaler()  # float16's loss scale, kept across steps (off for float32 and bf16)
    generator = torch.Generator().manual_seed(seed)  # minibatch order
    sampling = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens, STOP_STRINGS)
    batches = question_batches(training_questions(ctx), cfg.rollout_questions, seed)
    kl_coef = cfg.kl_coef
    samples_drawn = 0
    first_step = 1
    if saved is not None:  # the training state of the last checkpointed step (the RNG states came with it)
        load_full_optimizer_state(trained, optimizer, saved.data["optimizer"])
        warmup.load_state_dict(saved.data["scheduler"])
        if saved.data.get("grad_scaler"):  # empty unless float16
            scaler.load_state_dict(saved.data["grad_scaler"])
        generator.set_state(saved.data["generator"])
        kl_coef, samples_drawn = saved.data["kl_coef"], saved.data["samples_drawn"]
        first_step = saved.step + 1
        for _ in range(saved.step):  # the question batches already used
            next(batches)
    elif cfg.eval_init:
        evaluate_policy(ctx, step=0)

    for step in range(first_step, cfg.steps + 1):
        started = time.perf_counter()
        # 1. sample K solutions per question from the current policy (each rank: its shard of the questions)
        questions = data_parallel.shard(next(batches))
        problems, samples = sample_groups(ctx, questions, sampling, cfg.num_samples, seed + 1000 * step + 1,
                                          f"PPO step {step}: sample")  # fmt: skip
        samples_drawn += len(samples) * data_parallel.world_size
        sampled = time.perf_counter()

        # 2. token-level rewards
        scores, correct = score_samples(ctx, cfg, problems, samples)
        batch = pack_rollouts(tokenizer, [ctx.build_prompt(p.question) for p in problems], samples, scores)
        mask = batch["mask"]  # (N, T)
        check_finite(ctx, step, {"reward": batch["scores"]})
        task_rewards = masked_whiten(batch["scores"], mask, shift_mean=False) if cfg.whiten_rewards else batch["scores"]

        # 3. old log-probs, values and reference log-probs
        evaluate_rollouts(model, value_head, ref_model, batch, micro_batch_size, progress=f"PPO step {step}: score",
                          precision=ctx.precision)  # fmt: skip
        gap = rollout_logprob_gap(batch, cfg.tis_cap)

        # 4. KL penalty to the reference policy, at every token
        kl = kl_estimate(batch["old_logprobs"], batch["ref_logprobs"], cfg.kl_estimator) * mask  # (N, T)
        rewards = task_rewards - kl_coef * kl  # (N, T)

        # 5. GAE advantages and returns
        advantages, batch["returns"] = gae(rewards, batch["old_values"], mask, cfg.gamma, cfg.lam)  # (N, T)
        batch["advantages"] = masked_whiten(advantages, mask) if cfg.whiten_advantages else advantages

        # 6. PPO epochs of clipped minibatch updates; during the critic warm-up, a least-squares fit of the value
        #    head instead (the policy is not updated)
        stats, fit = {}, {}
        if step <= cfg.critic_warmup_steps:  # the fit's explained variance is NaN when the returns do not vary (a
            # policy that never gets a reward), which is no reason to stop: it is logged, not checked
            explained = fit_value_head(model, value_head, batch, micro_batch_size, cfg.critic_warmup_ridge,
                                       ctx.precision, data_parallel)  # fmt: skip
            fit = {"train/ppo_critic_warmup_explained_variance": explained}
            if sharding:  # the fitted head into the shards that train it
                head_names = [f"value_head.{name}" for name, _ in value_head.named_parameters()]
                scatter_weights(policy_value, trained, head_names)
        else:
            stats = ppo_update(
                trained,
                optimizer,
                batch,
                cfg,
                minibatch_size=minibatch_size,
                micro_batch_size=micro_batch_size,
                generator=generator,
                scheduler=warmup,
                progress=f"PPO step {step}: update",
                precision=ctx.precision,
                scaler=scaler,
                data_parallel=data_parallel,
            )
            if sharding:  # the updated weights, whole, for the next step's sampling and scoring
                gather_weights(trained, policy_value)
        check_finite(ctx, step, {"KL penalty": kl, **{f"ppo {name}": torch.tensor(v) for name, v in stats.items()}})

        # 7. adapt the KL coefficient, log (every rank's rows: the ranks' means averaged, their shards are equal)
        sequence_kl = float(kl.sum(1).mean())  # KL(pi || pi_ref) per sequence, estimated on the rollouts
        metrics = {
            "train/ppo_reward_mean": float(batch["scores"].sum(1).mean()),
            "train/ppo_total_reward_mean": float(rewards.sum(1).mean()),
            "train/ppo_fraction_correct": sum(correct) / len(correct),
            "train/ppo_kl": sequence_kl,
            "train/ppo_kl_coef": kl_coef,
            "train/ppo_entropy": float(masked_mean(batch["entropy"], mask)),
            "train/ppo_explained_variance": explained_variance(batch["old_values"], batch["returns"], mask),
            "train/ppo_response_length": float(mask.sum(1).mean()),
            "train/ppo_samples_drawn": samples_drawn,
            **{f"train/ppo_{name}": value for name, value in stats.items()},
            **fit,
            **gap,
            **weight_push_metrics(ctx),
            "perf/ppo_sample_seconds": sampled - started,
            "perf/ppo_step_seconds": time.perf_counter() - started,
        }
        metrics = {**data_parallel.mean_metrics(metrics), "train/ppo_samples_drawn": samples_drawn}
        sequence_kl = metrics["train/ppo_kl"]
        ctx.tracker.log_metrics(metrics, step=step)
        log.info(
            "PPO step %d: reward %.3f, correct %.3f, KL %.3f, entropy %.3f",
            step,
            metrics["train/ppo_reward_mean"],
            metrics["train/ppo_fraction_correct"],
            sequence_kl,
            metrics["train/ppo_entropy"],
        )
        if cfg.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, sequence_kl, cfg.kl_target, cfg.kl_horizon,
                                       len(samples) * data_parallel.world_size)  # fmt: skip

        # 8. evaluate every algo.eval_every steps (the last step's evaluation follows its checkpoint, below)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            evaluate_policy(ctx, step=step)

        # 9. checkpoint every checkpoint_every steps and after the last: a run killed later resumes at step + 1
        if ctx.checkpoints is not None and ctx.checkpoints.due(step, last=step == cfg.steps):
            state = {  # whole tensors, as an unsharded run writes them (sharded: gathered to rank 0, the writer)
                "optimizer": full_optimizer_state(trained, optimizer),
                "scheduler": warmup.state_dict(),
                "grad_scaler": scaler.state_dict(),
                "generator": generator.get_state(),
                "kl_coef": kl_coef,
                "samples_drawn": samples_drawn,
            }
            ctx.checkpoints.save(step, state, {"policy": model, "value_head": value_head})
    # the final policy, evaluated after its checkpoint: a run killed while evaluating (~30 min on SmolLM2) resumes
    # after the last step and only evaluates again
    result = evaluate_policy(ctx, step=cfg.steps)
    if adapters is not None:
        merge_adapters(model)  # the trained policy, as a plain model
    return result
