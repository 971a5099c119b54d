"""Data parallelism inside one job (reasoning_rl/training/distributed.py), with real processes over gloo.

The mechanism: every rank takes its shard of a global batch, divides its summed token losses by the global token
count, and the gradients are summed over the ranks. Two processes must then take the update one process takes on
the whole batch (fp32, up to summation order), and stay identical to each other.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_checkpointing import TINY_RUN, compose_experiment
from test_grpo import hand_made_groups
from test_ppo import hand_made_batch, scaled_tiny_model

from reasoning_rl.algos.grpo import group_relative_advantages, grpo_update
from reasoning_rl.algos.ppo import PolicyValue, check_divisible, fit_value_head, ppo_update
from reasoning_rl.config import ConfigError, GRPOConfig, LossNorm, ModelConfig, ModelSource, PPOConfig
from reasoning_rl.launch.pipeline import run_experiment
from reasoning_rl.models.loading import build_tiny_model, build_tiny_tokenizer
from reasoning_rl.run.checkpointing import Checkpointer
from reasoning_rl.run.stages import cached_stage_together
from reasoning_rl.run.tracking import NullTracker
from reasoning_rl.training.distributed import SINGLE, DataParallel
from reasoning_rl.training.finetune import FinetuneParams, finetune
from reasoning_rl.training.lora import LoraParams
from reasoning_rl.training.sharding import gather_weights, scatter_weights, shard, sharded_copy

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ModelConfig(name="tiny", source=ModelSource.tiny, hidden_size=32, num_layers=2, num_heads=2,
                   intermediate_size=64)  # fmt: skip
EXAMPLES = [
    ("Q: 1+2\n", "1+2=3\n#### 3"), ("Q: 10+20\n", "#### 30"), ("Q:\n", "5"), ("Q: 7\n", "7*1=7\n#### 7"),
    ("Q: 2+2\n", "2+2=4\n#### 4"), ("Q: 9\n", "#### 9"), ("Q: 3*3\n", "3*3=9\n#### 9"), ("Q: 0\n", "0"),
]  # fmt: skip
WORLD_SIZE = 2


def test_shard_and_gather_are_inverse_and_cover_every_item_once():
    items = list(range(7))
    shards = [DataParallel(rank, 3).shard(items) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]  # every 3rd item from the rank's position: sizes differ by <= 1
    assert SINGLE.shard(items) == items and SINGLE.gather(items) == items


def test_ppo_refuses_a_step_or_minibatch_the_ranks_cannot_split_evenly():
    check_divisible(8, 16, 2)  # 4 questions and 8 rows of each minibatch per rank
    for questions, minibatch in ((7, 16), (8, 15)):
        with pytest.raises(ConfigError, match="multiples of 2"):
            check_divisible(questions, minibatch, 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["algo=rcrl"], "algo=rcrl does not run on several processes")],
)  # fmt: skip
def test_a_job_refuses_several_processes_where_they_are_not_built(tmp_path, overrides, message):
    # rank 0 of 2, no process group: the check comes before the first collective, and before any training
    cfg = compose_experiment([*TINY_RUN, *overrides, f"cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError, match=message):
        run_experiment(cfg, NullTracker(), base_dir=tmp_path, output_dir=tmp_path / "out",
                       data_parallel=DataParallel(0, 2))  # fmt: skip


# ------------------------------------------------------------------------------- real processes, gloo


class GradNorms(NullTracker):
    """Keeps the gradient norms the loop logs: AdamW's first step is ~lr * sign(g), blind to the gradient's scale, so
    a gradient averaged over the ranks where it should be summed shows in the norm, not in the weights."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.norms.append(metrics["train/sft_grad_norm"])


def finetune_step(
    data_parallel: DataParallel,
    *,
    shard: bool = False,
    lora: LoraParams | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The weights before and after one AdamW step of SFT on the 8 examples in micro-batches of 2 (each rank: its
    4 of them), and the step's gradient norm (as ``grad_norm``); ``shard``: the ranks train an FSDP2-sharded copy."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(TINY, len(tok), seed=0)
    before = copy.deepcopy(model.state_dict())
    params = FinetuneParams(lr=1e-3, epochs=1, batch_size=8, micro_batch_size=2, max_seq_len=64, seed=0,
                            max_steps=1, log_every=1, shard=shard, lora=lora, compute_dtype=compute_dtype)  # fmt: skip
    tracker = GradNorms()
    torch.manual_seed(data_parallel.rank)  # LoRA's A matrices: drawn differently on each rank, then rank 0's kept
    finetune(model, tok, EXAMPLES, params, tracker, progress=False, data_parallel=data_parallel)
    return before, {**copy.deepcopy(model.state_dict()), "grad_norm": torch.tensor(tracker.norms)}


def ppo_step(
    data_parallel: DataParallel, *, sharded: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The weights before and after the critic warm-up fit and one PPO minibatch update (plain SGD) on the
    hand-made 4-row batch: rows {0, 2} on rank 0 and {1, 3} on rank 1, a minibatch of 2 rows per rank. ``sharded``:
    the update trains an FSDP2-sharded copy made before the fit, as a run makes it (so the fitted value head must be
    scattered into it), and its weights are gathered back after the update."""
    tok = build_tiny_tokenizer()
    model = scaled_tiny_model(len(tok))
    batch, value_head = hand_made_batch(model, tok)
    rows = torch.tensor(data_parallel.shard(range(4)))
    local = {k: v[rows] for k, v in batch.items()}

    def weights() -> dict[str, torch.Tensor]:
        policy = {f"policy.{k}": v for k, v in model.state_dict().items()}
        return copy.deepcopy(policy | {f"value_head.{k}": v for k, v in value_head.state_dict().items()})

    before = weights()
    policy_value = PolicyValue(model, value_head)
    sharded = sharded and data_parallel.active  # one process: the plain update it is compared with
    trained = shard(policy_value, data_parallel) if sharded else policy_value
    fit_value_head(model, value_head, local, 2, ridge=1e-3, data_parallel=data_parallel)
    if sharded:
        scatter_weights(policy_value, trained, ["value_head.weight", "value_head.bias"])
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    ppo_update(trained, optimizer, local, PPOConfig(ppo_epochs=1, grad_clip=1e9),
               minibatch_size=4 // data_parallel.world_size, micro_batch_size=1,
               generator=torch.Generator().manual_seed(0), data_parallel=data_parallel)  # fmt: skip
    if sharded:
        gather_weights(trained, policy_value)
    return before, weights()


def grpo_step(
    data_parallel: DataParallel, *, sharded: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The weights before and after one Dr. GRPO minibatch update (plain SGD, a KL term to a copy of the init) on
    two questions' groups of 4: the questions are sharded, so each rank holds one whole group and its advantages
    are computed there; each rank's sequence losses are divided by the 8 sequences of both ranks. ``sharded``: the
    update trains an FSDP2-sharded copy, gathered back after it."""
    tok = build_tiny_tokenizer()
    model = scaled_tiny_model(len(tok))
    questions = data_parallel.shard([("Q: 2+3\nA:\n", [1.2, 0.2, 0.2, 0.2]), ("Q: 1+1\nA:\n", [1.0, 1.0, 0.0, 0.0])])
    batch = hand_made_groups(model, tok, questions, reference=copy.deepcopy(model))
    cfg = GRPOConfig(loss_norm=LossNorm.token_sum, scale_by_std=False, max_new_tokens=32, grad_clip=1e9)
    group_relative_advantages(batch, len(questions), cfg)
    before = copy.deepcopy(model.state_dict())
    policy = PolicyValue(model)
    sharded = sharded and data_parallel.active  # one process: the plain update it is compared with
    trained = shard(policy, data_parallel) if sharded else policy
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    grpo_update(trained, optimizer, batch, cfg, minibatch_size=8 // data_parallel.world_size, micro_batch_size=2,
                generator=torch.Generator().manual_seed(0), data_parallel=data_parallel)  # fmt: skip
    if sharded:
        gather_weights(trained, policy)
    return before, copy.deepcopy(model.state_dict())


LORA = LoraParams(rank=4, alpha=8.0, dropout=0.0)
STEPS = {
    "finetune": finetune_step,
    "finetune_fsdp": functools.partial(finetune_step, shard=True),
    "finetune_lora": functools.partial(finetune_step, lora=LORA),
    "finetune_fsdp_lora": functools.partial(finetune_step, shard=True, lora=LORA),
    "ppo": ppo_step,
    "ppo_fsdp": functools.partial(ppo_step, sharded=True),
    "grpo": grpo_step,
    "grpo_fsdp": functools.partial(grpo_step, sharded=True),
}
# The sums of the gradients over two ranks round differently from one process's sum (~1e-7 relative). SGD's update
# is proportional to the gradient, so the weights agree to ~1e-7. AdamW's first step is lr * g / (|g| + eps): ~lr
# wherever |g| >> eps = 1e-8, but for the 3-5 of the model's 14k weights whose |g| is near eps the step follows the
# rounding of g: measured differences up to 6e-7, 0.06% of the 1e-3 step.
ATOL = {"finetune": 1e-6, "finetune_fsdp": 1e-6, "finetune_lora": 1e-6, "finetune_fsdp_lora": 1e-6, "ppo": 1e-7,
        "ppo_fsdp": 1e-7, "grpo": 1e-7, "grpo_fsdp": 1e-7}  # fmt: skip


class Interrupted(Exception):
    """Stands for a job killed in the middle of its fine-tuning."""


class InterruptAt(NullTracker):
    def __init__(self, step: int) -> None:
        self.step = step

    def log_metrics(self, metrics, step=None) -> None:
        if step == self.step:
            raise Interrupted


def resumed_finetune(data_parallel: DataParallel, out_dir: Path) -> dict[str, torch.Tensor]:
    """Three SFT steps (batches of 4, a checkpoint after each), interrupted after step 2's update (before its
    checkpoint), then run again in a fresh model with the same checkpoints: it resumes after step 1. Sharded when
    there are several ranks; the checkpoints are whole tensors, written by rank 0 and read by every rank."""
    tok = build_tiny_tokenizer()
    params = FinetuneParams(lr=1e-3, epochs=1, batch_size=4, micro_batch_size=2, max_seq_len=64, seed=0, max_steps=3,
                            log_every=1, shard=data_parallel.active)  # fmt: skip
    checkpoints = Checkpointer(out_dir / "checkpoints", 0, restore=True, writes=data_parallel.is_main)
    (out_dir / "checkpoints").mkdir(exist_ok=True)
    with pytest.raises(Interrupted):
        finetune(build_tiny_model(TINY, len(tok), seed=0), tok, EXAMPLES, params, InterruptAt(2), progress=False,
                 checkpoints=checkpoints, checkpoint_every=1, data_parallel=data_parallel)  # fmt: skip
    data_parallel.barrier()  # rank 0's checkpoint is on disk before any rank reads it
    model = build_tiny_model(TINY, len(tok), seed=0)
    finetune(model, tok, EXAMPLES, params, NullTracker(), progress=False, checkpoints=checkpoints, checkpoint_every=1,
             data_parallel=data_parallel)  # fmt: skip
    return model.state_dict()


def shard_sizes(data_parallel: DataParallel, out_dir: Path) -> tuple[int, int]:
    """The values of the tiny model this rank holds inside :func:`sharded_copy`, and the model's."""
    model = build_tiny_model(TINY, len(build_tiny_tokenizer()), seed=0)
    with sharded_copy(model, data_parallel) as sharded:
        local = sum(p.to_local().numel() for p in sharded.parameters())
    return local, sum(p.numel() for p in model.parameters())


def stage_together(data_parallel: DataParallel, out_dir: Path) -> list:
    """The same stage asked for twice by both ranks together: what each call gave ``build``, and whether it reused."""
    given: list[str] = []

    def build(directory: Path | None) -> None:
        given.append("none" if directory is None else "directory")
        if directory is not None:
            (directory / "out.txt").write_text(f"rank {data_parallel.rank}")

    stages = [cached_stage_together(out_dir / "cache", "sft", {"a": 1}, build, NullTracker(), data_parallel)
              for _ in range(2)]  # fmt: skip
    return [given, [stage.reused for stage in stages], (stages[0].path / "out.txt").read_text()]


def sharded_bf16_step(data_parallel: DataParallel, out_dir: Path) -> dict[str, torch.Tensor]:
    return finetune_step(data_parallel, shard=True, compute_dtype=torch.bfloat16)[1]


CHECKS = {"resumed_finetune": resumed_finetune, "shard_sizes": shard_sizes, "stage_together": stage_together,
          "sharded_bf16_step": sharded_bf16_step}  # fmt: skip


def rank_main(rank: int, name: str, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        data_parallel = DataParallel(rank, WORLD_SIZE)
        if name in STEPS:
            result = STEPS[name](data_parallel)[1]
        else:
            result = CHECKS[name](data_parallel, Path(out_dir))
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(name: str, tmp_path: Path) -> list:
    """What ``name`` (in STEPS or CHECKS) returned on each of WORLD_SIZE processes talking over gloo."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    mp.start_processes(rank_main, args=(name, str(tmp_path / "pg"), str(tmp_path)), nprocs=WORLD_SIZE,
                       start_method="spawn")  # fmt: skip
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("step", sorted(STEPS))
def test_two_processes_take_the_one_process_update_on_a_fixed_global_batch(tmp_path, step):
    ranks = run_ranks(step, tmp_path)
    before, single = STEPS[step](SINGLE)
    for name, expected in single.items():
        for rank, weights in enumerate(ranks):
            torch.testing.assert_close(weights[name], expected, rtol=1e-5, atol=ATOL[step], msg=f"rank {rank}: {name}")
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name}: the replicas differ"
    moved = max(float((single[name] - before[name]).abs().max()) for name in before)
    assert moved > 1e-4  # the update did something


def test_a_sharded_copy_holds_half_of_the_weights_on_each_of_two_ranks(tmp_path):
    # the tiny model's weights all have an even first dimension, which FSDP2 splits in two
    for local, total in run_ranks("shard_sizes", tmp_path):
        assert 2 * local == total


def test_a_sharded_bf16_step_is_close_to_the_unsharded_bf16_step(tmp_path):
    # Sharded, each unit is gathered in bf16 (norm weights included) where the unsharded loop autocasts float32
    # weights, so the two steps differ as bf16 roundings do. Measured on an AMD EPYC: the gradient norms 1.9248 and
    # 1.9242; AdamW's first step (~lr = 1e-3 per weight) differs by more than 1e-4 on 0.26% of the weights, about
    # as often as the unsharded bf16 step differs from the float32 one (0.24%); the mean difference is 0.5% of the
    # mean step. A gradient averaged instead of summed would halve the norm.
    sharded = run_ranks("sharded_bf16_step", tmp_path)[0]
    before, unsharded = finetune_step(SINGLE, compute_dtype=torch.bfloat16)
    torch.testing.assert_close(sharded["grad_norm"], unsharded["grad_norm"], rtol=1e-2, atol=0)
    differences = torch.cat([(sharded[k] - unsharded[k]).flatten() for k in before]).abs()
    steps = torch.cat([(unsharded[k] - before[k]).flatten() for k in before]).abs()
    assert (differences > 1e-4).float().mean() < 0.02
    assert differences.mean() < 0.02 * steps.mean()


def test_a_stage_built_together_is_built_by_every_rank_once_and_written_by_rank_0(tmp_path):
    first, second = run_ranks("stage_together", tmp_path)
    assert first == [["directory"], [False, True], "rank 0"]  # built by both, then reused by both
    assert second == [["none"], [False, True], "rank 0"]  # rank 1 computed without writing


def test_a_sharded_fine_tune_killed_mid_way_resumes_to_the_uninterrupted_weights(tmp_path):
    ranks = run_ranks("resumed_finetune", tmp_path / "two")
    tok = build_tiny_tokenizer()
    model = build_tiny_model(TINY, len(tok), seed=0)
    params = FinetuneParams(lr=1e-3, epochs=1, batch_size=4, micro_batch_size=2, max_seq_len=64, seed=0, max_steps=3)
    finetune(model, tok, EXAMPLES, params, NullTracker(), progress=False)  # one process, never interrupted
    for name, expected in model.state_dict().items():
        for rank, weights in enumerate(ranks):
            torch.testing.assert_close(weights[name], expected, rtol=1e-5, atol=2e-6, msg=f"rank {rank}: {name}")


# ------------------------------------------------------------------------- whole runs, two ranks, real CLI

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "model=tiny", "task=arith", "task.min_steps=1", "task.max_steps=1", "task.max_number=9", "task.n_train=64",
    "task.n_test=8", "init=sft", "init.max_steps=20", "eval.k=2", "eval.max_new_tokens=24", "seed=0",
]  # fmt: skip
EI = [*COMMON, "algo=ei", "algo.rounds=2", "algo.num_samples=2", "algo.n_questions=16", "algo.max_new_tokens=24",
      "algo.max_steps=3"]  # fmt: skip
PPO = [*COMMON, "algo=ppo", "algo.steps=4", "algo.rollout_questions=8", "algo.num_samples=2", "algo.max_new_tokens=24",
       "algo.lr=1e-4", "algo.minibatch_size=8", "checkpoint_every=1"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(overrides: list[str], tmp: Path, name: str) -> subprocess.Popen:
    """``accelerate launch --multi_gpu --num_processes 2 main.py ...``, as the README says (on a machine without
    CUDA, ``--multi_gpu`` is torchrun's launcher and the ranks talk over gloo)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD_SIZE),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(ROOT / "main.py"), *overrides, f"cache_dir={tmp / 'cache'}",
        f"hydra.run.dir={tmp / 'out' / name}", f"logger.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = (tmp / f"{name}.log").open("w")
    return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


def finish(process: subprocess.Popen, tmp: Path, name: str) -> str:
    returncode = process.wait(timeout=900)
    output = (tmp / f"{name}.log").read_text()
    assert returncode == 0, output[-4000:]
    return output


def mlflow_runs(tmp: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name("reasoning-rl").experiment_id])


def steps_of(client, run, name: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, name))


def test_two_rank_ei_and_ppo_runs_log_once_into_one_mlflow_run_each(tmp_path):
    # EI's fine-tuning sharded (model.fsdp: training/sharding.py), PPO's data-parallel with whole replicas
    outputs = {
        name: finish(launch(overrides, tmp_path, name), tmp_path, name)
        for name, overrides in (("ei", [*EI, "model.fsdp=true"]), ("ppo", [*PPO, "algo.steps=2"]))
    }
    # the SFT stage trained by both ranks together, then each of EI's 2 rounds, all sharded; PPO's stage by rank 0
    assert "stage sft: computed" in outputs["ei"] and "(2 ranks)" in outputs["ei"], outputs["ei"][-3000:]
    assert outputs["ei"].count("FSDP2: 5 units over 2 ranks; rank 0 holds") == 3 and "FSDP2" not in outputs["ppo"]
    client, runs = mlflow_runs(tmp_path)
    by_algo = {run.data.tags["algo"]: run for run in runs}
    assert len(runs) == 2 and set(by_algo) == {"ei", "ppo"}, [r.data.tags for r in runs]
    for algo, run in by_algo.items():
        assert run.info.status == "FINISHED" and run.data.params["processes"] == "2", algo
        assert run.data.metrics["eval/num_problems"] == 8  # every test problem, gathered from both ranks' shards
    # the counters and curves are those of the whole job, each point logged once (by rank 0)
    ei, ppo = by_algo["ei"], by_algo["ppo"]
    assert ei.data.params["model.fsdp"] == "True" and ppo.data.params["model.fsdp"] == "False"
    assert steps_of(client, ei, "train/ei_samples_drawn") == [1, 2]
    assert ei.data.metrics["train/ei_samples_drawn"] == 2 * 16 * 2  # rounds x questions x K, both ranks'
    assert steps_of(client, ppo, "train/ppo_reward_mean") == [1, 2]
    assert ppo.data.metrics["train/ppo_samples_drawn"] == 2 * 8 * 2  # steps x questions x K, both ranks'


def test_a_killed_two_rank_run_resumes_from_its_checkpoint_with_two_ranks(tmp_path):
    # PPO's update sharded (model.fsdp): its checkpoints hold AdamW's state gathered whole, sharded again on resume
    sharded_ppo = [*PPO, "model.fsdp=true"]
    victim = launch(sharded_ppo, tmp_path, "victim")
    state_files = tmp_path / "cache" / "runs"
    deadline = time.monotonic() + 900
    while True:  # SIGKILL the launcher and both ranks once the checkpoint after step 2 is written
        states = [json.loads(f.read_text()) for f in state_files.glob("*/state.json") if f.stat().st_size]
        if states and states[0].get("step", 0) >= 2:
            break
        assert victim.poll() is None, (tmp_path / "victim.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint after step 2"
        time.sleep(0.05)
    killed_at = states[0]["step"]
    assert killed_at < 4, "the run finished before it could be killed"
    # the launcher and both ranks (torchrun starts each rank in a session of its own, so the launcher's process
    # group does not reach them: a machine shutting down does)
    for process in [psutil.Process(victim.pid), *psutil.Process(victim.pid).children(recursive=True)]:
        process.send_signal(signal.SIGKILL)
    victim.wait()
    output = finish(launch(sharded_ppo, tmp_path, "rerun"), tmp_path, "rerun")
    assert f"resuming after step {killed_at}" in output and "FSDP2: 5 units over 2 ranks; rank 0 holds" in output
    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same run, continued
    assert runs[0].data.tags["resumed"].startswith(f"after step {killed_at}")
    assert steps_of(client, runs[0], "train/ppo_reward_mean") == [1, 2, 3, 4]  # each step logged once
