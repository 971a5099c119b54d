"""MLflow for sweeps: one parent run per multirun, one nested child run per job, tagged with the sweep's axes.

``python main.py -m ...`` calls :class:`MLflowSweepCallback` (registered in ``conf/config.yaml`` under
``hydra.callbacks``) in the launching process, before any job starts. It creates the parent run and writes its id,
the tracking URI and the sweep's axes to ``<hydra.sweep.dir>/mlflow_sweep.json``. Every job, wherever the launcher
runs it (in-process, a submitit process, a Slurm node sharing the file system), reads that file
(:func:`job_sweep_tags`), opens its own run as a child (the tag ``mlflow.parentRunId``, which the MLflow UI uses to
nest runs) and tags it with its value on each axis. The launching process marks the parent FINISHED when the
launcher returns, and FAILED when the sweep ends any other way (a job raised, the user pressed Ctrl-C): no parent is
left RUNNING.

A job whose config already ran (``resume=true``: a finished run is reported, an interrupted one continued) keeps its
run and that run's first parent, which the UI nests it under; :func:`join_sweep` adds the new sweep's parent to the
run's ``sweeps`` tag, so the report of a sweep typed again (``--sweep-dir``, ``--parent``) still finds all its jobs.

The axes are the overrides that vary across the jobs: command-line sweeps (``algo=ei,ppo``) and the sweep file's
``hydra.sweeper.params`` with more than one value (``row: sft,ei,...``).
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from reasoning_rl.run.tracking import default_tracking_uri, experiment_id

log = logging.getLogger(__name__)

SWEEP_FILE = "mlflow_sweep.json"
SWEEPS_TAG = "sweeps"  # the parent run ids of every sweep a run was a job of, space-separated


@dataclass(frozen=True)
class SweepRun:
    run_id: str  # the parent run
    tracking_uri: str
    axes: tuple[str, ...]  # override keys that vary across the jobs, e.g. ("row", "seed")


def sweep_axes(task_overrides: list[str], sweeper_params: dict[str, Any] | None) -> tuple[str, ...]:
    """Keys of the overrides that sweep (a list, range or choice), from the command line and the sweep file."""
    lines = list(task_overrides) + [f"{key}={value}" for key, value in (sweeper_params or {}).items()]
    parsed = OverridesParser.create().parse_overrides(lines)
    axes = [override.get_key_element().lstrip("+~") for override in parsed if override.is_sweep_override()]
    return tuple(dict.fromkeys(axes))  # de-duplicated, in order


def _project_root() -> Path:
    # The callback runs in the launching process, whose __main__ is the project's main.py: the default tracking URI
    # is the mlflow.db beside it, exactly as for the jobs (app.open_tracker).
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return Path(main_file).resolve().parent if main_file else Path.cwd()


class MLflowSweepCallback(Callback):
    """Creates the parent run of a multirun and closes it when the sweep ends (see the module docstring)."""

    def __init__(self) -> None:
        self.sweep_run: SweepRun | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.logger.name == "none":  # a str-valued enum: equal to its value
            return
        from mlflow.tracking import MlflowClient

        uri = config.logger.tracking_uri or default_tracking_uri(_project_root())
        sweep_dir = Path(str(config.hydra.sweep.dir))
        params = config.hydra.sweeper.get("params")  # None without a sweep file
        sweeper_params = OmegaConf.to_container(params, resolve=True) if params is not None else {}
        axes = sweep_axes(list(config.hydra.overrides.task), sweeper_params)  # type: ignore[arg-type]
        client = MlflowClient(tracking_uri=uri)
        experiment = experiment_id(client, config.logger.experiment)
        name = f"sweep {config.hydra.job.config_name} {sweep_dir.name}"
        tags = {
            "sweep": "parent",
            "sweep/config_name": str(config.hydra.job.config_name),
            "sweep/axes": ",".join(axes),
            "sweep/dir": str(sweep_dir.resolve()),
            "sweep/overrides": " ".join(config.hydra.overrides.task),
            "sweep/launcher": str(config.hydra.launcher._target_).rsplit(".", 1)[-1],
        }
        run = client.create_run(experiment, run_name=name, tags=tags)
        self.sweep_run = SweepRun(run.info.run_id, uri, axes)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        info = {"run_id": run.info.run_id, "tracking_uri": uri, "axes": list(axes)}
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(info, indent=2) + "\n")
        log.info("MLflow sweep parent run %s (axes: %s) at %s", run.info.run_id, ", ".join(axes) or "none", uri)
        # Hydra calls on_multirun_end only when every job succeeded; a job's exception (or a user error's sys.exit,
        # or Ctrl-C) ends the launching process instead, and this closes the parent on the way out.
        atexit.register(self._close, "FAILED")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close("FINISHED")

    def _close(self, status: str) -> None:
        if self.sweep_run is None:
            return
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=self.sweep_run.tracking_uri).set_terminated(self.sweep_run.run_id, status)
        if status != "FINISHED":
            log.warning("The sweep did not finish: its MLflow parent run %s is %s.", self.sweep_run.run_id, status)
        self.sweep_run = None


def read_sweep_run(sweep_dir: Path) -> SweepRun | None:
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    return SweepRun(info["run_id"], info["tracking_uri"], tuple(info["axes"]))


def job_sweep_tags(hydra_cfg: DictConfig, tracking_uri: str) -> tuple[str | None, dict[str, str]]:
    """(parent run id or None, tags) for the current Hydra job.

    Tags: ``row`` (the chosen row of the paper's tables, when one is), and in a multirun ``sweep/job`` plus one tag
    per axis with this job's value (``row=ei``, ``seed=1``, ``algo.lr=0.001``). The parent is used only when the
    multirun logs to the same tracking URI as this job.
    """
    tags: dict[str, str] = {}
    row = hydra_cfg.runtime.choices.get("row")
    if row:
        tags["row"] = str(row)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None, tags
    tags["sweep/job"] = str(hydra_cfg.job.num)
    sweep = read_sweep_run(Path(str(hydra_cfg.sweep.dir)))
    if sweep is None or sweep.tracking_uri != tracking_uri:
        return None, tags
    parsed = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    for override in parsed:
        key = override.get_key_element().lstrip("+~")
        if key in sweep.axes:
            tags[key] = str(override.value())
    return sweep.run_id, tags


def join_sweep(tracking_uri: str, run_id: str, parent_run_id: str) -> None:
    """Add the sweep ``parent_run_id`` to the ``sweeps`` tag of the job's run ``run_id`` (see the module docstring).

    Every job calls it, new runs too, so ``sweeps`` alone lists a run's sweeps."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    sweeps = client.get_run(run_id).data.tags.get(SWEEPS_TAG, "").split()
    if parent_run_id not in sweeps:
        client.set_tag(run_id, SWEEPS_TAG, " ".join([*sweeps, parent_run_id]))
