"""Wall time of one EI round and one PPO step, split into sampling / scoring / training, with peak memory.

Runs the real pipeline (``experiment.run_experiment``, the config composed by Hydra from ``conf/``) for one EI
round and for one PPO step, and times each phase by wrapping the functions the algorithm's loop calls (the same
functions, timed, nothing replaced):

- EI: ``generate`` (sampling K per question), ``grade`` (scoring), ``finetune`` (training on D_1);
- PPO: ``generate`` (sampling), ``score_samples`` (rewards), ``evaluate_rollouts`` (the batched old log-prob,
  value and reference log-prob passes), ``ppo_update`` (training).

The final evaluation on the test split is timed too, but is not part of a round or step. Peak memory is the
process's resident-set high-water mark (ru_maxrss) when each phase ends; it only grows, so a phase's figure covers
everything before it. Sampling uses ``generate``'s default path (fast for SmolLM2, plain for the narrow tiny
model); ``--plain-sampler`` forces the plain one, and ``--algo`` picks one algorithm.

    .venv/bin/python benchmarks/rl_step.py --model tiny --threads 1
    .venv/bin/python benchmarks/rl_step.py --model smollm2_135m --questions 4 --k 4 --threads 1
"""

from __future__ import annotations

import argparse
import functools
import resource
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from reasoning_rl import rollout
from reasoning_rl.algos import ei, ppo
from reasoning_rl.config import register_configs, to_experiment
from reasoning_rl.experiment import run_experiment
from reasoning_rl.tracking import NullTracker

REPO = Path(__file__).resolve().parents[1]
PHASES = {
    "ei": {"generate": "sampling", "grade": "scoring", "finetune": "training", "evaluate_policy": "evaluation"},
    "ppo": {"generate": "sampling", "score_samples": "scoring (rewards)",
            "evaluate_rollouts": "scoring (log-prob/value passes)", "ppo_update": "training",
            "evaluate_policy": "evaluation"},
}  # fmt: skip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "smollm2_135m"], default="tiny", help="model config group option")
    p.add_argument("--algo", choices=["ei", "ppo", "both"], default="both", help="which algorithm to time")
    p.add_argument("--questions", type=int, default=32, help="training questions per EI round / PPO step")
    p.add_argument("--k", type=int, default=4, help="samples per question")
    p.add_argument("--max-new-tokens", type=int, default=128, help="sample length limit")
    p.add_argument("--test-problems", type=int, default=8, help="test problems of the final evaluation")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--plain-sampler", action="store_true", help="sample with generate(..., fast=False)")
    return p.parse_args()


def overrides(args: argparse.Namespace, algo: str, cache: Path) -> list[str]:
    # The random tiny model gets a short SFT first (a cached stage), so that some samples are correct.
    task = (
        ["task=arith", "init=sft", "init.max_steps=60"] if args.model == "tiny" else ["task=gsm8k", "init=pretrained"]
    )
    common = [f"model={args.model}", *task, f"task.n_test={args.test_problems}", "logger=none", f"cache_dir={cache}",
              "eval.k=1"]  # fmt: skip
    if algo == "ei":
        return [*common, "algo=ei", "algo.rounds=1", "algo.eval_init=false", f"algo.num_samples={args.k}",
                f"algo.n_questions={args.questions}", f"algo.max_new_tokens={args.max_new_tokens}",
                "algo.temperature=0.7", "algo.max_steps=4"]  # fmt: skip
    return [*common, "algo=ppo", "algo.steps=1", f"algo.num_samples={args.k}", "reward=sparse",
            f"algo.rollout_questions={args.questions}", f"algo.max_new_tokens={args.max_new_tokens}"]  # fmt: skip


def timed(name: str, fn: Callable, seconds: dict[str, float], peak: dict[str, float]) -> Callable:
    @functools.wraps(fn)
    def wrapper(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        start = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            seconds[name] += time.perf_counter() - start
            peak[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    return wrapper


def main() -> None:
    args = parse_args()
    register_configs()
    torch.set_num_threads(args.threads)
    if args.plain_sampler:
        rollout.generate.__kwdefaults__["fast"] = False
    for algo in ["ei", "ppo"] if args.algo == "both" else [args.algo]:
        module = ei if algo == "ei" else ppo
        seconds: dict[str, float] = defaultdict(float)
        peak: dict[str, float] = {}
        originals = {name: getattr(module, name) for name in PHASES[algo]}
        for name, phase in PHASES[algo].items():
            setattr(module, name, timed(phase, originals[name], seconds, peak))
        with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = to_experiment(compose(config_name="config", overrides=overrides(args, algo, REPO / ".cache")))
            start = time.perf_counter()
            run_experiment(cfg, NullTracker(), base_dir=REPO, output_dir=Path(tmp))
            total = time.perf_counter() - start
        for name, fn in originals.items():
            setattr(module, name, fn)
        step = sum(s for phase, s in seconds.items() if phase != "evaluation")
        what = "one EI round" if algo == "ei" else "one PPO step"
        print(f"\n{what}: model={args.model} questions={args.questions} k={args.k} "
              f"max_new_tokens={args.max_new_tokens} threads={args.threads} "
              f"sampler={'plain (forced)' if args.plain_sampler else 'default: fast if >= 256 wide'}")  # fmt: skip
        print("| phase | seconds | share of the round/step | peak RSS at its end, MiB |\n|---|---|---|---|")
        for phase in dict.fromkeys(PHASES[algo].values()):
            share = f"{100 * seconds[phase] / step:.0f}%" if phase != "evaluation" else "-"
            print(f"| {phase} | {seconds[phase]:.1f} | {share} | {peak.get(phase, 0):.0f} |")
        print(f"| {what} (sum of the above, evaluation excluded) | {step:.1f} | 100% | |")
        print(f"whole run (model load, data, evaluation included): {total:.1f} s")


if __name__ == "__main__":
    main()
