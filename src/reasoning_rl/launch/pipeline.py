"""One experiment = one job of a sweep: init -> algorithm -> evaluation, logged to one tracker run.

The pipeline (``run_experiment``):
  1. resolve paths and check the output directory is writable (fail before any work)
  2. load the task, the policy and its tokenizer
  3. pretrain the tiny model when ``model.pretrain_steps`` asks for it (a cached stage); apply the init: few-shot
     prompting (``pretrained``) or supervised fine-tuning (``sft``); load or train the
     ORM when the reward needs it (``reward=orm|orm_dense``) or ``orm.rerank=true``
  4. run the algorithm, looked up by name in ``ALGOS``
  5. evaluate on the test split and log eval/ metrics and the per-problem samples
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from reasoning_rl.algos import ei, grpo, orm, ppo, rcrl
from reasoning_rl.algos.context import RunContext, evaluate_policy, finetune_params, training_questions
from reasoning_rl.config import (
    ConfigError,
    DType,
    ExperimentConfig,
    GSM8KTaskConfig,
    InitName,
    ModelSource,
    RolloutName,
    SVAMPTaskConfig,
)
from reasoning_rl.models.loading import load_checkpoint, load_policy, resolve_device, save_checkpoint
from reasoning_rl.rollout.native import CastSampler, generate
from reasoning_rl.rollout.sampler import Sampler
from reasoning_rl.run.checkpointing import Checkpointer, checkpoint_bytes
from reasoning_rl.run.stages import (
    cached_stage,
    cached_stage_together,
    data_fingerprint,
    init_stage_inputs,
    model_stage_inputs,
    progress_dir,
)
from reasoning_rl.run.tracking import Tracker
from reasoning_rl.scoring.evaluation import EvalResult, write_records
from reasoning_rl.tasks import load_task
from reasoning_rl.tasks.arith import generate_arith_corpus
from reasoning_rl.tasks.prompts import build_prompt, pick_exemplars
from reasoning_rl.training.distributed import SINGLE, DataParallel
from reasoning_rl.training.finetune import FinetuneParams, finetune
from reasoning_rl.training.precision import TORCH_DTYPES, Precision, dtype_name, resolve_compute_dtype

log = logging.getLogger(__name__)

# The algorithms that split their sampling and training between the processes of a data-parallel job (distributed.py)
DATA_PARALLEL_ALGOS = frozenset({"none", "ei", "ppo", "grpo", "rloo", "dr_grpo"})
ARTIFACT_SIZE_LIMIT = 50 * 2**20  # checkpoints larger than this are referenced by path, not copied into MLflow


def run_none(ctx: RunContext) -> None:
    """algo=none: the initial policy is evaluated as it is (the paper's "SFT" and "Prompted" rows)."""


# An algorithm trains ctx.model in place. One that evaluates as it goes (EI after every round) returns its last
# evaluation, so the pipeline does not repeat it; otherwise it returns None and the pipeline evaluates.
ALGOS: dict[str, Callable[[RunContext], EvalResult | None]] = {
    "none": run_none,
    "ei": ei.run,
    "rcrl": rcrl.run,
    "ppo": ppo.run,
    "grpo": grpo.run,  # beyond the paper: the three are one loop, their options differ (config.py)
    "rloo": grpo.run,
    "dr_grpo": grpo.run,
}


def resolve_paths(cfg: ExperimentConfig, base: Path) -> None:
    """Make user-given relative paths absolute against ``base`` (where the command was typed), in place."""

    def absolute(path: str) -> str:
        return str((base / Path(path).expanduser()).resolve())

    if isinstance(cfg.task, GSM8KTaskConfig) and cfg.task.data_dir is not None:  # None = the hub
        cfg.task.data_dir = absolute(cfg.task.data_dir)
    if isinstance(cfg.task, SVAMPTaskConfig) and cfg.task.data_path is not None:
        cfg.task.data_path = absolute(cfg.task.data_path)
    if cfg.model.source in (ModelSource.local, ModelSource.gguf) and cfg.model.path is not None:
        cfg.model.path = absolute(cfg.model.path)
    cfg.cache_dir = absolute(cfg.cache_dir)


def check_writable(directory: Path) -> None:
    """Fail now, not after hours of training, when results could not be saved."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise OSError(
            f"cannot write to output directory {directory}: {error}. Set hydra.run.dir to a writable place."
        ) from error


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# What the pretraining corpus is (part of the stage key): documents of at most max_chars characters, the tiny
# model's shortest context (384) less BOS and EOS, whatever model.max_seq_len a run has, so that init=sft (384) and
# init=pretrained (longer, for its few-shot prompts) share one stage: the tiny model has no positional parameters.
PRETRAIN_CORPUS = {"generator": "generate_arith_corpus", "max_chars": 382, "max_steps": 3, "max_number": 20}


def apply_pretraining(ctx: RunContext) -> None:
    """``model.pretrain_steps > 0`` (the tiny model): replace the random network in ``ctx.model`` by one trained on
    next-token prediction over generated prose about sums (tasks/arith.py), the tiny scale's pretrained model.

    Every weight is trained (no LoRA), at ``model.lr``, on documents that never show the task's format or a test
    question. A cached stage keyed on the model (less its context length), the seed and the test questions: every
    job of a sweep with the same model and seed shares it, and the SFT stage, which keys on the model config, starts
    from it.
    """
    cfg = ctx.cfg
    steps = cfg.model.pretrain_steps
    if not steps:
        return
    model_inputs = {k: v for k, v in model_stage_inputs(cfg).items() if k != "max_seq_len"}
    inputs = {"model": model_inputs, "seed": cfg.seed, "corpus": PRETRAIN_CORPUS,
              "avoid": data_fingerprint(ctx.splits.test)}  # fmt: skip

    def build(directory: Path) -> None:
        model, corpus_cfg = cfg.model, PRETRAIN_CORPUS
        corpus = generate_arith_corpus(steps * model.train_batch_size, corpus_cfg["max_chars"], cfg.seed,
                                       avoid={p.question for p in ctx.splits.test}, max_steps=corpus_cfg["max_steps"],
                                       max_number=corpus_cfg["max_number"])  # fmt: skip
        params = FinetuneParams(lr=model.lr, epochs=1, batch_size=model.train_batch_size,
                                micro_batch_size=model.micro_batch_size, max_seq_len=corpus_cfg["max_chars"] + 2,
                                seed=cfg.seed, max_steps=steps, compute_dtype=ctx.precision.dtype)  # fmt: skip
        stats = finetune(ctx.model, ctx.tokenizer, [("", document) for document in corpus], params, ctx.tracker,
                         metric_prefix="pretrain")  # fmt: skip
        save_checkpoint(ctx.model, ctx.tokenizer, directory / "model")
        (directory / "stats.json").write_text(json.dumps(stats))

    stage = cached_stage(Path(cfg.cache_dir), "pretrain", inputs, build, ctx.tracker)
    if stage.reused:
        ctx.model, ctx.tokenizer = load_checkpoint(stage.path / "model", ctx.device)
    stats = json.loads((stage.path / "stats.json").read_text())
    ctx.tracker.log_metrics({"train/pretrain_final_loss": stats["final_loss"], "train/pretrain_steps": stats["steps"]})


def apply_init(ctx: RunContext) -> Callable[[str], str]:
    """Returns the prompt builder of the init; ``init=sft`` puts the fine-tuned policy in ``ctx.model`` first.

    The SFT checkpoint is a cached stage (``run/stages.py``): every job with the same model, task, init and seed
    shares one, computed by whichever job gets there first.
    """
    cfg = ctx.cfg
    exemplars = pick_exemplars(ctx.splits.train, cfg.init.n_shots, cfg.seed) if cfg.init.n_shots else []
    prompt_fn = functools.partial(build_prompt, exemplars=exemplars)
    if cfg.init.name != InitName.sft:
        return prompt_fn

    def build_sft(directory: Path | None) -> None:  # None: a rank other than 0 of a sharded build
        init = cfg.init
        params = finetune_params(
            ctx,
            lr=init.lr,
            epochs=init.epochs,
            max_steps=init.max_steps,
            seed=cfg.seed,
            warmup_ratio=init.warmup_ratio,
            min_lr_ratio=init.min_lr_ratio,
            weight_decay=init.weight_decay,
            grad_clip=init.grad_clip,
        )
        examples = [(prompt_fn(p.question), p.reference) for p in ctx.splits.train]
        # checkpoints of the fine-tuning itself: a job killed half-way through SFT is continued by the next
        checkpoints = Checkpointer(progress_dir(Path(cfg.cache_dir), "sft", inputs), 0, restore=cfg.resume,
                                   writes=directory is not None)  # fmt: skip
        stats = finetune(ctx.model, ctx.tokenizer, examples, params, ctx.tracker, metric_prefix="sft",
                         checkpoints=checkpoints, checkpoint_every=cfg.stage_checkpoint_every,
                         data_parallel=data_parallel)  # fmt: skip
        if directory is not None:
            save_checkpoint(ctx.model, ctx.tokenizer, directory / "model")
            (directory / "stats.json").write_text(json.dumps(stats))

    inputs = init_stage_inputs(cfg, ctx.splits.train)
    # model.fsdp on several processes: every rank trains its shard of the SFT stage; otherwise rank 0 builds it
    # alone (run_pipeline) and the others reuse it
    data_parallel = ctx.data_parallel if sharded_init(ctx) else SINGLE
    stage = cached_stage_together(Path(cfg.cache_dir), "sft", inputs, build_sft, ctx.tracker, data_parallel)
    checkpoint = stage.path / "model"
    if stage.reused:
        ctx.model, ctx.tokenizer = load_checkpoint(checkpoint, ctx.device)
    stats = json.loads((stage.path / "stats.json").read_text())
    ctx.tracker.log_metrics({"train/sft_final_loss": stats["final_loss"], "train/sft_steps": stats["steps"]})
    log_checkpoint(ctx.tracker, checkpoint, "sft")
    return prompt_fn


def sharded_init(ctx: RunContext) -> bool:
    """Whether the job's ranks build the SFT stage together, each training its FSDP2 shard (model.fsdp)."""
    return ctx.data_parallel.active and ctx.cfg.model.fsdp and ctx.cfg.init.name == InitName.sft


def log_checkpoint(tracker: Tracker, checkpoint: Path, name: str) -> None:
    size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    tracker.set_tags({f"checkpoint/{name}": str(checkpoint)})
    if size <= ARTIFACT_SIZE_LIMIT:
        tracker.log_artifact(checkpoint, artifact_path=f"checkpoints/{name}")


def run_experiment(
    cfg: ExperimentConfig,
    tracker: Tracker,
    *,
    base_dir: Path,
    output_dir: Path,
    checkpoints: Checkpointer | None = None,
    data_parallel: DataParallel = SINGLE,
) -> dict[str, float]:
    # 1. paths and early checks
    resolve_paths(cfg, base_dir)
    check_writable(output_dir)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device.value)
    torch.set_num_threads(int(os.environ.get("REASONING_RL_THREADS", torch.get_num_threads())))
    precision = resolve_precision(cfg, device, tracker)
    tracker.log_params({"processes": data_parallel.world_size})  # data-parallel ranks (training/distributed.py)

    # 2. data and model
    splits = load_task(cfg.task)
    log.info("task %s: %d train / %d test problems", cfg.task.name, len(splits.train), len(splits.test))
    model, tokenizer = load_policy(cfg.model, seed=cfg.seed, cache_dir=Path(cfg.cache_dir), device=device)
    if checkpoints is not None and checkpoints.writes:  # a full disk fails now, not at the first checkpoint
        checkpoints.check_space(checkpoint_bytes(model, cfg.algo.name))
    ctx = RunContext(cfg, model, tokenizer, splits, build_prompt, tracker, output_dir, device, checkpoints=checkpoints,
                     precision=precision, data_parallel=data_parallel)  # fmt: skip
    del model  # ctx holds the policy: a reused SFT checkpoint replaces it there, and this one must not stay alive
    ctx.sampler = make_sampler(cfg, device)
    try:
        start = getattr(ctx.sampler, "start", None)
        if start is not None:  # an engine that cannot start (no KV cache for the context) fails before training
            start(ctx.model, tokenizer)
        return run_pipeline(ctx)
    finally:
        close = getattr(ctx.sampler, "close", None)
        if close is not None:
            close()


def resolve_precision(cfg: ExperimentConfig, device: torch.device, tracker: Tracker) -> Precision:
    """The compute dtype ``model.dtype`` (``auto``: what the hardware computes in) and ``rollout.dtype`` stand for on
    ``device``, written back into ``cfg`` (the stages key on what was computed, not on "auto"), logged as the param
    ``model.compute_dtype`` and the tag ``compute_dtype``."""
    compute = resolve_compute_dtype(cfg.model.dtype, device)
    cfg.model.dtype = DType(dtype_name(compute))
    if cfg.rollout.dtype is not None:
        cfg.rollout.dtype = DType(dtype_name(resolve_compute_dtype(cfg.rollout.dtype, device)))
    tracker.log_params({"model.compute_dtype": dtype_name(compute)})
    tracker.set_tags({"compute_dtype": dtype_name(compute)})
    log.info("compute dtype %s on %s (model.dtype; the trained weights stay float32)", dtype_name(compute), device)
    return Precision(device.type, compute)


def make_sampler(cfg: ExperimentConfig, device: torch.device) -> Sampler:
    """The run's rollout engine: our sampler (from a copy cast to the compute dtype unless that is float32), or one
    vLLM engine for the whole job."""
    if cfg.rollout.name == RolloutName.native:
        return generate if cfg.model.dtype == DType.float32 else CastSampler(TORCH_DTYPES[cfg.model.dtype])
    from reasoning_rl.rollout.vllm_engine import VLLMSampler, import_vllm  # vLLM is imported by rollout=vllm runs only

    import_vllm()  # not installed: say so now, before any training
    return VLLMSampler(cfg.rollout, dtype=cfg.rollout.dtype or cfg.model.dtype, max_seq_len=cfg.model.max_seq_len,
                       cache_dir=Path(cfg.cache_dir), device=device, seed=cfg.seed)  # fmt: skip


def run_pipeline(ctx: RunContext) -> dict[str, float]:
    """Steps 3-5 of the module docstring."""
    cfg, splits, tracker, output_dir = ctx.cfg, ctx.splits, ctx.tracker, ctx.output_dir

    # 3. init, and the ORM when the reward or the reranking needs one; with several processes, rank 0 builds these
    #    stages alone and the others then load them, except the SFT stage with model.fsdp (all ranks, sharded; the
    #    algorithms then shard their own training: training/sharding.py)
    if ctx.data_parallel.active and cfg.algo.name not in DATA_PARALLEL_ALGOS:
        raise ConfigError(
            f"algo={cfg.algo.name} does not run on several processes yet (data parallelism is built for "
            f"{', '.join(sorted(DATA_PARALLEL_ALGOS))}): launch it as one process (python main.py ...)."
        )
    together = sharded_init(ctx)
    with ctx.data_parallel.main_first():
        apply_pretraining(ctx)
        if not together:
            ctx.build_prompt = apply_init(ctx)
    if together:  # every rank together, each training its shard of the SFT stage
        ctx.build_prompt = apply_init(ctx)
    with ctx.data_parallel.main_first():
        if cfg.needs_orm:
            pool = orm.orm_questions(splits.train, cfg.orm.n_questions, cfg.orm.disjoint, cfg.seed)
            ctx.orm_question_ids = frozenset(p.id for p in pool)
            training_questions(ctx)  # orm.disjoint leaves the algorithm some questions: fail before training the ORM
            ctx.orm = orm.load_or_train(ctx)

    # 4. algorithm
    result = ALGOS[cfg.algo.name](ctx)

    # 5. evaluation (unless the algorithm's last evaluation is of the final policy already)
    if result is None:
        result = evaluate_policy(ctx)
    if cfg.eval.save_samples and ctx.data_parallel.is_main:
        tracker.log_artifact(write_records(result.records, output_dir / "eval" / "samples.jsonl"), "eval")
    log.info("eval: %s", ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.metrics.items())))
    return result.metrics
