"""The Hydra job: validate the composed config, open the tracker run, run the experiment, report clearly.

Errors a user can fix (a bad config combination, a malformed data file, a model path that does not exist) are
printed as one paragraph, without a traceback, and the process exits with status 2; the tracker run is marked
FAILED. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from reasoning_rl.config import ConfigError, ExperimentConfig, LoggerName, to_experiment
from reasoning_rl.models import ModelLoadError
from reasoning_rl.tasks import TaskDataError
from reasoning_rl.tracking import MLflowTracker, NullTracker, Tracker, default_tracking_uri, flatten

log = logging.getLogger(__name__)

USER_ERRORS = (ConfigError, TaskDataError, ModelLoadError, FloatingPointError, OSError)
EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    print(f"\nError: {message}\n", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def run_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """The axes of the paper's tables, as tags, so the MLflow UI can filter and group runs by them."""
    return {
        "algo": cfg.algo.name,
        "reward": cfg.reward.name.value,
        "init": cfg.init.name.value,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "seed": str(cfg.seed),
    }


def open_tracker(cfg: ExperimentConfig, project_root: Path) -> Tracker:
    if cfg.logger.name == LoggerName.none:
        return NullTracker()
    tags = run_tags(cfg)
    run_name = cfg.logger.run_name or "-".join(tags[k] for k in ("algo", "reward", "init", "model", "task"))
    uri = cfg.logger.tracking_uri or default_tracking_uri(project_root)
    return MLflowTracker(uri, cfg.logger.experiment, run_name, tags)


def run_job(raw_cfg: DictConfig, project_root: Path) -> float:
    from reasoning_rl.experiment import run_experiment  # heavy imports (torch, transformers) after validation

    try:
        cfg = to_experiment(raw_cfg)
    except ConfigError as error:
        fail(str(error))
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    tracker = open_tracker(cfg, project_root)
    tracker.log_params(flatten(OmegaConf.to_container(raw_cfg, resolve=True, enum_to_str=True)))
    tracker.log_text(OmegaConf.to_yaml(raw_cfg, resolve=True), "config/config.yaml")
    tracker.log_text("\n".join(hydra_cfg.overrides.task) + "\n", "config/overrides.txt")
    try:
        metrics = run_experiment(cfg, tracker, base_dir=Path(hydra_cfg.runtime.cwd), output_dir=output_dir)
    except USER_ERRORS as error:
        tracker.finish(status="FAILED")
        fail(str(error))
    except BaseException:
        tracker.finish(status="FAILED")
        raise
    tracker.finish()
    if isinstance(tracker, MLflowTracker):
        print(
            f"\nDone. Run {tracker.run_id} in experiment '{cfg.logger.experiment}'. Browse it with:\n"
            f"  mlflow ui --backend-store-uri {tracker.tracking_uri}\n"
            f"Outputs (checkpoints, samples): {output_dir}\n"
        )
    return metrics["eval/maj_at_1"]
