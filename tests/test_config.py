"""Every config composes and validates; bad options, keys, types and combinations fail with clear messages."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from reasoning_rl.config import ConfigError, ExperimentConfig, register_configs, to_experiment

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
GROUPS = ("algo", "reward", "init", "model", "task", "logger")

register_configs()


def options(group: str) -> list[str]:
    return sorted(name.removesuffix(".yaml") for name in ConfigStore.instance().list(group))


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
