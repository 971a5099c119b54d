"""Every config composes and validates; bad options, keys, types and combinations fail with clear messages."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from reasoning_rl.config import SCHEMAS, ConfigError, ExperimentConfig, register_configs, to_experiment

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")
GROUPS = ("algo", "reward", "init", "model", "task", "rollout", "logger")

register_configs()


def options(group: str) -> list[str]:
    """The options of a group: its YAML files in conf/."""
    return sorted(path.stem for path in (ROOT / "conf" / group).glob("*.yaml"))


def compose_experiment(overrides: list[str]) -> ExperimentConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_experiment(compose(config_name="config", overrides=overrides))


def test_every_group_has_the_documented_options():
    assert options("algo") == ["dr_grpo", "ei", "grpo", "none", "ppo", "rcrl", "rloo"]
    assert options("reward") == ["dense", "orm", "orm_dense", "sparse"]
    assert options("init") == ["pretrained", "sft"]
    assert options("model") == ["13b", "7b", "smollm2_135m", "tiny"]
    assert options("task") == ["arith", "gsm8k", "gsm_symbolic", "svamp"]
    assert options("logger") == ["mlflow", "none"]
    assert options("rollout") == ["native", "vllm"]


def test_options_are_files_and_python_holds_only_schemas():
    # The ConfigStore holds the experiment's schema and the group schemas (under `schema/`), no option values.
    store = ConfigStore.instance()
    assert not any(group in store.repo for group in GROUPS)
    assert sorted(name.removesuffix(".yaml") for name in store.list("schema")) == sorted(s.__name__ for s in SCHEMAS)
    for group in GROUPS:
        for option in options(group):
            # every file names its schema first, so Hydra types its values while composing
            defaults = OmegaConf.load(ROOT / "conf" / group / f"{option}.yaml").defaults
            assert defaults[0].startswith("/schema/") and defaults[0].endswith("@_here_"), (group, option)
            assert defaults[0].removeprefix("/schema/").removesuffix("@_here_") in {s.__name__ for s in SCHEMAS}


@pytest.mark.parametrize(
    "model,task,init,logger",
    list(itertools.product(options("model"), options("task"), options("init"), options("logger"))),
)
def test_every_combination_composes(model, task, init, logger):
    cfg = compose_experiment([f"model={model}", f"task={task}", f"init={init}", f"logger={logger}"])
    assert (cfg.model.name, cfg.task.name, cfg.init.name.value, cfg.logger.name.value) == (model, task, init, logger)


def test_unknown_option_lists_the_valid_choices():
    with pytest.raises(ConfigCompositionException, match="(?s)algo/nope.*Available options in 'algo'.*none"):
        compose_experiment(["algo=nope"])


def test_unknown_key_fails():
    with pytest.raises(ConfigCompositionException) as info:
        compose_experiment(["model.not_a_field=1"])
    assert "Key 'not_a_field' not in 'ModelConfig'" in str(info.value.__cause__)


def test_wrongly_typed_value_fails():
    with pytest.raises(ConfigCompositionException) as info:
        compose_experiment(["model.lr=abc"])
    assert isinstance(info.value.__cause__, ValidationError)
    assert "could not be converted to Float" in str(info.value.__cause__)


def test_enum_field_rejects_unknown_value():
    with pytest.raises(ConfigCompositionException, match="device"):
        compose_experiment(["device=tpu"])


def test_reward_the_algorithm_cannot_use_fails():
    # algo=none evaluates the initial policy; a learned reward has nothing to do there.
    with pytest.raises(ConfigError, match="algo=none cannot use reward=orm"):
        compose_experiment(["reward=orm"])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="multiple of"):
        compose_experiment(["model=tiny", "model.train_batch_size=10", "model.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="min_steps"):
        compose_experiment(["task=arith", "task.min_steps=3", "task.max_steps=2"])
    with pytest.raises(ConfigError, match="must differ"):
        compose_experiment(["task=gsm_symbolic", "task.train_seed=5", "task.test_seed=5"])
    with pytest.raises(ConfigError, match="leaves no room for the prompt"):
        compose_experiment(["model=tiny", "eval.max_new_tokens=384"])
    with pytest.raises(ConfigError, match="eval.k"):
        compose_experiment(["eval.k=0"])


def test_orm_and_rcrl_rules():
    with pytest.raises(ConfigError, match="algo=rcrl cannot use reward=orm_dense"):
        compose_experiment(["algo=rcrl", "reward=orm_dense"])
    with pytest.raises(ConfigError, match="algo.threshold"):
        compose_experiment(["algo=rcrl", "algo.threshold=1.5"])
    with pytest.raises(ConfigError, match="orm_threshold"):
        compose_experiment(["algo=ei", "reward=orm", "algo.orm_threshold=-0.1"])
    with pytest.raises(ConfigError, match="orm.heldout_fraction"):
        compose_experiment(["orm.heldout_fraction=1"])
    # the ORM is trained when the reward needs it or for rerank@K only
    assert compose_experiment(["algo=ei", "reward=orm_dense"]).needs_orm
    assert compose_experiment(["orm.rerank=true"]).needs_orm
    assert not compose_experiment(["algo=ei"]).needs_orm
    cfg = compose_experiment(["algo=rcrl", "algo.ei.rounds=1", "algo.ei.orm_filter=orm_and_correct"])
    assert cfg.algo.ei.rounds == 1 and cfg.algo.ei.orm_filter == "orm_and_correct"


NEW_MODEL = """\
# A model of the user's own, beside the project's: a narrower tiny model.
defaults:
  - /schema/ModelConfig@_here_
  - _self_

name: tiny_narrow
source: tiny
dtype: float32
max_seq_len: 128
lr: 3.0e-3
train_batch_size: 4
micro_batch_size: 4
sample_batch_size: 8
hidden_size: 32
num_layers: 1
num_heads: 2
intermediate_size: 64
"""


def test_a_model_added_as_a_yaml_file_in_a_users_config_dir_composes_and_runs(tmp_path):
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "tiny_narrow.yaml").write_text(NEW_MODEL)
    # the schema still types the user's file: a misspelt key fails while composing, with the schema's name
    (tmp_path / "conf" / "model" / "typo.yaml").write_text(NEW_MODEL.replace("hidden_size", "hiden_size"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "REASONING_RL_THREADS": "1", "MLFLOW_TRACKING_URI": uri}
    command = [sys.executable, str(ROOT / "main.py"), "--config-dir", str(tmp_path / "conf"), "task=arith",
               "algo=none", "init=pretrained", "init.n_shots=0", "task.n_train=8", "task.n_test=4", "eval.k=2",
               "eval.max_new_tokens=8", f"cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    typo = subprocess.run([*command, "model=typo", f"hydra.run.dir={tmp_path / 'typo'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert typo.returncode != 0 and "Key 'hiden_size' not in 'ModelConfig'" in typo.stderr + typo.stdout
    ran = subprocess.run([*command, "model=tiny_narrow", f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("reasoning-rl").experiment_id])
    assert run.data.tags["model"] == "tiny_narrow"
    assert (run.data.params["model.hidden_size"], run.data.params["model.num_layers"]) == ("32", "1")
    assert "eval/maj_at_1" in run.data.metrics
