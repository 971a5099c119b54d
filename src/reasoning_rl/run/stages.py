"""Cached, content-addressed stages shared by the jobs of a sweep (the SFT checkpoint, ORM samples, the ORM).

A stage is a directory under ``<cache_dir>/stages/<name>/<key>``, where the key is the hash of everything that
determines its content (``inputs``: the config sections the stage reads, plus ``STAGE_FORMAT``). The first job
that needs a stage builds it; every later job, in this run or another, reuses it. Two jobs that need it at the
same time compute it once: the builder holds a file lock, the other waits and then reuses.

A stage is never seen half-written: it is built in a temporary directory beside its final place, ``stage.json``
(its inputs, for the curious) is written last, and the directory is renamed into place. A crash leaves at most a
temporary directory, which the next builder of that stage deletes. Delete ``<cache_dir>/stages`` to recompute
everything.

A long build may keep checkpoints of its own progress in ``<key>.progress`` (:func:`progress_dir`; the SFT stage
does), so that a builder killed half-way is continued by the next one instead of restarted; only the lock holder
touches it, and it is deleted once the stage is in place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from filelock import FileLock

from reasoning_rl.config import ExperimentConfig
from reasoning_rl.run.tracking import Tracker
from reasoning_rl.tasks import Problem

log = logging.getLogger(__name__)
T = TypeVar("T")

STAGE_FORMAT = 1  # bump when a stage's content changes for the same inputs (a code change), to invalidate caches
MANIFEST = "stage.json"


def plain(value: Any) -> Any:
    """Config objects (dataclasses, enums, paths) as JSON-able values, for hashing and the manifest."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def stage_key(name: str, inputs: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of the stage's name, format version and inputs (key order does not matter)."""
    text = json.dumps({"stage": name, "format": STAGE_FORMAT, "inputs": plain(inputs)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_fingerprint(problems: Sequence[Problem]) -> str:
    """SHA-256 of the problems' ids, questions and reference solutions: stages key on the data itself, so a change
    that leaves the training set alone (``task.n_test``, the eval settings) still shares the stage."""
    text = json.dumps([(p.id, p.question, p.reference) for p in problems])
    return hashlib.sha256(text.encode()).hexdigest()


def model_stage_inputs(cfg: ExperimentConfig) -> dict[str, Any]:
    """The base model's settings that determine what is computed from it (not how fast: the sampler's batch size,
    gradient checkpointing, FSDP2 sharding). ``pretrain_steps`` enters only when set, so the stages built before it
    existed keep their keys."""
    how_to_run = ("sample_batch_size", "gradient_checkpointing", "fsdp")
    model = {k: v for k, v in plain(cfg.model).items() if k not in how_to_run}
    if not model["pretrain_steps"]:
        del model["pretrain_steps"]
    return model


def init_stage_inputs(cfg: ExperimentConfig, train: Sequence[Problem]) -> dict[str, Any]:
    """What determines the init policy (the SFT checkpoint): the base model and its training settings, the
    training problems, the init and the seed. Every stage built from the init policy includes these."""
    model = model_stage_inputs(cfg)
    return {
        "model": model,
        "task": cfg.task.name,
        "train_data": data_fingerprint(train),
        "init": cfg.init,
        "seed": cfg.seed,
    }


def sampler_stage_inputs(cfg: ExperimentConfig) -> dict[str, Any]:
    """What a stage built from samples adds to its key: the rollout engine and its dtype, when it is not our own
    (vLLM draws other samples from the same seed). Empty for rollout=native: those keys stay what they were."""
    if cfg.rollout.name.value == "native":
        return {}
    return {"rollout": cfg.rollout.name, "rollout_dtype": cfg.rollout.dtype or cfg.model.dtype}


def stage_path(cache_dir: Path, name: str, inputs: Mapping[str, Any]) -> Path:
    return Path(cache_dir) / "stages" / name / stage_key(name, inputs)


def _progress_path(final: Path) -> Path:
    return final.with_name(final.name + ".progress")


def progress_dir(cache_dir: Path, name: str, inputs: Mapping[str, Any]) -> Path:
    """Where the builder of a stage may checkpoint its progress (see the module docstring); created on demand."""
    path = _progress_path(stage_path(cache_dir, name, inputs))
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Stage:
    name: str
    key: str
    path: Path  # the finished stage directory
    reused: bool  # True when an earlier job built it


def cached_stage(
    cache_dir: Path, name: str, inputs: Mapping[str, Any], build: Callable[[Path], None], tracker: Tracker
) -> Stage:
    """The stage ``name`` for ``inputs``: reused when it exists, else built by ``build(directory)`` exactly once.

    ``build`` writes the stage's files into the (empty, temporary) directory it is given. The run is tagged
    ``stage/<name>`` with "reused <path>" or "computed <path>", so a run says which stages it shared.
    """
    final = stage_path(cache_dir, name, inputs)
    reused = (final / MANIFEST).is_file()
    if not reused:
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):
            reused = (final / MANIFEST).is_file()  # another job may have built it while we waited for the lock
            if not reused:
                _build_holding_lock(final, name, inputs, build)
    log.info("stage %s: %s %s", name, "reused" if reused else "computed", final)
    tracker.set_tags({f"stage/{name}": f"{'reused' if reused else 'computed'} {final}"})
    return Stage(name, final.name, final, reused)


class Ranks(Protocol):
    """What building a stage together needs of a data-parallel job (training/distributed.py's DataParallel)."""

    @property
    def is_main(self) -> bool: ...
    @property
    def active(self) -> bool: ...
    @property
    def world_size(self) -> int: ...
    def share(self, value: T) -> T: ...
    def barrier(self) -> None: ...


def cached_stage_together(
    cache_dir: Path,
    name: str,
    inputs: Mapping[str, Any],
    build: Callable[[Path | None], None],
    tracker: Tracker,
    data_parallel: Ranks,
) -> Stage:
    """:func:`cached_stage` for a stage that every rank of a data-parallel job builds together (the SFT stage with
    ``model.fsdp``: each rank trains its shard). Rank 0 holds the lock and decides whether the stage is built or
    reused; when it is built, every rank calls ``build``, rank 0 with the temporary directory to write and the
    others with None (they compute, rank 0 writes). ``reused`` is then False on every rank: each holds the result
    in memory already. Every rank must call it (collectives)."""
    if not data_parallel.active:
        return cached_stage(cache_dir, name, inputs, build, tracker)
    final = stage_path(cache_dir, name, inputs)
    lock = FileLock(str(final) + ".lock")
    if data_parallel.is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        if not (final / MANIFEST).is_file():
            lock.acquire()  # another job may be building it: wait, then look again
    reused = data_parallel.share((final / MANIFEST).is_file() if data_parallel.is_main else False)
    try:
        if not reused:
            if data_parallel.is_main:
                _build_holding_lock(final, name, inputs, build)
            else:
                build(None)
    finally:
        if lock.is_locked:
            lock.release()
    data_parallel.barrier()  # the stage is in place before any rank goes on to read it
    log.info("stage %s: %s %s (%d ranks)", name, "reused" if reused else "computed", final, data_parallel.world_size)
    tracker.set_tags({f"stage/{name}": f"{'reused' if reused else 'computed'} {final}"})
    return Stage(name, final.name, final, reused)


def _build_holding_lock(final: Path, name: str, inputs: Mapping[str, Any], build: Callable[[Path], None]) -> None:
    """Build the stage in place; the caller holds its lock."""
    for stale in final.parent.glob(f".{final.name}.*"):  # left by a builder that was killed; we hold the lock, so
        shutil.rmtree(stale, ignore_errors=True)  # no live builder is using it
    _build_atomically(final, name, inputs, build)
    shutil.rmtree(_progress_path(final), ignore_errors=True)  # the stage is in place: done with its progress


def _build_atomically(final: Path, name: str, inputs: Mapping[str, Any], build: Callable[[Path], None]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a stage is shared by every job of the machine
    try:
        build(tmp)
        manifest = {"stage": name, "format": STAGE_FORMAT, "inputs": plain(inputs)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
