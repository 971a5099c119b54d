"""One logging interface for every algorithm, so a training loop never asks whether MLflow is on.

``open_tracker`` returns an :class:`MLflowTracker` (``logger=mlflow``) or a :class:`NullTracker` (``logger=none``).
Metric names are namespaced ``train/``, ``eval/``, ``perf/``; the list with meanings is in docs/mlflow.md.
MLflow rejects ``@`` in names, hence ``eval/maj_at_1`` for maj@1.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

MLFLOW_DB_NAME = "mlflow.db"
# The kind MLflow 3 opens an experiment on: without it the UI opens on its GenAI traces overview, empty for us;
# custom_model_development opens on the runs (the training runs and a sweep's parent with its children).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def experiment_id(client: Any, name: str) -> str:
    """The id of the MLflow experiment ``name`` (``client``: an ``MlflowClient``), created tagged with
    ``mlflow.experimentKind=custom_model_development``. An existing experiment without a kind (one created before
    the tag, or by hand) gets the tag; one whose kind a user set is left as it is."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # another job of the sweep created it in between
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if EXPERIMENT_KIND_TAG not in found.tags:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return found.experiment_id


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """``logger=none``: metrics go to the Python log only."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        log.info("step %s: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


def default_tracking_uri(project_root: Path) -> str:
    """$MLFLOW_TRACKING_URI if set, else a SQLite file in the project directory (absolute, so Hydra's per-run
    working directory does not scatter runs over many databases)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(project_root / MLFLOW_DB_NAME).resolve()}"


class MLflowTracker:
    """One MLflow run per job; ``run_id`` reopens an existing run (a resumed job, see run/checkpointing.py);
    ``parent_run_id`` makes a new run the child of a sweep's parent run (launch/sweep.py)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str],
        run_id: str | None = None,
        parent_run_id: str | None = None,
    ):
        import mlflow  # imported here: mlflow takes ~2 s to import and logger=none runs do not need it

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment_id=experiment_id(mlflow.tracking.MlflowClient(tracking_uri), experiment))
        if run_id is not None:
            self._run = mlflow.start_run(run_id=run_id, tags=dict(tags))
        else:
            # The tag the MLflow UI nests runs by; start_run(nested=True) would need the parent active in this process.
            parent = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
            self._run = mlflow.start_run(run_name=run_name, tags={**tags, **parent})
        self.run_id = self._run.info.run_id
        self.tracking_uri = tracking_uri
        log.info("MLflow run %s (%s) at %s", run_name, self.run_id, tracking_uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = {k: ("None" if v is None else str(v)) for k, v in params.items()}
        keys = sorted(items)
        for start in range(0, len(keys), 100):  # MLflow caps a params batch at 100 entries
            self._mlflow.log_params({k: items[k] for k in keys[start : start + 100]})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._mlflow.log_text(text, artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._mlflow.set_tags(dict(tags))

    def finish(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"lr": 1}}`` -> ``{"model.lr": 1}``: MLflow params are flat."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat
