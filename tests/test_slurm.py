"""A real Slurm: a two-job `tiny` multirun through hydra/launcher=submitit_slurm, both runs FINISHED in MLflow; and
a job of two Slurm tasks (hydra.launcher.tasks_per_node=2) that runs as one data-parallel job of two ranks.

`.ci/run` installs Debian's slurm-wlm and munge and starts a single-node cluster on the CI machine
(scripts/slurm_local.sh: controller and node daemon on localhost) before the tests, and stops it after. Without a
Slurm controller the test skips and says why; under CI (CI=true) a missing Slurm is a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def default_partition() -> tuple[str | None, str]:
    """(the default partition, or None and why there is no usable Slurm)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return (
            None,
            "no Slurm client on PATH (Debian: apt-get install slurm-wlm munge; bash scripts/slurm_local.sh start)",
        )
    try:
        info = subprocess.run(["sinfo", "-h", "-o", "%P %a %t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return None, "sinfo got no answer from a Slurm controller in 20 s (bash scripts/slurm_local.sh start)"
    if info.returncode != 0:
        return None, f"no Slurm controller answers sinfo: {info.stderr.strip()} (bash scripts/slurm_local.sh start)"
    for line in info.stdout.splitlines():
        partition, availability, state = line.split()
        if partition.endswith("*") and availability == "up" and state in ("idle", "mix", "alloc"):
            return partition.rstrip("*"), ""
    return None, f"no default partition is up with a usable node: {info.stdout.strip()!r}"


def usable_partition() -> str:
    """The default partition; without one the test skips saying why, and fails under CI (CI=true)."""
    partition, reason = default_partition()
    if partition is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Slurm test, but {reason}")
        pytest.skip(reason)
    return partition


@pytest.mark.slow
def test_a_two_job_multirun_runs_on_slurm_and_lands_in_mlflow(tmp_path):
    import mlflow

    partition = usable_partition()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the jobs run on this machine's node: the file is shared
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "REASONING_RL_THREADS": "1"}
    command = [
        sys.executable, str(ROOT / "main.py"), "-m", "model=tiny", "task=arith", "algo=none", "task.n_train=64",
        "task.n_test=10", "eval.k=2", "eval.max_new_tokens=48", "seed=0,1",
        "hydra/launcher=submitit_slurm", f"hydra.launcher.partition={partition}", "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=15",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", f"cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("reasoning-rl").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.tags["sweep/launcher"] == "SlurmLauncher"
    assert sorted(r.data.tags["seed"] for r in children) == ["0", "1"]
    assert all(r.info.status == "FINISHED" and "eval/maj_at_1" in r.data.metrics for r in children)
    # submitit names each task's folder <array job id>_<index> after its Slurm job: two real Slurm tasks ran.
    tasks = sorted(p.name for p in (tmp_path / "sweep" / ".submitit").iterdir() if p.is_dir() and "_" in p.name)
    assert len(tasks) == 2 and all(part.isdigit() for name in tasks for part in name.split("_")), tasks


@pytest.mark.slow
def test_a_two_task_slurm_job_is_one_data_parallel_run(tmp_path):
    """hydra.launcher.tasks_per_node=2: Slurm starts the job's two tasks, submitit's environment makes them ranks 0
    and 1 (reasoning_rl/training/distributed.py), and they run one EI job into one MLflow run."""
    import mlflow

    partition = usable_partition()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "REASONING_RL_THREADS": "1"}
    command = [
        sys.executable, str(ROOT / "main.py"), "-m", "model=tiny", "task=arith", "task.min_steps=1",
        "task.max_steps=1", "task.max_number=9", "task.n_train=64", "task.n_test=8", "init=sft", "init.max_steps=20",
        "eval.k=2", "eval.max_new_tokens=24", "seed=0", "algo=ei", "algo.rounds=1", "algo.num_samples=2",
        "algo.n_questions=16", "algo.max_new_tokens=24", "algo.max_steps=3",
        "hydra/launcher=submitit_slurm", f"hydra.launcher.partition={partition}", "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.tasks_per_node=2", "hydra.launcher.mem_gb=4", "hydra.launcher.timeout_min=15",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", f"cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("reasoning-rl").experiment_id])
    (job,) = [r for r in runs if r.data.tags.get("sweep") != "parent"]  # rank 0 alone opened a run
    assert job.info.status == "FINISHED" and job.data.params["processes"] == "2"
    assert job.data.metrics["train/ei_samples_drawn"] == 16 * 2  # both ranks' shards of the 16 questions x K = 2
    assert job.data.metrics["eval/num_problems"] == 8
    # submitit writes one log per Slurm task: <job id>_<task>_log.out
    (folder,) = [p for p in (tmp_path / "sweep" / ".submitit").iterdir() if p.is_dir() and p.name.isdigit()]
    assert sorted(p.name.split("_")[1] for p in folder.glob("*_log.out")) == ["0", "1"]
