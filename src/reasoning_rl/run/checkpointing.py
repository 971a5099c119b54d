"""Checkpoint and resume: a run survives kills, preemption and requeueing, and a finished run is not recomputed.

A run is identified by its config, not by Hydra's time-named output directory: the key is the SHA-256 of the
resolved config (minus the fields that only say how to run it: ``resume``, ``checkpoint_every``,
``stage_checkpoint_every``, ``logger.run_name``) and the MLflow store it logs to. Everything about the run lives in
``<cache_dir>/runs/<key>/``:

    state.json        the MLflow run id, the latest checkpoint and its step, and, once done, the final metrics
    ckpt-000003/      the latest checkpoint: <module>.safetensors (policy, value head), tensors.safetensors
                      (optimizer moments, RNG states), data.json (counters, EI's dataset D_i, PPO's KL coefficient)
    run.lock          held by the process running the config, so a second copy of the same command is refused

Re-running the same command reads ``state.json``: a finished run prints where its results are and exits; an
unfinished one reopens its MLflow run and the algorithm continues after its last checkpoint. A metric point the
run already holds (same name and step) is not logged again, so a step that was cut short and is redone does not
appear twice, and a step that was checkpointed is never redone.

Writes are atomic: a checkpoint is written into a temporary directory and renamed into place, then ``state.json``
is replaced (temporary file + ``os.replace``) to point at it, then older checkpoints are deleted. A kill at any
moment leaves ``state.json`` naming a complete checkpoint. Tensors are stored with safetensors and everything else
as JSON: resuming never unpickles a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file, load_model, save_file, save_model

from reasoning_rl.config import ExperimentConfig
from reasoning_rl.run.stages import plain
from reasoning_rl.run.tracking import Tracker

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
DATA_FILE = "data.json"
TENSORS_FILE = "tensors.safetensors"
CHECKPOINT_PREFIX = "ckpt-"
# Fields that say how to run a config, not what it computes: changing them resumes the same run.
NOT_IN_KEY = ("resume", "checkpoint_every", "stage_checkpoint_every")


class RunBusyError(OSError):
    """Another process holds the run's lock (the same command is running now)."""


def run_key(cfg: ExperimentConfig, tracking_uri: str | None) -> str:
    """16 hex digits of the SHA-256 of the resolved config and the MLflow store; paths must be absolute already."""
    config = {k: v for k, v in plain(cfg).items() if k not in NOT_IN_KEY}
    config["logger"] = {k: v for k, v in config["logger"].items() if k != "run_name"}
    text = json.dumps({"config": config, "tracking_uri": tracking_uri}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json_atomically(path: Path, value: Any) -> None:
    """Write to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(value, file, indent=2, sort_keys=True)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------ tensors inside JSON


def split_tensors(value: Any, tensors: dict[str, torch.Tensor], name: str) -> Any:
    """A JSON-able copy of ``value`` (an optimizer state dict, RNG states, ...): each tensor goes into ``tensors``
    under a dotted name and is replaced by a reference to it. Non-string dict keys, tuples and numpy arrays are
    tagged so that :func:`join_tensors` rebuilds them exactly (optimizer states are keyed by int)."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value):
            return {k: split_tensors(v, tensors, f"{name}.{k}") for k, v in value.items()}
        return {"__items__": [[k, split_tensors(v, tensors, f"{name}.{i}")] for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, tuple):
        return {"__tuple__": [split_tensors(v, tensors, f"{name}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [split_tensors(v, tensors, f"{name}.{i}") for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__} at {name}")


def join_tensors(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of :func:`split_tensors`."""
    if isinstance(value, list):
        return [join_tensors(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return np.array(value["__ndarray__"], dtype=value["dtype"])
    if "__items__" in value:
        return {k: join_tensors(v, tensors) for k, v in value["__items__"]}
    if "__tuple__" in value:
        return tuple(join_tensors(v, tensors) for v in value["__tuple__"])
    if "__float__" in value:
        return float(value["__float__"])
    return {k: join_tensors(v, tensors) for k, v in value.items()}


def rng_states() -> dict[str, Any]:
    """Python's, numpy's and torch's global random states (CUDA's too when present)."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ------------------------------------------------------------------------------------------ checkpoints


@dataclass
class Checkpoint:
    """A loaded checkpoint: the step (PPO step or EI round) it was taken after, and what the algorithm saved."""

    step: int
    directory: Path
    data: dict[str, Any]  # JSON values, and the "state" entries (optimizer, scheduler, ...) with tensors put back

    def load_modules(self, **modules: torch.nn.Module) -> None:
        """Load each module's weights (``policy=model, value_head=head``) from ``<name>.safetensors``."""
        for name, module in modules.items():
            load_model(module, self.directory / f"{name}.safetensors")  # strict; tied weights are handled


class Checkpointer:
    """Saves and restores an algorithm's state in a run directory; see the module docstring for the layout."""

    def __init__(self, directory: Path, every: int, *, restore: bool, writes: bool = True) -> None:
        self.directory = directory
        self.every = every  # PPO steps between checkpoints (EI checkpoints after every round)
        self.restore_enabled = restore
        self.writes = writes  # False on the ranks other than 0 of a data-parallel job: they restore, rank 0 saves

    def due(self, step: int, *, last: bool) -> bool:
        return last or (self.every > 0 and step % self.every == 0)

    def describe_latest(self) -> str:
        """Where the latest checkpoint is, in words (for error messages)."""
        state = read_state(self.directory)
        if state.get("checkpoint") is None:
            return "no checkpoint yet"
        return f"the checkpoint after step {state['step']}, {self.directory / state['checkpoint']}"

    def check_space(self, needed: int) -> None:
        """Fail now, not at the first checkpoint hours from now, when the disk cannot hold ``needed`` bytes."""
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise OSError(
                f"only {free / 2**20:.0f} MiB free on the disk of {self.directory}, and checkpoints of this run need "
                f"about {needed / 2**20:.0f} MiB; free some space or set cache_dir to a larger disk."
            )

    def restore(self) -> Checkpoint | None:
        """The latest checkpoint of this run (and the global RNG states put back as they were), or None."""
        state = read_state(self.directory)
        name = state.get("checkpoint")
        if not self.restore_enabled or name is None:
            return None
        path = self.directory / name
        data = json.loads((path / DATA_FILE).read_text())
        tensors = load_file(path / TENSORS_FILE) if (path / TENSORS_FILE).exists() else {}
        data = join_tensors(data, tensors)
        set_rng_states(data.pop("rng"))
        log.info("resuming after step %d from %s", state["step"], path)
        return Checkpoint(state["step"], path, data)

    def save(self, step: int, data: Mapping[str, Any], modules: Mapping[str, torch.nn.Module]) -> Path:
        """Write a checkpoint taken after ``step``: ``data`` (JSON values; tensors and state dicts allowed inside),
        each module's weights, and the global RNG states. Returns its directory (not written unless ``writes``)."""
        final = self.directory / f"{CHECKPOINT_PREFIX}{step:06d}"
        if not self.writes:
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.directory))
        try:
            tensors: dict[str, torch.Tensor] = {}
            tree = split_tensors({**data, "rng": rng_states()}, tensors, "state")
            for name, module in modules.items():
                save_model(module, str(tmp / f"{name}.safetensors"))
            save_file(tensors, str(tmp / TENSORS_FILE))
            (tmp / DATA_FILE).write_text(json.dumps(tree))
            if final.exists():  # left by an attempt killed between this rename and the state update below
                shutil.rmtree(final)
            os.replace(tmp, final)
            update_state(self.directory, checkpoint=final.name, step=step)
        except OSError as error:
            previous = read_state(self.directory).get("checkpoint")
            raise OSError(
                f"writing the checkpoint of step {step} to {final} failed: {error}. The last good checkpoint "
                f"({previous or 'none'}) is kept; free disk space or point cache_dir elsewhere, then rerun the "
                "same command to resume."
            ) from error
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in self.directory.glob(f"{CHECKPOINT_PREFIX}*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint after step %d: %s", step, final)
        return final


@contextmanager
def stop_if_not_finite(where: str, checkpoints: Checkpointer | None) -> Iterator[None]:
    """Re-raise a FloatingPointError (a NaN or infinite loss) naming ``where`` and the checkpoint a rerun would
    resume from: the poisoned state is never checkpointed, so the last good checkpoint is kept."""
    try:
        yield
    except FloatingPointError as error:
        kept = checkpoints.describe_latest() if checkpoints is not None else "no checkpoint (none asked)"
        raise FloatingPointError(f"{where}: {error} The run stops here; kept: {kept}.") from None


# Copies of the policy's size one checkpoint holds, times two (the new one is written before the old one goes): EI
# saves the policy; PPO the policy and AdamW's two moments (the value head is one row); GRPO, RLOO, Dr. GRPO the same
# without a value head.
CHECKPOINT_COPIES = {"ei": 2 * 1, "ppo": 2 * 3, "grpo": 2 * 3, "rloo": 2 * 3, "dr_grpo": 2 * 3}


def checkpoint_bytes(model: torch.nn.Module, algo: str) -> int:
    """Disk space the checkpoints of ``algo`` need for ``model`` (0 for an algorithm that does not checkpoint)."""
    return CHECKPOINT_COPIES.get(algo, 0) * sum(p.numel() * p.element_size() for p in model.parameters())


# ---------------------------------------------------------------------------------------- run directory


def read_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def update_state(directory: Path, **fields: Any) -> dict[str, Any]:
    state = {**read_state(directory), **fields}
    write_json_atomically(directory / STATE_FILE, state)
    return state


class RunDirectory:
    """``<cache_dir>/runs/<key>``, locked by this process for as long as it runs the config."""

    def __init__(self, cache_dir: Path, key: str) -> None:
        self.path = Path(cache_dir) / "runs" / key
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.path)
            probe.close()
        except OSError as error:
            raise OSError(
                f"cannot write to the run directory {self.path}: {error}. Set cache_dir to a writable place."
            ) from error
        self._lock = FileLock(str(self.path / "run.lock"))
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise RunBusyError(
                f"another process is running this same config now (it holds {self.path / 'run.lock'}). Wait for "
                "it to finish, or change a setting (e.g. seed) to start a different run."
            ) from None

    @property
    def state(self) -> dict[str, Any]:
        return read_state(self.path)

    def start(self, run_id: str | None, *, fresh: bool) -> None:
        """Record the run id before any work, so a kill before the first checkpoint still resumes into this run."""
        for stale in self.path.glob(".*"):  # temporary files of a process killed mid-write (we hold the lock)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        if fresh:
            for old in self.path.glob(f"{CHECKPOINT_PREFIX}*"):
                shutil.rmtree(old, ignore_errors=True)
            write_json_atomically(self.path / STATE_FILE, {"run_id": run_id, "finished": False})
        else:
            update_state(self.path, run_id=run_id, finished=False)

    def finish(self, metrics: Mapping[str, float], output_dir: Path) -> None:
        update_state(self.path, finished=True, metrics=dict(metrics), output_dir=str(output_dir))

    def release(self) -> None:
        self._lock.release()


# ---------------------------------------------------------------------------------------------- tracker


class ResumedTracker:
    """The tracker of a reopened run: a metric point (name, step) the run already holds is not logged again, and
    params already logged are left alone (MLflow refuses to change a param; ``checkpoint_every`` may differ)."""

    def __init__(self, tracker: Tracker, tracking_uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self._tracker = tracker
        self.run_id = tracker.run_id
        client = MlflowClient(tracking_uri=tracking_uri)
        run = client.get_run(tracker.run_id)
        self._params = set(run.data.params)
        self._logged = {
            (key, point.step) for key in run.data.metrics for point in client.get_metric_history(tracker.run_id, key)
        }

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._tracker.log_params({k: v for k, v in params.items() if k not in self._params})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        new = {k: v for k, v in metrics.items() if (k, step or 0) not in self._logged}
        if new:
            self._tracker.log_metrics(new, step=step)
            self._logged.update((k, step or 0) for k in new)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._tracker.log_artifact(path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._tracker.log_text(text, artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._tracker.set_tags(tags)

    def finish(self, status: str = "FINISHED") -> None:
        self._tracker.finish(status)
