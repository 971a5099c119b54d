"""The Hydra job: validate the composed config, open the tracker run, run the experiment, report clearly.

Errors a user can fix (an unknown option or key, a wrongly typed value, a bad config combination, a malformed data
file, a model path that does not exist) are printed as one paragraph, without a traceback, and the process exits
with status 2; the tracker run is marked FAILED. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from reasoning_rl.config import ConfigError, ExperimentConfig, LoggerName, to_experiment
from reasoning_rl.launch.sweep import job_sweep_tags, join_sweep
from reasoning_rl.models.loading import ModelLoadError
from reasoning_rl.run.checkpointing import Checkpointer, ResumedTracker, RunDirectory, run_key
from reasoning_rl.run.tracking import MLflowTracker, NullTracker, Tracker, default_tracking_uri, flatten
from reasoning_rl.tasks import TaskDataError
from reasoning_rl.training.distributed import DataParallel

log = logging.getLogger(__name__)

USER_ERRORS = (ConfigError, TaskDataError, ModelLoadError, FloatingPointError, OSError)
EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    print(f"\nError: {message}\n", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def hydra_error_message(error: CompactHydraException) -> str:
    """Hydra's composition error as one paragraph: its message (less the config search path it lists), the
    OmegaConf error under it (what is wrong with which key), and where to look up the valid options and keys."""
    text = " ".join(str(error).split("Config search path:")[0].split())
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException):
        text += f": {str(cause).splitlines()[0]}" + (f" (key {cause.full_key})" if cause.full_key else "")
    return (
        f"{text}. `python main.py --help` lists the options of each config group, `python main.py --cfg job` "
        "prints every key with its value."
    )


def run_cli(main: Callable[[], object]) -> None:
    """Run the ``@hydra.main`` function as ``python main.py`` does, but with Hydra's composition errors (an unknown
    option or key, a value of the wrong type) reported like our own: one paragraph and status 2.

    Hydra prints those and exits with status 1, the status of a crash. With ``HYDRA_FULL_ERROR=1``, its documented
    switch, it raises every error instead: the composition errors are caught here by their type, and any other
    exception ends in its full traceback (status 1) as before. A user who set the variable gets the traceback."""
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except CompactHydraException as error:
        if wants_traceback:
            raise
        fail(hydra_error_message(error))


def check_output_dirs(argv: list[str]) -> None:
    """Hydra creates the job's output directory before any code of ours runs, and fails with a traceback when it
    cannot: check the output directory first, as given on the command line (``hydra.run.dir``, ``hydra.sweep.dir``)
    or else the default's root under the working directory (``outputs/``, ``multirun/``: conf/config.yaml)."""
    multirun = "-m" in argv or "--multirun" in argv
    dirs = {"hydra.sweep.dir": "multirun"} if multirun else {"hydra.run.dir": "outputs"}
    for arg in argv[1:]:
        key, _, value = arg.partition("=")
        key = key.lstrip("+")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value and "${" not in value:
            dirs[key] = value
    for key, value in dirs.items():
        existing = Path(value).expanduser().absolute()
        while not existing.exists():  # the nearest existing ancestor must be a writable directory
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            problem = "is not a directory" if not existing.is_dir() else "is not writable"
            fail(f"cannot create the output directory {value}: {existing} {problem}. Set {key} to a writable place.")


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


def tracking_uri(cfg: ExperimentConfig, project_root: Path) -> str | None:
    if cfg.logger.name == LoggerName.none:
        return None
    return cfg.logger.tracking_uri or default_tracking_uri(project_root)


def open_tracker(cfg: ExperimentConfig, project_root: Path, run_id: str | None = None) -> Tracker:
    """A new run, or the run ``run_id`` reopened (a resumed job)."""
    uri = tracking_uri(cfg, project_root)
    if uri is None:
        return NullTracker()
    tags = run_tags(cfg)
    run_name = cfg.logger.run_name or "-".join(tags[k] for k in ("algo", "reward", "init", "model", "task"))
    # In a multirun: the sweep's parent run, and this job's value on each of the sweep's axes (launch/sweep.py).
    parent_run_id, sweep_tags = job_sweep_tags(HydraConfig.get(), uri) if HydraConfig.initialized() else (None, {})
    from mlflow.exceptions import MlflowException  # imported here: mlflow is slow to import

    try:
        return MLflowTracker(
            uri, cfg.logger.experiment, run_name, {**tags, **sweep_tags}, run_id=run_id, parent_run_id=parent_run_id
        )
    except (MlflowException, OSError) as error:  # a store MLflow cannot open or create, or a run gone from it
        reason = str(error).strip().splitlines()[0][:200].rstrip(".")  # MLflow's messages run on for lines
        if run_id is None:
            raise ConfigError(
                f"cannot open the MLflow tracking store {uri}: {reason}. Set logger.tracking_uri to one MLflow can "
                "open (sqlite:///path/to/mlflow.db in a writable directory, http://host:port), or logger=none."
            ) from None
        raise ConfigError(
            f"cannot reopen MLflow run {run_id} to resume it in {uri}: {reason}. Run with resume=false to start "
            "this config afresh."
        ) from None


def report_finished(state: dict, uri: str | None) -> float:
    """A finished run is not recomputed: say where its results are, and return its maj@1 as a new run would."""
    metrics = state.get("metrics", {})
    print(
        f"\nAlready done: this config finished as run {state.get('run_id')} (maj@1 = "
        f"{metrics.get('eval/maj_at_1', float('nan')):.4f}); nothing was recomputed.\n"
        + (f"  mlflow ui --backend-store-uri {uri}\n" if uri else "")
        + f"Outputs (samples): {state.get('output_dir')}\nTo run it again from scratch: resume=false\n"
    )
    return metrics.get("eval/maj_at_1", float("nan"))


def join_current_sweep(uri: str | None, run_id: str | None) -> None:
    """In a multirun, list the sweep's parent on the job's run, whether the run is new, resumed or already done."""
    if uri is None or run_id is None or not HydraConfig.initialized():
        return
    parent_run_id, _ = job_sweep_tags(HydraConfig.get(), uri)
    if parent_run_id is None:
        return
    try:
        join_sweep(uri, run_id, parent_run_id)
    except Exception as error:  # mlflow's own exception type; the job's results do not depend on this tag
        log.warning("Could not tag run %s with its sweep %s: %s", run_id, parent_run_id, error)


def run_job(raw_cfg: DictConfig, project_root: Path) -> float:
    from reasoning_rl.launch.pipeline import resolve_paths  # heavy imports (torch, transformers) after validation

    try:
        cfg = to_experiment(raw_cfg)
    except ConfigError as error:
        fail(str(error))
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    base_dir = Path(hydra_cfg.runtime.cwd)
    resolve_paths(cfg, base_dir)
    uri = tracking_uri(cfg, project_root)
    try:
        data_parallel = start_data_parallel(cfg)
    except ConfigError as error:
        fail(str(error))
    if not data_parallel.is_main:
        return run_follower(data_parallel, cfg, uri, base_dir, output_dir)

    # The run is keyed by its config (run/checkpointing.py): a finished one is reported, an unfinished one resumed.
    try:
        run_dir = RunDirectory(Path(cfg.cache_dir), run_key(cfg, uri))
    except OSError as error:  # not writable, or the same config is running in another process
        fail(str(error))
    try:
        return run_in(run_dir, cfg, raw_cfg, project_root, uri, output_dir, data_parallel)
    finally:
        run_dir.release()  # a multirun runs its next job in this process


def start_data_parallel(cfg: ExperimentConfig) -> DataParallel:
    """This process's rank in a job launched as several (``accelerate launch``, ``torchrun``, Slurm tasks)."""
    from reasoning_rl.models.loading import resolve_device
    from reasoning_rl.training.distributed import from_environment

    return from_environment(resolve_device(cfg.device.value))


def run_follower(
    data_parallel: DataParallel, cfg: ExperimentConfig, uri: str | None, base_dir: Path, output_dir: Path
) -> float:
    """A rank other than 0: it runs the job beside rank 0, which decides whether it resumes, logs and saves."""
    from reasoning_rl.launch.pipeline import run_experiment

    plan = data_parallel.share(None)  # rank 0's: {"finished": ..., "resuming": ..., "maj_at_1": ...}
    if plan["finished"]:
        return plan["maj_at_1"]
    run_path = Path(cfg.cache_dir) / "runs" / run_key(cfg, uri)
    checkpoints = Checkpointer(run_path, cfg.checkpoint_every, restore=plan["resuming"], writes=False)
    try:
        metrics = run_experiment(cfg, NullTracker(), base_dir=base_dir, output_dir=output_dir, checkpoints=checkpoints,
                                 data_parallel=data_parallel)  # fmt: skip
    except USER_ERRORS as error:
        fail(f"(rank {data_parallel.rank}) {error}")
    return metrics["eval/maj_at_1"]


def run_in(
    run_dir: RunDirectory,
    cfg: ExperimentConfig,
    raw_cfg: DictConfig,
    project_root: Path,
    uri: str | None,
    output_dir: Path,
    data_parallel: DataParallel,
) -> float:
    """Run (or resume, or report) the job whose state lives in ``run_dir``; with several processes, rank 0's part
    (the others run :func:`run_follower`)."""
    from reasoning_rl.launch.pipeline import run_experiment

    hydra_cfg = HydraConfig.get()
    state = run_dir.state
    resuming = cfg.resume and "finished" in state
    finished = bool(resuming and state["finished"])
    maj_at_1 = state.get("metrics", {}).get("eval/maj_at_1", float("nan")) if finished else float("nan")
    data_parallel.share({"finished": finished, "resuming": resuming, "maj_at_1": maj_at_1})
    if finished:
        join_current_sweep(uri, state.get("run_id"))
        return report_finished(state, uri)
    try:
        tracker = open_tracker(cfg, project_root, run_id=state.get("run_id") if resuming else None)
    except ConfigError as error:
        fail(str(error))
    join_current_sweep(uri, tracker.run_id)
    main_tracker = tracker
    run_dir.start(tracker.run_id, fresh=not resuming)
    if resuming and uri is not None:
        tracker = ResumedTracker(tracker, uri)
        tracker.set_tags({"resumed": f"after step {state.get('step', 0)} ({state.get('checkpoint') or 'the start'})"})
    checkpoints = Checkpointer(run_dir.path, cfg.checkpoint_every, restore=resuming)
    tracker.log_params(flatten(OmegaConf.to_container(raw_cfg, resolve=True, enum_to_str=True)))
    tracker.log_text(OmegaConf.to_yaml(raw_cfg, resolve=True), "config/config.yaml")
    tracker.log_text("\n".join(hydra_cfg.overrides.task) + "\n", "config/overrides.txt")
    try:
        metrics = run_experiment(
            cfg,
            tracker,
            base_dir=Path(hydra_cfg.runtime.cwd),
            output_dir=output_dir,
            checkpoints=checkpoints,
            data_parallel=data_parallel,
        )
    except USER_ERRORS as error:
        tracker.finish(status="FAILED")
        fail(str(error))
    except BaseException:
        tracker.finish(status="FAILED")
        raise
    run_dir.finish(metrics, output_dir)
    tracker.finish()
    if isinstance(main_tracker, MLflowTracker):
        print(
            f"\nDone. Run {main_tracker.run_id} in experiment '{cfg.logger.experiment}'. Browse it with:\n"
            f"  mlflow ui --backend-store-uri {main_tracker.tracking_uri}\n"
            f"Outputs (checkpoints, samples): {output_dir}\n"
        )
    return metrics["eval/maj_at_1"]
