"""Checkpoint and resume through the real CLI: a `tiny` EI run and a `tiny` PPO run are killed with SIGKILL mid-way,
restarted with the same command, and must end exactly where an uninterrupted run with the same seed ends.

Six real `python main.py` processes: for each algorithm, an uninterrupted reference and a victim (started together,
four at once), then the victim's restart. Each has its own MLflow store and run directory; all share one SFT stage
(the first to get the stage lock builds it). Then the finished command is run once more and must not recompute.

The same processes test the shared stages under concurrency (issue 7, item 5), to spend CI time once: before they
start, a job building the SFT stage is killed mid-build; then the four need that stage at once and must build it
exactly once, ignoring (and cleaning up) what the killed builder left.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

COMMON = [
    "model=tiny", "task=arith", "task.min_steps=1", "task.max_steps=1", "task.max_number=9", "task.n_train=64",
    "task.n_test=8", "init=sft", "init.max_steps=20", "eval.k=2", "eval.max_new_tokens=24", "seed=0",
    "checkpoint_every=1", "stage_checkpoint_every=5",
]  # fmt: skip
EI = [
    *COMMON, "algo=ei", "algo.rounds=3", "algo.num_samples=2", "algo.n_questions=16", "algo.max_new_tokens=24",
    "algo.max_steps=3", "algo.reinit_each_round=false",
]  # fmt: skip
PPO = [
    *COMMON, "algo=ppo", "algo.steps=3", "algo.rollout_questions=8", "algo.num_samples=2", "algo.max_new_tokens=24",
    "algo.lr=1e-4", "algo.minibatch_size=8", "algo.eval_every=1",
]  # fmt: skip
# Logged by whichever run builds the shared SFT stage, and timings: the only metrics allowed to differ between runs.
NOT_COMPARED = ("train/sft_loss", "train/sft_lr", "train/sft_grad_norm", "perf/")


class Job:
    """One `python main.py` process with its own MLflow store and run directory; the SFT stage is shared."""

    def __init__(self, name: str, overrides: list[str], tmp: Path, stages: Path, empty_db: Path) -> None:
        self.name, self.overrides, self.tmp = name, overrides, tmp
        self.cache = tmp / f"cache_{name}"
        self.cache.mkdir()
        (self.cache / "stages").symlink_to(stages)
        shutil.copy(empty_db, tmp / f"{name}.db")  # creating MLflow's tables costs each process ~7 s of CPU
        self.uri = f"sqlite:///{tmp / f'{name}.db'}"
        self.starts = 0

    def start(self) -> subprocess.Popen:
        self.starts += 1
        self.log = self.tmp / f"{self.name}.{self.starts}.log"
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.uri, "HF_HUB_OFFLINE": "1", "REASONING_RL_THREADS": "1"}
        command = [
            sys.executable, str(ROOT / "main.py"), *self.overrides, f"cache_dir={self.cache}",
            f"hydra.run.dir={self.tmp / 'out' / f'{self.name}.{self.starts}'}",
        ]  # fmt: skip
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self.process

    def wait(self) -> str:
        returncode = self.process.wait(timeout=600)
        output = self.log.read_text()
        assert returncode == 0, output[-4000:]
        return output

    def state(self) -> dict:
        files = list((self.cache / "runs").glob("*/state.json"))
        return json.loads(files[0].read_text()) if files else {}

    def kill_after_step(self, step: int) -> int:
        """SIGKILL the process as soon as its checkpoint of ``step`` (or a later one) is written; returns that step."""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                checkpointed = self.state().get("step", 0)
            except (json.JSONDecodeError, OSError):  # replaced between glob and read: look again
                checkpointed = 0
            if checkpointed >= step:
                assert self.process.poll() is None, f"{self.name} finished before it could be killed"
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
                return checkpointed
            assert self.process.poll() is None, self.log.read_text()[-4000:]
            time.sleep(0.02)
        raise AssertionError(f"{self.name} wrote no checkpoint of step {step}")

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def runs(self):
        client = self.client()
        return client.search_runs([client.get_experiment_by_name("reasoning-rl").experiment_id])

    def histories(self, run_id: str) -> dict[str, list[tuple[int, float]]]:
        client = self.client()
        keys = client.get_run(run_id).data.metrics

        # NaN (e.g. train/ei_kept_precision of a round that kept nothing) becomes None, so equal histories compare equal
        def points(key: str) -> list[tuple[int, float | None]]:
            history = client.get_metric_history(run_id, key)
            return sorted(((m.step, None if math.isnan(m.value) else m.value) for m in history), key=lambda p: p[0])

        return {key: points(key) for key in keys}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Both algorithms: references and victims run at once; victims are killed after their first checkpoint and
    restarted; returns {algo: (reference job, victim job, step it was killed after, output of the restart)}, and
    the stage folder, the killed builder's leftovers, and the finished EI command's rerun."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("resume")
    stages = tmp / "stages"
    stages.mkdir()
    empty_db = tmp / "empty.db"
    MlflowClient(tracking_uri=f"sqlite:///{empty_db}").create_experiment("reasoning-rl", str(tmp / "artifacts"))
    jobs = {
        algo: (
            Job(f"{algo}_ref", overrides, tmp, stages, empty_db),
            Job(f"{algo}_victim", overrides, tmp, stages, empty_db),
        )
        for algo, overrides in (("ei", EI), ("ppo", PPO))
    }
    leftovers = kill_a_stage_builder(tmp, stages)
    for reference, victim in jobs.values():  # four processes that need the same SFT stage, at once
        reference.start()
        victim.start()
    killed = {algo: victim.kill_after_step(1) for algo, (_, victim) in jobs.items()}
    for _, victim in jobs.values():
        victim.start()
    ei_victim = jobs["ei"][1]
    outputs = {"ei": ei_victim.wait()}
    # The finished EI command once more, beside the PPO restart: it must report its run and recompute nothing.
    (run,) = ei_victim.runs()
    finished = (run.info.run_id, ei_victim.histories(run.info.run_id))
    ei_victim.start()
    outputs["ppo"] = jobs["ppo"][1].wait()
    finished += (ei_victim.wait(),)
    for reference, _ in jobs.values():
        reference.wait()
    return {algo: (*jobs[algo], killed[algo], outputs[algo]) for algo in jobs} | {
        "stages": (stages, leftovers),
        "finished": finished,
    }


def kill_a_stage_builder(tmp: Path, stages: Path) -> list[str]:
    """Start a job that builds the SFT stage and SIGKILL it mid-build, after its first checkpoint of the fine-tuning
    (step 5 of 12); returns what it left in the stage folder."""
    cache = tmp / "cache_killed"
    cache.mkdir()
    (cache / "stages").symlink_to(stages)
    command = [sys.executable, str(ROOT / "main.py"), *COMMON, "logger=none", f"cache_dir={cache}",
               f"hydra.run.dir={tmp / 'out' / 'killed'}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "REASONING_RL_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 600
    while not list(stages.glob("sft/*.progress/state.json")):  # names the SFT stage's first checkpoint of its training
        assert process.poll() is None and time.monotonic() < deadline, "the builder ended before it was killed"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return sorted(p.name for p in (stages / "sft").iterdir())


def test_a_stage_builder_killed_mid_build_leaves_nothing_usable(resumed):
    stages, leftovers = resumed["stages"]
    (key,) = [name.removesuffix(".lock") for name in leftovers if name.endswith(".lock")]
    assert any(name.startswith(f".{key}.") for name in leftovers)  # its half-written temporary directory
    assert key not in leftovers  # and no stage under the name others look for
    assert f"{key}.progress" in leftovers  # but a checkpoint of its fine-tuning, after step 5 of 12
    assert not list((stages / "sft").glob(".*"))  # the next builder removed the leftover before building
    assert (stages / "sft" / key / "stage.json").is_file()
    assert not (stages / "sft" / f"{key}.progress").exists()  # and its progress, once the stage was in place
    # The next builder continued the fine-tuning from that checkpoint instead of starting again.
    logs = [(job.tmp / f"{job.name}.1.log").read_text() for algo in ("ei", "ppo") for job in resumed[algo][:2]]
    (builder,) = [log for log in logs if "stage sft: computed" in log]
    assert "sft fine-tune: resuming after step 5 of 12" in builder


def test_four_jobs_needing_one_stage_at_once_build_it_once(resumed):
    """The references and the victims started together; one built the SFT stage, the others waited and reused it.
    (Read from their first start's log: a victim's restart reuses the stage and retags its run.)"""
    logs = [(job.tmp / f"{job.name}.1.log").read_text() for algo in ("ei", "ppo") for job in resumed[algo][:2]]
    found = [re.findall(r"stage sft: (computed|reused) (\S+)", log) for log in logs]
    assert all(len(f) == 1 for f in found), found
    assert sorted(f[0][0] for f in found) == ["computed", "reused", "reused", "reused"], found
    assert len({Path(f[0][1]).name for f in found}) == 1, found  # the same stage (each sees it via its own cache_dir)


@pytest.mark.parametrize("algo, step_log", [("ei", "EI round {}:"), ("ppo", "PPO step {}:")])
def test_killed_run_resumes_into_the_same_run_and_ends_like_an_uninterrupted_one(resumed, algo, step_log):
    reference, victim, killed_after, restart_output = resumed[algo]
    (run,) = victim.runs()  # the restart reopened the killed run instead of starting a second one
    assert run.info.status == "FINISHED"
    state = victim.state()
    assert state["run_id"] == run.info.run_id and state["finished"]
    assert run.data.tags["resumed"].startswith(f"after step {killed_after} ")

    # no completed step is redone: the restart starts after the checkpoint the kill left
    assert f"resuming after step {killed_after}" in restart_output
    last = 3
    for step in range(1, last + 1):
        assert (step_log.format(step) in restart_output) == (step > killed_after), (step, restart_output[-3000:])

    # each metric point once, and the whole history equal to the uninterrupted run's
    (reference_run,) = reference.runs()
    ours, theirs = victim.histories(run.info.run_id), reference.histories(reference_run.info.run_id)
    for key, points in ours.items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), (key, points)
    compared = sorted(k for k in set(ours) | set(theirs) if not k.startswith(NOT_COMPARED))
    assert "eval/maj_at_1" in compared and any(k.startswith(f"train/{algo}_") for k in compared)
    for key in compared:
        assert ours.get(key) == theirs.get(key), key
    assert ours["eval/maj_at_1"][-1][0] == last


def test_finished_run_is_reported_not_recomputed(resumed):
    _, victim, _, _ = resumed["ei"]
    run_id, before, output = resumed["finished"]
    assert "Already done" in output and run_id in output
    (again,) = victim.runs()
    assert again.info.run_id == run_id
    assert victim.histories(run_id) == before
