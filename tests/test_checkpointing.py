"""Checkpoints in process: exact round trips of optimizer and RNG states, atomic replacement, the run key, and the
guards (a NaN stops PPO and keeps the last good checkpoint; an EI round with no correct sample is not a crash; a
disk too small fails early). The kill-and-resume test through the real CLI is tests/test_resume.py."""

from __future__ import annotations

import importlib
import json
import logging
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from reasoning_rl.config import register_configs, to_experiment
from reasoning_rl.launch.pipeline import resolve_paths, run_experiment
from reasoning_rl.run.checkpointing import (
    Checkpointer,
    ResumedTracker,
    RunBusyError,
    RunDirectory,
    join_tensors,
    run_key,
    split_tensors,
    stop_if_not_finite,
)
from reasoning_rl.run.tracking import MLflowTracker, NullTracker

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["model=tiny", "task=arith", "task.min_steps=1", "task.max_steps=1", "task.n_train=32", "task.n_test=2",
            "eval.k=1", "eval.max_new_tokens=16", "logger=none", "init=pretrained", "init.n_shots=0"]  # fmt: skip


def compose_experiment(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_experiment(compose(config_name="config", overrides=overrides))


def stepped_adamw() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, betas=(0.8, 0.9))
    for _ in range(2):
        module(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
    return module, optimizer


def test_optimizer_and_rng_states_round_trip_exactly_through_a_checkpoint(tmp_path):
    module, optimizer = stepped_adamw()
    checkpoints = Checkpointer(tmp_path, every=1, restore=True)
    data = {"optimizer": optimizer.state_dict(), "kl_coef": 0.05, "odd": {"nan": float("nan"), 3: (1, 2)}}
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    checkpoints.save(7, data, {"policy": module})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))  # what follows the checkpoint

    fresh, fresh_optimizer = stepped_adamw()
    torch.nn.init.zeros_(fresh[0].weight)  # differs from the saved weights until they are loaded
    saved = checkpoints.restore()
    assert saved is not None and saved.step == 7
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected  # the RNGs continue as saved
    saved.load_modules(policy=fresh)
    fresh_optimizer.load_state_dict(saved.data["optimizer"])
    for a, b in zip(module.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    ours, theirs = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert sorted(theirs["state"]) == [0, 1, 2, 3]  # int keys survive JSON (else AdamW silently drops its moments)
    for index, state in ours["state"].items():
        for key, value in state.items():
            assert torch.equal(value, theirs["state"][index][key]), (index, key)
    assert theirs["param_groups"] == ours["param_groups"]
    assert saved.data["kl_coef"] == 0.05 and saved.data["odd"][3] == (1, 2) and np.isnan(saved.data["odd"]["nan"])


def test_a_new_checkpoint_replaces_the_old_one_and_state_names_it(tmp_path):
    module, _ = stepped_adamw()
    checkpoints = Checkpointer(tmp_path, every=2, restore=True)
    assert [checkpoints.due(s, last=False) for s in (1, 2, 3, 4)] == [False, True, False, True]
    assert checkpoints.due(3, last=True)
    assert checkpoints.restore() is None and checkpoints.describe_latest() == "no checkpoint yet"
    checkpoints.save(2, {"x": 1}, {"policy": module})
    (tmp_path / "ckpt-000004").mkdir()  # left by a run killed between its rename and its state update
    (tmp_path / "ckpt-000004" / "policy.safetensors").write_bytes(b"")  # not empty: a rename cannot replace it
    checkpoints.save(4, {"x": 2}, {"policy": module})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000004", "state.json"]
    assert json.loads((tmp_path / "state.json").read_text()) == {"checkpoint": "ckpt-000004", "step": 4}
    assert checkpoints.restore().data == {"x": 2}
    assert Checkpointer(tmp_path, every=2, restore=False).restore() is None  # resume=false starts afresh


def test_a_run_directory_is_locked_and_cleans_what_a_killed_writer_left(tmp_path):
    run = RunDirectory(tmp_path, "k")
    with pytest.raises(RunBusyError, match="another process is running this same config"):
        RunDirectory(tmp_path, "k")  # the lock is per process here too (a second handle on it)
    (run.path / ".ckpt-000002.x1y2").mkdir()  # a checkpoint being written when its process was killed
    (run.path / ".state.json.abc").write_text("{")  # a state file being written
    run.start("run-1", fresh=False)
    assert sorted(p.name for p in run.path.iterdir()) == ["run.lock", "state.json"]
    assert run.state == {"run_id": "run-1", "finished": False}
    run.finish({"eval/maj_at_1": 0.5}, tmp_path / "out")
    assert run.state["finished"] and run.state["metrics"] == {"eval/maj_at_1": 0.5}
    run.release()
    RunDirectory(tmp_path, "k").release()  # free again


def test_split_tensors_leaves_no_tensor_in_the_json(tmp_path):
    tensors: dict[str, torch.Tensor] = {}
    tree = split_tensors({"a": [torch.ones(2), (torch.zeros(1), 3)], 5: np.arange(3), "inf": -math.inf}, tensors, "s")
    json.dumps(tree, allow_nan=False)  # strict JSON: no NaN or Infinity literals, which other readers refuse
    assert sorted(tensors) == ["s.0.0", "s.0.1.0"]  # a dict with a non-str key is stored as a list of items
    back = join_tensors(json.loads(json.dumps(tree)), tensors)
    assert torch.equal(back["a"][0], torch.ones(2)) and back["a"][1][1] == 3 and back[5].tolist() == [0, 1, 2]
    assert back["inf"] == -math.inf
    with pytest.raises(TypeError, match="cannot checkpoint a object"):
        split_tensors(object(), {}, "s")


def test_a_resumed_tracker_logs_each_metric_point_and_param_once(tmp_path, monkeypatch):
    """A redone step logs again what the killed run logged: the reopened run keeps one point per (name, step), and
    params it holds are not sent again (MLflow refuses to change one, and checkpoint_every may differ)."""
    from mlflow.tracking import MlflowClient

    # MLflow's file store: the client API runs use with sqlite, without the ~7 s of CPU that creating its tables takes
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    killed = MLflowTracker(uri, "test", "run", {})
    killed.log_params({"checkpoint_every": 1})
    killed.log_metrics({"train/loss": 1.0}, step=1)
    killed.log_metrics({"train/loss": 2.0}, step=2)  # step 2 was cut short after logging; it is redone below
    killed.finish("KILLED")
    resumed = ResumedTracker(MLflowTracker(uri, "test", "run", {}, run_id=killed.run_id), uri)
    resumed.log_params({"checkpoint_every": 5, "seed": 0})
    resumed.log_metrics({"train/loss": 2.5}, step=2)
    resumed.log_metrics({"train/loss": 3.0}, step=3)
    resumed.finish()
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(killed.run_id, "train/loss")
    assert sorted((p.step, p.value) for p in history) == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert client.get_run(killed.run_id).data.params == {"checkpoint_every": "1", "seed": "0"}


def test_run_key_ignores_how_to_run_but_not_what_to_compute(tmp_path):
    def key(*overrides: str, uri: str | None = "sqlite:///a.db") -> str:
        cfg = compose_experiment(["model=tiny", "task=arith", *overrides])
        resolve_paths(cfg, tmp_path)
        return run_key(cfg, uri)

    base = key()
    assert key("resume=false", "checkpoint_every=3", "logger.run_name=x") == base
    assert key("seed=1") != base and key("eval.k=2") != base and key(uri="sqlite:///b.db") != base


def test_not_enough_disk_fails_early_with_a_clear_message(tmp_path):
    checkpoints = Checkpointer(tmp_path, every=1, restore=True)
    checkpoints.check_space(1)
    with pytest.raises(OSError, match="free on the disk of .* set cache_dir to a larger disk"):
        checkpoints.check_space(shutil.disk_usage(tmp_path).free + 2**30)


def test_nan_in_ppo_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    ppo = ["algo=ppo", "algo.rollout_questions=4", "algo.num_samples=2", "algo.max_new_tokens=16",
           "algo.eval_init=false", f"cache_dir={tmp_path / 'cache'}", "checkpoint_every=1",
           "algo.critic_warmup_steps=0"]  # fmt: skip
    checkpoints = Checkpointer(tmp_path, every=1, restore=True)
    cfg = compose_experiment([*TINY_RUN, *ppo, "algo.steps=1"])
    run_experiment(cfg, NullTracker(), base_dir=tmp_path, output_dir=tmp_path / "out1", checkpoints=checkpoints)
    good = (tmp_path / "ckpt-000001" / "policy.safetensors").read_bytes()

    cfg = compose_experiment([*TINY_RUN, *ppo, "algo.steps=2"])
    cfg.algo.vf_coef = float("nan")  # poisons the loss of step 2 (the config itself refuses nothing here)
    with pytest.raises(FloatingPointError, match=r"PPO step 2: the ppo .* is not finite .* after step 1"):
        run_experiment(cfg, NullTracker(), base_dir=tmp_path, output_dir=tmp_path / "out2", checkpoints=checkpoints)
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 1
    assert (tmp_path / "ckpt-000001" / "policy.safetensors").read_bytes() == good


def test_a_nan_loss_in_an_ei_round_names_the_round_and_the_kept_checkpoint(tmp_path):
    module, _ = stepped_adamw()
    checkpoints = Checkpointer(tmp_path, every=1, restore=True)
    checkpoints.save(3, {}, {"policy": module})
    expected = r"EI round 4: ei loss became nan at step 2\. The run stops here; kept: the checkpoint after step 3, "
    with pytest.raises(FloatingPointError, match=expected), stop_if_not_finite("EI round 4", checkpoints):
        raise FloatingPointError("ei loss became nan at step 2.")  # what finetune raises
    with stop_if_not_finite("EI round 5", checkpoints):
        pass  # nothing raised, nothing changed
    assert checkpoints.restore().step == 3


def test_an_ei_round_with_no_good_sample_is_logged_not_a_crash(tmp_path, caplog):
    """An untrained model solves nothing: every round keeps nothing, the policy stays, the run ends normally."""
    ei = ["algo=ei", "algo.rounds=2", "algo.num_samples=1", "algo.n_questions=4", "algo.max_new_tokens=8",
          "algo.eval_init=false", f"cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    checkpoints = Checkpointer(tmp_path, every=1, restore=True)
    cfg = compose_experiment([*TINY_RUN, *ei])
    metrics = run_experiment(
        cfg, NullTracker(), base_dir=tmp_path, output_dir=tmp_path / "out", checkpoints=checkpoints
    )
    assert metrics["eval/maj_at_1"] == 0
    assert "EI round 2: no sample kept yet" in caplog.text
    assert checkpoints.restore().data["dataset"] == {}


class StepRecorder(NullTracker):
    """Records the step of every eval/ metric logged."""

    def __init__(self) -> None:
        self.eval_steps: list[int | None] = []

    def log_metrics(self, metrics, step=None) -> None:
        if "eval/maj_at_1" in metrics:
            self.eval_steps.append(step)


@pytest.mark.parametrize(("eval_every", "expected"), [(1, [1, 2, 3]), (2, [2, 3]), (0, [3])])
def test_ei_evaluates_every_eval_every_rounds_and_after_the_last(tmp_path, eval_every, expected):
    ei = ["algo=ei", "algo.rounds=3", "algo.num_samples=1", "algo.n_questions=2", "algo.max_new_tokens=4",
          "algo.eval_init=false", f"algo.eval_every={eval_every}", f"cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    tracker = StepRecorder()
    run_experiment(compose_experiment([*TINY_RUN, *ei]), tracker, base_dir=tmp_path, output_dir=tmp_path / "out")
    assert tracker.eval_steps == expected


class KilledWhileEvaluating(Exception):
    """Stands for the session's end arriving during the final evaluation."""


@pytest.mark.parametrize("algo", ["ei", "ppo", "grpo"])
def test_a_run_killed_during_its_final_evaluation_resumes_without_training_again(tmp_path, monkeypatch, caplog, algo):
    overrides = {
        "ei": ["algo=ei", "algo.rounds=1", "algo.num_samples=1", "algo.n_questions=2", "algo.max_new_tokens=4"],
        "ppo": ["algo=ppo", "algo.steps=1", "algo.rollout_questions=2", "algo.num_samples=2", "algo.max_new_tokens=4",
                "algo.critic_warmup_steps=0"],
        "grpo": ["algo=grpo", "algo.steps=1", "algo.rollout_questions=2", "algo.num_samples=2",
                 "algo.max_new_tokens=4"],
    }[algo]  # fmt: skip
    cfg = compose_experiment([*TINY_RUN, *overrides, "algo.eval_init=false", f"cache_dir={tmp_path / 'cache'}"])
    module = importlib.import_module(f"reasoning_rl.algos.{algo}")

    def killed(*args, **kwargs):
        raise KilledWhileEvaluating

    monkeypatch.setattr(module, "evaluate_policy", killed)
    checkpoints = Checkpointer(tmp_path, every=1, restore=True)
    with pytest.raises(KilledWhileEvaluating):
        run_experiment(cfg, NullTracker(), base_dir=tmp_path, output_dir=tmp_path / "out", checkpoints=checkpoints)
    assert checkpoints.restore().step == 1  # the last step's checkpoint came before the evaluation
    monkeypatch.undo()
    caplog.clear()
    caplog.set_level(logging.INFO)
    metrics = run_experiment(
        cfg, NullTracker(), base_dir=tmp_path, output_dir=tmp_path / "out", checkpoints=checkpoints
    )
    assert "eval/maj_at_1" in metrics
    assert not any(word in caplog.text for word in ("EI round 1:", "step 1: reward"))  # nothing trained again


def test_rcrl_resumes_from_its_checkpoint_without_labelling_again(tmp_path, caplog):
    rcrl = ["algo=rcrl", "algo.ei.rounds=1", "algo.ei.num_samples=1", "algo.ei.n_questions=4", "algo.ei.max_steps=2",
            "algo.ei.max_new_tokens=16", "algo.num_solutions=1", "algo.num_rollouts=1", "algo.n_questions=4",
            "algo.max_new_tokens=16", "algo.max_steps=2", f"cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    caplog.set_level(logging.INFO)
    checkpoints = Checkpointer(tmp_path, every=1, restore=True)
    cfg = compose_experiment([*TINY_RUN, *rcrl])
    first = run_experiment(cfg, NullTracker(), base_dir=tmp_path, output_dir=tmp_path / "a", checkpoints=checkpoints)
    assert "RCRL: " in caplog.text  # the labelling log line
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 2
    caplog.clear()
    cfg = compose_experiment([*TINY_RUN, *rcrl])
    again = run_experiment(cfg, NullTracker(), base_dir=tmp_path, output_dir=tmp_path / "b", checkpoints=checkpoints)
    assert "resuming after step 2" in caplog.text and "RCRL: " not in caplog.text  # nothing labelled or trained
    assert again == first
