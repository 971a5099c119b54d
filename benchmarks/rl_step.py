"""Wall time of one EI round and one PPO step per rollout engine, split into sampling / weight push / scoring /
training, with peak memory.

Runs the real pipeline (``launch.pipeline.run_experiment``, the config composed by Hydra from ``conf/``) for one EI
round and for one PPO step with ``rollout=native`` and/or ``rollout=vllm``, and times each phase by wrapping the
functions the algorithm's loop calls (the same functions, timed, nothing replaced):

- sampling: the run's sampler (``ctx.sampler``, what ``launch.pipeline.make_sampler`` built), called from the loop;
- weight push: the seconds the vLLM engine spent loading the policy's new weights (``VLLMSampler.push_seconds``),
  taken out of the sampler call that paid them (0 for the native sampler, which reads the policy in place);
- EI: ``grade`` (scoring), ``finetune`` (training on D_1);
- PPO: ``score_samples`` (rewards), ``evaluate_rollouts`` (the batched old log-prob, value and reference log-prob
  passes), ``ppo_update`` (training), and the rest of the step (packing, KL, GAE, logging): PPO's own
  ``perf/ppo_step_seconds`` less the phases above.

Time spent in a phase nested in another belongs to the inner one (the final evaluation's sampling is evaluation,
its weight push is weight push). Before the algorithm starts, the pipeline builds the vLLM engine
(``VLLMSampler.start``) and this benchmark warms it up with one short call on two training prompts, which pushes
the first weights (vLLM's compile, unless ``--vllm-eager``, falls in one of the two). That one-off is reported
apart, as is the final evaluation on the test split; neither is part of a round or step. A round's or step's
weight push is that of the weights its update produced: a longer run pays it in the next round's or step's first
sampling call; here (one round, one step) the final evaluation's first sampler call pays it, and it is counted
with the round or step. PPO runs ``algo.steps=1`` with ``algo.critic_warmup_steps=0`` so that its one step
updates the policy, and the weight push is printed as a share of the step (target: <= 5%).
Peak memory is the process's resident-set high-water mark (ru_maxrss) when each phase ends; it only grows, so a
phase's figure covers everything before it, earlier runs of this process included.

Issue 17's headline setting on SmolLM2, 8 questions x 16 samples x 256 tokens (each vLLM run compiles its engine
first, ~3.5 min here, see the one-off line; the compile cache is not found again across runs, see
benchmarks/sampling.py). PPO's scoring and training passes over 128 ~1,200-token sequences dominate: hours on 2 CPU
cores by an estimate from the small runs (not run yet), so one engine per run:

    .venv/bin/python benchmarks/rl_step.py --engine native --questions 8 --k 16 --max-new-tokens 256 --threads 2
    .venv/bin/python benchmarks/rl_step.py --engine vllm --questions 8 --k 16 --max-new-tokens 256 --threads 2

The defaults (both engines, both algorithms, 4 questions x 4 samples x 128 tokens) should take ~30 min on 2 idle AMD
EPYC cores (an estimate: one PPO epoch over 4 sequences of a 4-shot prompt took ~60 s there). Quick checks:

    .venv/bin/python benchmarks/rl_step.py --engine vllm --vllm-eager --algo ppo --questions 1 --k 2 \
        --max-new-tokens 16 --ppo-epochs 1
    .venv/bin/python benchmarks/rl_step.py --engine native --algo ei --questions 1 --k 4 --max-new-tokens 32
    .venv/bin/python benchmarks/rl_step.py --model tiny --engine native
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import resource
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

# benchmarks/sampling.py: `python benchmarks/rl_step.py` puts this folder on sys.path
from sampling import cpu_description

from reasoning_rl.algos import ei, ppo
from reasoning_rl.algos.context import RunContext
from reasoning_rl.config import register_configs, to_experiment
from reasoning_rl.launch import pipeline as experiment
from reasoning_rl.rollout import native as rollout
from reasoning_rl.rollout.sampler import SamplingParams
from reasoning_rl.run.tracking import NullTracker
from reasoning_rl.tasks.prompts import STOP_STRINGS

REPO = Path(__file__).resolve().parents[1]
ONE_OFF, SAMPLING, PUSH, EVALUATION = "engine start (one-off)", "sampling", "weight push", "evaluation"
PHASES = {  # the functions the loops call by name, and the phase each one is
    "ei": {"grade": "scoring", "finetune": "training", "evaluate_policy": EVALUATION},
    "ppo": {"score_samples": "scoring (rewards)", "evaluate_rollouts": "scoring (log-prob/value passes)",
            "ppo_update": "training", "evaluate_policy": EVALUATION},
}  # fmt: skip
PPO_REST = "rest of the step (packing, KL, GAE, logging)"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "smollm2_135m"], default="smollm2_135m", help="model config option")
    p.add_argument("--algo", choices=["ei", "ppo", "both"], default="both", help="which algorithm to time")
    p.add_argument("--engine", choices=["native", "vllm", "both"], default="both", help="rollout engine (rollout=)")
    p.add_argument("--questions", type=int, default=4, help="training questions per EI round / PPO step")
    p.add_argument("--k", type=int, default=4, help="samples per question")
    p.add_argument("--max-new-tokens", type=int, default=128, help="sample length limit (the evaluation's too)")
    p.add_argument("--test-problems", type=int, default=1, help="test problems of the final evaluation")
    p.add_argument("--ppo-epochs", type=int, default=None, help="PPO: algo.ppo_epochs (default: the config's, 2)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (vLLM's too)")
    p.add_argument("--plain-sampler", action="store_true", help="native: sample with generate(..., fast=False)")
    p.add_argument("--vllm-eager", action="store_true", help="vllm: no torch.compile (rollout.enforce_eager=true)")
    p.add_argument("--vllm-dtype", choices=["float32", "bfloat16"], default=None,
                   help="vllm: the engine's dtype (rollout.dtype); default: the model's (float32)")  # fmt: skip
    p.add_argument("--vllm-kv-cache-gib", type=float, default=4.0, help="vllm: rollout.kv_cache_gib")
    return p.parse_args()


def overrides(args: argparse.Namespace, algo: str, engine: str, cache: Path) -> list[str]:
    # The random tiny model gets a short SFT first (a cached stage), so that some samples are correct.
    task = (
        ["task=arith", "init=sft", "init.max_steps=60"] if args.model == "tiny" else ["task=gsm8k", "init=pretrained"]
    )
    common = [f"model={args.model}", *task, f"task.n_test={args.test_problems}", "logger=none", f"cache_dir={cache}",
              "eval.k=1", f"eval.max_new_tokens={args.max_new_tokens}", f"rollout={engine}"]  # fmt: skip
    if engine == "vllm":
        common += [f"rollout.enforce_eager={str(args.vllm_eager).lower()}",
                   f"rollout.kv_cache_gib={args.vllm_kv_cache_gib}",
                   *([f"rollout.dtype={args.vllm_dtype}"] if args.vllm_dtype else [])]  # fmt: skip
    if algo == "ei":
        return [*common, "algo=ei", "algo.rounds=1", "algo.eval_init=false", f"algo.num_samples={args.k}",
                f"algo.n_questions={args.questions}", f"algo.max_new_tokens={args.max_new_tokens}",
                "algo.temperature=0.7", "algo.max_steps=4"]  # fmt: skip
    return [*common, "algo=ppo", "algo.steps=1", "algo.critic_warmup_steps=0", "algo.eval_init=false",
            f"algo.num_samples={args.k}", "reward=sparse", f"algo.rollout_questions={args.questions}",
            f"algo.max_new_tokens={args.max_new_tokens}",
            *([f"algo.ppo_epochs={args.ppo_epochs}"] if args.ppo_epochs else [])]  # fmt: skip


# ------------------------------------------------------------------------------------------------ timing


class PhaseClock:
    """Seconds per phase, each phase's own: time spent in a phase nested in another is the inner phase's."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak_mib: dict[str, float] = {}
        self._inner: list[float] = []  # per open phase: seconds that belong to phases inside it
        self.first_push = 0.0  # the warm-up's weight push (part of the one-off)

    def active(self) -> bool:
        return bool(self._inner)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._inner.append(0.0)
        start = time.perf_counter()
        try:
            yield
        finally:
            total = time.perf_counter() - start
            self.seconds[name] += total - self._inner.pop()
            if self._inner:
                self._inner[-1] += total
            self.peak_mib[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def credit(self, name: str, seconds: float) -> None:
        """``seconds`` spent inside the open phase belong to ``name`` instead."""
        self.seconds[name] += seconds
        if self._inner:
            self._inner[-1] += seconds

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            with self.phase(name):
                return fn(*a, **kw)

        return timed


class TimedSampler:
    """The run's sampler, timed: a call from the loop is sampling, a call from inside a timed phase (the
    evaluation) is that phase's; the weight push an engine does in either is weight push. Everything else
    (``pop_push_seconds``, ``close``) is the sampler's own."""

    def __init__(self, sampler: Any, clock: PhaseClock) -> None:
        self.sampler, self.clock = sampler, clock

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        before = getattr(self.sampler, "push_seconds", 0.0)
        with contextlib.nullcontext() if self.clock.active() else self.clock.phase(SAMPLING):
            out = self.sampler(*args, **kwargs)
            self.clock.credit(PUSH, getattr(self.sampler, "push_seconds", 0.0) - before)  # not popped mid-call
        return out

    def start(self, model: Any, tokenizer: Any) -> None:
        """The engine's build, which the pipeline asks for before any training: part of the one-off."""
        start = getattr(self.sampler, "start", None)
        if start is not None:
            with self.clock.phase(ONE_OFF):
                start(model, tokenizer)

    def __getattr__(self, name: str) -> Any:
        if name == "sampler":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.sampler, name)


def warmed_up(run: Callable[[RunContext], Any], clock: PhaseClock) -> Callable[[RunContext], Any]:
    """The algorithm, after one short sampler call on two training prompts: the engine's one-off start."""

    def warm_then_run(ctx: RunContext) -> Any:
        sampler = ctx.sampler.sampler  # the engine itself: this call is not sampling
        prompts = [ctx.build_prompt(p.question) for p in ctx.splits.train[:2]]
        with clock.phase(ONE_OFF):
            sampler(ctx.model, ctx.tokenizer, prompts, SamplingParams(0.7, 1.0, 8, STOP_STRINGS), num_samples=2,
                    seed=0, batch_size=ctx.cfg.model.sample_batch_size)  # fmt: skip
            pop = getattr(sampler, "pop_push_seconds", None)
            clock.first_push = pop() if pop is not None else 0.0  # so that step 1 logs its own pushes only
        return run(ctx)

    return warm_then_run


class RecordingTracker(NullTracker):
    """Keeps what the algorithm logs (PPO's perf/ metrics), by step."""

    def __init__(self) -> None:
        self.metrics: dict[int | None, dict[str, float]] = defaultdict(dict)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics[step].update(metrics)


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """``obj.name`` (or ``obj[name]`` for a dict) is ``value`` inside the block."""
    get, put = (obj.__getitem__, obj.__setitem__) if isinstance(obj, dict) else (
        functools.partial(getattr, obj), functools.partial(setattr, obj))  # fmt: skip
    original = get(name)
    put(name, value)
    try:
        yield
    finally:
        put(name, original)


def time_one(args: argparse.Namespace, algo: str, engine: str) -> tuple[PhaseClock, RecordingTracker, float]:
    """One EI round or PPO step through the real pipeline; its phase clock, its logged metrics, its wall time."""
    clock, tracker = PhaseClock(), RecordingTracker()
    module = ei if algo == "ei" else ppo
    make_sampler = experiment.make_sampler
    with contextlib.ExitStack() as stack:
        for name, phase in PHASES[algo].items():
            stack.enter_context(patched(module, name, clock.wrap(phase, getattr(module, name))))
        stack.enter_context(patched(experiment, "make_sampler", lambda c, d: TimedSampler(make_sampler(c, d), clock)))
        stack.enter_context(patched(experiment.ALGOS, algo, warmed_up(experiment.ALGOS[algo], clock)))
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        stack.enter_context(initialize_config_dir(str(REPO / "conf"), version_base="1.3"))
        cfg = to_experiment(compose(config_name="config", overrides=overrides(args, algo, engine, REPO / ".cache")))
        start = time.perf_counter()
        experiment.run_experiment(cfg, tracker, base_dir=REPO, output_dir=Path(tmp))
        total = time.perf_counter() - start
    return clock, tracker, total


# ------------------------------------------------------------------------------------------------ report


def step_phases(algo: str, clock: PhaseClock, tracker: RecordingTracker) -> dict[str, float]:
    """The seconds of each phase of the round or step (the one-off and the evaluation left out)."""
    names = [SAMPLING, PUSH, *(p for p in dict.fromkeys(PHASES[algo].values()) if p != EVALUATION)]
    phases = {name: clock.seconds.get(name, 0.0) for name in names}
    if algo == "ppo":  # what PPO's own step timer saw beyond the timed phases
        phases[PPO_REST] = tracker.metrics[1]["perf/ppo_step_seconds"] - sum(v for k, v in phases.items() if k != PUSH)
    return phases


def engine_label(args: argparse.Namespace, engine: str) -> str:
    if engine == "native":
        return "native (plain path, forced)" if args.plain_sampler else "native"
    return f"vllm ({args.vllm_dtype or 'model dtype'}, {'eager' if args.vllm_eager else 'compiled'})"


def report(args: argparse.Namespace, algo: str, engine: str, clock: PhaseClock, tracker: RecordingTracker,
           total: float) -> dict[str, float]:  # fmt: skip
    what = "one EI round" if algo == "ei" else "one PPO step"
    phases = step_phases(algo, clock, tracker)
    step = sum(phases.values())
    print(f"\n{what}, engine={engine_label(args, engine)}: model={args.model} questions={args.questions} k={args.k} "
          f"max_new_tokens={args.max_new_tokens} threads={args.threads}")  # fmt: skip
    print("| phase | seconds | share of the round/step | peak RSS at its end, MiB |\n|---|---|---|---|")
    for name, seconds in phases.items():
        peak = f"{clock.peak_mib[name]:.0f}" if name in clock.peak_mib else "-"
        print(f"| {name} | {seconds:.1f} | {100 * seconds / step:.0f}% | {peak} |")
    print(f"| {what} (sum of the above) | {step:.1f} | 100% | |")
    print(f"not part of it: {ONE_OFF} {clock.seconds[ONE_OFF]:.1f} s (of which the first weight push "
          f"{clock.first_push:.2f} s), final evaluation {clock.seconds[EVALUATION]:.1f} s; "
          f"whole run (model load, data, evaluation included) {total:.1f} s")  # fmt: skip
    if algo == "ppo":
        logged = tracker.metrics[1]
        perf = ", ".join(f"{k}={v:.2f}" for k, v in logged.items() if k.startswith("perf/"))
        print(f"PPO's own step-1 metrics: {perf} (its push is 0 here: the warm-up pushed the first weights, and the "
              "update's weights are pushed at the next sampler call, the final evaluation's)")  # fmt: skip
    if algo == "ei" and not phases["training"]:
        print("(no sample was correct: nothing to fine-tune, so no new weights to push; raise --k or --max-new-tokens)")
    if engine == "vllm":
        share = 100 * phases[PUSH] / step
        target = f" ({'within' if share <= 5 else 'ABOVE'} the <= 5% target)" if algo == "ppo" else ""
        print(f"weight push: {phases[PUSH]:.2f} s = {share:.1f}% of {what}{target}")
    return phases


def print_summary(args: argparse.Namespace, results: dict[tuple[str, str], dict[str, float]]) -> None:
    """One table per algorithm, a column per engine: the rows to paste into the README."""
    for algo in dict.fromkeys(a for a, _ in results):
        engines = [e for a, e in results if a == algo]
        what = "one EI round" if algo == "ei" else "one PPO step"
        print(f"\n{what}, seconds (model={args.model} questions={args.questions} k={args.k} "
              f"max_new_tokens={args.max_new_tokens} threads={args.threads})")  # fmt: skip
        print("| phase | " + " | ".join(engine_label(args, e) for e in engines) + " |")
        print("|---" * (1 + len(engines)) + "|")
        for name in results[(algo, engines[0])]:
            print(f"| {name} | " + " | ".join(f"{results[(algo, e)][name]:.1f}" for e in engines) + " |")
        sums = " | ".join(f"{sum(results[(algo, e)].values()):.1f}" for e in engines)
        print(f"| {what} | {sums} |")


def main() -> None:
    args = parse_args()
    register_configs()
    torch.set_num_threads(args.threads)
    print(cpu_description())
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would bury the tables
    if args.plain_sampler:
        rollout.generate.__kwdefaults__["fast"] = False
    results = {}
    # native first: its runs never meet vLLM's process-wide side effects (its import, its thread settings)
    for engine in ["native", "vllm"] if args.engine == "both" else [args.engine]:
        for algo in ["ei", "ppo"] if args.algo == "both" else [args.algo]:
            clock, tracker, total = time_one(args, algo, engine)
            results[(algo, engine)] = report(args, algo, engine, clock, tracker, total)
    print_summary(args, results)


if __name__ == "__main__":
    main()
