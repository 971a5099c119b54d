"""Every bad input we know of, through the real command line: one clear message, exit status 2, no traceback.

There is a case for every validation rule: each ``ConfigError`` a config dataclass or a run raises, each check of
the task loaders (src/reasoning_rl/tasks/), the checks of ``model.path``, the tracking store, the run and output
directories, and Hydra's own composition errors (which main.py reports with status 2 too, see ``app.run_cli``). The
cases run `main.py` in forked processes (the real Hydra entry point, a real exit status and real stdout/stderr,
without paying Python's and torch's start-up for each of the ~90 cases), several at once; one case also runs as a
fresh interpreter to show the two agree.

The messages they get are the table in ``docs/errors.md``. A normal run checks that the committed file is current;
``REASONING_RL_WRITE_DOCS=1 pytest tests/test_bad_input.py`` rewrites it.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ERRORS_DOC = ROOT / "docs" / "errors.md"
WRITE_DOCS = os.environ.get("REASONING_RL_WRITE_DOCS") == "1"
EXIT_USER_ERROR = 2
PARALLEL = min(4, os.cpu_count() or 1)  # cases run at once (each is one process, on one thread)
CASE_TIMEOUT_S = 300
# Cheap settings under every case, so a case that gets past validation fails (or ends) in seconds.
BASE = ["model=tiny", "task=arith", "algo=none", "logger=none", "task.n_train=8", "task.n_test=2", "eval.k=1",
        "eval.max_new_tokens=8"]  # fmt: skip

GSM8K_ROW = {"question": "Ann has 2 apples and buys 3. How many?", "answer": "2+3=<<2+3=5>>5\n#### 5"}
GSM8K = ["task=gsm8k", "task.data_dir={tmp}/gsm8k"]
SVAMP_ROW = {"Body": "Ann has 2 apples.", "Question": "How many?", "Equation": "( 2.0 + 0.0 )", "Answer": 2.0}
SVAMP = ["task=svamp", "task.data_path={tmp}/svamp.json", "task.n_test_split=1"]  # 1 train, 1 test entry
A_FILE = {"a_file": "a file, not a directory\n"}
STORE_UNDER_A_FILE = ["logger=mlflow", "logger.tracking_uri=sqlite:///{tmp}/a_file/mlflow.db"]


@dataclass
class Case:
    label: str  # the input, as the table shows it
    overrides: list[str]
    fragments: list[str]  # must all appear in the output (`{tmp}` is the case's directory)
    files: dict[str, str | bytes] = field(default_factory=dict)  # files to create first, relative to {tmp}
    own_run_dir: bool = True  # False: no hydra.run.dir=..., the default (outputs/ under the working directory)
    env: dict[str, str] = field(default_factory=dict)  # environment variables of the run
    # A context the run happens in, given the case's directory and arguments (e.g. a run lock held meanwhile)
    around: Callable[[Path, list[str]], AbstractContextManager] | None = None


def gsm8k_files(test_lines: list[str], train_lines: tuple[str, ...] = (json.dumps(GSM8K_ROW),)) -> dict[str, str]:
    train = "".join(f"{line}\n" for line in train_lines)
    return {"gsm8k/train.jsonl": train, "gsm8k/test.jsonl": "\n".join(test_lines) + "\n"}


def svamp_file(*rows: object) -> dict[str, str]:
    return {"svamp.json": json.dumps(list(rows))}


def run_dir_of(tmp: Path, args: list[str]) -> Path:
    """The run directory main.py keys this case's config to (checkpointing.run_key), computed as app.run_job does."""
    from hydra import compose, initialize_config_dir

    from reasoning_rl.config import register_configs, to_experiment
    from reasoning_rl.launch.app import tracking_uri
    from reasoning_rl.launch.pipeline import resolve_paths
    from reasoning_rl.run.checkpointing import run_key

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_experiment(compose("config", overrides=[a for a in args if not a.startswith("hydra.")]))
    resolve_paths(cfg, tmp)  # the case runs in tmp
    return Path(cfg.cache_dir) / "runs" / run_key(cfg, tracking_uri(cfg, ROOT))


@contextmanager
def interrupted_run(tmp: Path, args: list[str]) -> Iterator[None]:
    """The state an interrupted run of this config leaves: its MLflow run id, not finished."""
    from reasoning_rl.run.checkpointing import STATE_FILE

    run_dir = run_dir_of(tmp, args)
    run_dir.mkdir(parents=True)
    (run_dir / STATE_FILE).write_text(json.dumps({"run_id": "0" * 32, "finished": False}))
    yield


@contextmanager
def running_elsewhere(tmp: Path, args: list[str]) -> Iterator[None]:
    """This config's run lock held by another process (this one) while the case runs."""
    from filelock import FileLock

    run_dir = run_dir_of(tmp, args)
    run_dir.mkdir(parents=True)
    with FileLock(str(run_dir / "run.lock")):
        yield


CASES = [
    # Hydra's composition errors: an unknown option or key, a value of the wrong type.
    Case("`algo=nope`", ["algo=nope"], ["Could not find 'algo/nope'", "Available options in 'algo'"]),
    Case("`model.lr=abc`", ["model.lr=abc"], ["model.lr=abc", "could not be converted to Float"]),
    Case("`seed=1.5`", ["seed=1.5"], ["seed=1.5", "could not be converted to Integer"]),
    Case("`device=tpu`", ["device=tpu"], ["device=tpu", "Invalid value 'tpu'"]),
    Case("`model.not_a_field=1`", ["model.not_a_field=1"], ["Key 'not_a_field' not in 'ModelConfig'"]),
    Case("`not_a_key=1`", ["not_a_key=1"], ["Could not override 'not_a_key'"]),
    Case("`+not_a_key=1`", ["+not_a_key=1"], ["unknown config key(s): not_a_key"]),
    Case("`+model.not_a_field=1`", ["+model.not_a_field=1"], ["unknown config key(s): model.not_a_field"]),
    # The config dataclasses' rules (config.py), in the order they appear there.
    Case("`model.source=local` without `model.path`", ["model.source=local"], ["model.source=local needs model.path"]),
    Case("`model.micro_batch_size=0`", ["model.micro_batch_size=0"], ["model.micro_batch_size=0 must be >= 1"]),
    Case("`model.lr=0`", ["model.lr=0"], ["model.lr=0.0 must be > 0"]),
    Case(
        "`model.hidden_size=100 model.num_heads=3`",
        ["model.hidden_size=100", "model.num_heads=3"],
        ["model.hidden_size=100 must be a multiple of model.num_heads=3"],
    ),
    Case("`model.lora_rank=-1`", ["model.lora_rank=-1"], ["model.lora_rank=-1 must be >= 0"]),
    Case(
        "`model=smollm2_135m model.pretrain_steps=10`",
        ["model=smollm2_135m", "model.pretrain_steps=10"],
        ["model.pretrain_steps=10 must be >= 0, and above 0 only with model.source=tiny"],
    ),
    Case(
        "`model.fsdp=true model.dtype=float16`",
        ["model.fsdp=true", "model.dtype=float16"],
        ["model.fsdp=true computes in float32 or bfloat16"],
    ),
    Case(
        "`model.lora_rank=4 model.lora_alpha=0`",
        ["model.lora_rank=4", "model.lora_alpha=0"],
        ["model.lora_alpha=0.0 must be > 0"],
    ),
    Case(
        "`model.train_batch_size=10 model.micro_batch_size=4`",
        ["model.train_batch_size=10", "model.micro_batch_size=4"],
        ["must be a multiple of model.micro_batch_size=4"],
    ),
    Case("`task.n_test=0`", ["task.n_test=0"], ["task.n_test=0 must be >= 1, or null"]),
    Case("`task=gsm_symbolic task.size_test=0`", ["task=gsm_symbolic", "task.size_test=0"], ["task.size_test=0"]),
    Case(
        "`task=gsm_symbolic task.train_seed=1 task.test_seed=1`",
        ["task=gsm_symbolic", "task.train_seed=1", "task.test_seed=1"],
        ["task.train_seed and task.test_seed must differ"],
    ),
    Case("`task.size_train=0`", ["task.size_train=0"], ["task.size_train=0", "must be >= 1"]),
    Case("`task.max_number=0`", ["task.max_number=0"], ["task.max_number=0 must be >= 1"]),
    Case(
        "`task.min_steps=3 task.max_steps=2`",
        ["task.min_steps=3", "task.max_steps=2"],
        ["need 1 <= task.min_steps <= task.max_steps, got 3, 2"],
    ),
    Case("`task.operations=/`", ["task.operations=/"], ["task.operations='/'"]),
    Case("`init.n_shots=-1`", ["init.n_shots=-1"], ["init.n_shots=-1 must be >= 0"]),
    Case("`init=sft init.epochs=0`", ["init=sft", "init.epochs=0"], ["init.epochs=0.0 must be > 0"]),
    Case("`init=sft init.max_steps=0`", ["init=sft", "init.max_steps=0"], ["init.max_steps=0 must be >= 1, or null"]),
    Case("`init=sft init.lr=0`", ["init=sft", "init.lr=0"], ["init.lr=0.0 must be > 0"]),
    Case("`algo=ei algo.rounds=0`", ["algo=ei", "algo.rounds=0"], ["algo.rounds=0", "must be >= 1"]),
    Case("`algo=ei algo.orm_threshold=2`", ["algo=ei", "algo.orm_threshold=2"], ["algo.orm_threshold=2.0"]),
    Case("`algo=ei algo.n_questions=0`", ["algo=ei", "algo.n_questions=0"], ["algo.n_questions=0 must be >= 1"]),
    Case("`algo=ei algo.eval_every=-1`", ["algo=ei", "algo.eval_every=-1"], ["algo.eval_every=-1 must be >= 0"]),
    Case("`algo=rcrl algo.num_rollouts=0`", ["algo=rcrl", "algo.num_rollouts=0"], ["algo.num_rollouts must be >= 1"]),
    Case("`algo=rcrl algo.threshold=1.5`", ["algo=rcrl", "algo.threshold=1.5"], ["algo.threshold=1.5"]),
    Case(
        "`algo=ppo algo.critic_warmup_steps=20` (`algo.steps=20`)",
        ["algo=ppo", "algo.critic_warmup_steps=20"],
        ["algo.critic_warmup_steps=20 must be in [0, algo.steps=20)"],
    ),  # fmt: skip
    Case(
        "`algo=ppo algo.rollout_questions=0`",
        ["algo=ppo", "algo.rollout_questions=0"],
        ["algo.rollout_questions=0 must be >= 1"],
    ),  # fmt: skip
    Case("`algo=ppo algo.gamma=2`", ["algo=ppo", "algo.gamma=2"], ["algo.gamma=2.0 and algo.lam=1.0 must be in"]),
    Case("`algo=ppo algo.clip_coef=0`", ["algo=ppo", "algo.clip_coef=0"], ["algo.clip_coef and algo.value_clip"]),
    Case(
        "`algo=ppo algo.adaptive_kl=true algo.kl_target=0`",
        ["algo=ppo", "algo.adaptive_kl=true", "algo.kl_target=0"],
        ["algo.adaptive_kl needs algo.kl_target > 0"],
    ),
    Case("`eval.k=0`", ["eval.k=0"], ["eval.k=0: need at least one sample"]),
    Case("`eval.temperature=-1`", ["eval.temperature=-1"], ["eval.temperature must be >= 0"]),
    Case(
        "`rollout=vllm rollout.kv_cache_gib=0`",
        ["rollout=vllm", "rollout.kv_cache_gib=0"],
        ["rollout.kv_cache_gib=0.0 must be > 0"],
    ),
    Case("`orm.num_samples=0`", ["orm.num_samples=0"], ["orm.num_samples=0 must be >= 1"]),
    Case("`orm.heldout_fraction=1`", ["orm.heldout_fraction=1"], ["orm.heldout_fraction=1.0 must be in (0, 1)"]),
    Case("`checkpoint_every=-1`", ["checkpoint_every=-1"], ["checkpoint_every=-1"]),
    Case("`stage_checkpoint_every=-1`", ["stage_checkpoint_every=-1"], ["stage_checkpoint_every=-1 must be >= 0"]),
    Case("`eval.max_new_tokens=1000` (tiny: `max_seq_len=384`)", ["eval.max_new_tokens=1000"], ["model.max_seq_len"]),
    Case("`reward=orm` (with `algo=none`)", ["reward=orm"], ["algo=none cannot use reward=orm"]),
    Case("`algo=rcrl reward=dense`", ["algo=rcrl", "reward=dense"], ["algo=rcrl cannot use reward=dense"]),
    # Rules a run checks once it has the data, the model or the tracker.
    Case(
        "`device=cuda` on a machine without CUDA",
        ["device=cuda"],
        ["device=cuda", "device=cpu"],
        env={"CUDA_VISIBLE_DEVICES": ""},
    ),
    Case(
        "`init.n_shots=20` (more than the `task.n_train=8` problems)",
        ["init.n_shots=20"],
        ["init.n_shots=20", "has only 8 problems", "task.n_train"],
    ),
    Case(
        "`init=sft model.max_seq_len=16` (every prompt is longer)",
        ["init=sft", "model.max_seq_len=16"],
        ["longer than model.max_seq_len=16"],
    ),
    Case(
        "`init=sft model.lr=1e30` (the loss overflows)",
        ["init=sft", "model.lr=1e30", "init.max_steps=3"],
        ["sft loss became", "lower the learning rate"],
    ),  # fmt: skip
    Case(
        "`algo=ei reward=orm orm.n_questions=1` (no ORM can be built)",
        ["algo=ei", "reward=orm", "orm.n_questions=1", "orm.num_samples=1", "orm.max_new_tokens=8", "init.n_shots=0"],
        ["the ORM needs samples of at least 2 questions", "orm.n_questions"],
    ),
    Case(
        "`algo=ei reward=orm orm.n_questions=8` (the ORM takes every training question; `orm.disjoint=true`)",
        [
            "algo=ei",
            "reward=orm",
            "orm.n_questions=8",
            "orm.num_samples=1",
            "orm.max_new_tokens=8",
            "orm.max_steps=1",
            "init.n_shots=0",
        ],
        ["the ORM took all 8", "orm.disjoint=false"],
    ),  # fmt: skip
    Case(
        "an MLflow store that cannot be created (`logger.tracking_uri` under a file)",
        STORE_UNDER_A_FILE,
        ["cannot open the MLflow tracking store", "{tmp}/a_file", "logger.tracking_uri"],
        A_FILE,
    ),
    Case(
        "resuming an interrupted run whose MLflow store cannot be opened",
        STORE_UNDER_A_FILE,
        ["cannot reopen MLflow run 000", "resume=false"],
        A_FILE,
        around=interrupted_run,
    ),
    Case(
        "the same config running in another process now",
        [],
        ["another process is running this same config"],
        around=running_elsewhere,
    ),
    # The task loaders' checks (tasks/).
    Case("`task.data_dir=/nowhere`", ["task=gsm8k", "task.data_dir={tmp}/nowhere"], ["{tmp}/nowhere", "task.data_dir"]),
    Case("`task.data_dir` that is a file", GSM8K, ["{tmp}/gsm8k is a file, not a directory"], {"gsm8k": "x\n"}),
    Case(
        "a GSM8K `train.jsonl` that is a directory",
        GSM8K,
        ["{tmp}/gsm8k/train.jsonl is a directory"],
        {"gsm8k/train.jsonl/README": "x\n", "gsm8k/test.jsonl": json.dumps(GSM8K_ROW) + "\n"},
    ),
    Case(
        "an empty GSM8K `train.jsonl`",
        GSM8K,
        ["{tmp}/gsm8k/train.jsonl holds no problems"],
        gsm8k_files([json.dumps(GSM8K_ROW)], train_lines=()),
    ),
    Case(
        "a GSM8K file with bytes that are not UTF-8",
        GSM8K,
        ["{tmp}/gsm8k/train.jsonl line 2", "not UTF-8"],
        {
            **gsm8k_files([json.dumps(GSM8K_ROW)]),
            "gsm8k/train.jsonl": json.dumps(GSM8K_ROW).encode()
            + b"\n"
            + json.dumps(GSM8K_ROW).replace("Ann", "Ren\xe9e").encode("latin-1")
            + b"\n",
        },
    ),
    Case(
        "a GSM8K file with a line cut short",
        GSM8K,
        ["{tmp}/gsm8k/test.jsonl line 2", "invalid JSON"],
        gsm8k_files([json.dumps(GSM8K_ROW), json.dumps(GSM8K_ROW)[:30]]),
    ),
    Case(
        "a GSM8K line that is not an object",
        GSM8K,
        ["{tmp}/gsm8k/test.jsonl line 1", "expected a JSON object"],
        gsm8k_files(["[1, 2]"]),
    ),
    Case(
        "a GSM8K line without `answer`",
        GSM8K,
        ["{tmp}/gsm8k/test.jsonl line 1", "'answer'"],
        gsm8k_files([json.dumps({"question": "Q?"})]),
    ),
    Case(
        "a GSM8K answer without `####`",
        GSM8K,
        ["{tmp}/gsm8k/test.jsonl line 1", "####"],
        gsm8k_files([json.dumps({"question": "Q?", "answer": "5"})]),
    ),
    Case(
        "a GSM8K answer with an empty `####` line",
        GSM8K,
        ["{tmp}/gsm8k/test.jsonl line 1", "line is empty"],
        gsm8k_files([json.dumps({"question": "Q?", "answer": "5\n#### "})]),
    ),
    Case(
        "a GSM8K line with an empty question",
        GSM8K,
        ["{tmp}/gsm8k/test.jsonl line 1", "the question is empty"],
        gsm8k_files([json.dumps({"question": " ", "answer": "#### 5"})]),
    ),
    Case(
        "`task=svamp task.data_path=/nowhere.json`",
        ["task=svamp", "task.data_path={tmp}/nowhere.json"],
        ["{tmp}/nowhere.json", "task.data_path"],
    ),
    Case(
        "a SVAMP `task.data_path` that is a directory",
        SVAMP,
        ["{tmp}/svamp.json is a directory"],
        {"svamp.json/README": "x\n"},
    ),
    Case(
        "a SVAMP file with bytes that are not UTF-8",
        SVAMP,
        ["{tmp}/svamp.json line 2", "not UTF-8"],
        {"svamp.json": b'[\n{"Body": "Ren\xe9e"}]'},
    ),
    Case(
        "a SVAMP file that is not JSON",
        SVAMP,
        ["{tmp}/svamp.json line 1", "invalid JSON"],
        {"svamp.json": '[{"Body": "x", '},
    ),
    Case(
        "a SVAMP file that is not a list",
        SVAMP,
        ["{tmp}/svamp.json: expected a JSON list"],
        {"svamp.json": json.dumps(SVAMP_ROW)},
    ),
    Case(
        "a SVAMP entry without `Equation`",
        SVAMP,
        ["{tmp}/svamp.json entry 0", "keys Body, Question, Equation"],
        svamp_file({k: v for k, v in SVAMP_ROW.items() if k != "Equation"}, SVAMP_ROW),
    ),
    Case(
        "a SVAMP `Equation` that is not arithmetic",
        SVAMP,
        ["{tmp}/svamp.json entry 0", "cannot evaluate Equation"],
        svamp_file({**SVAMP_ROW, "Equation": "import os"}, SVAMP_ROW),
    ),
    Case(
        "a SVAMP `Answer` that is not a number",
        SVAMP,
        ["{tmp}/svamp.json entry 1", "Answer 'two' is not a number"],
        svamp_file(SVAMP_ROW, {**SVAMP_ROW, "Answer": "two"}),
    ),
    Case(
        "`task.n_test_split=2` (SVAMP file of 2 entries)",
        [*SVAMP, "task.n_test_split=2"],
        ["task.n_test_split=2 must be in [1, 2)"],
        svamp_file(SVAMP_ROW, SVAMP_ROW),
    ),
    Case(
        "every SVAMP test entry contradicts its `Equation` (all are skipped)",
        [*SVAMP, "task.n_train=null"],
        ["task svamp has no test problems"],
        svamp_file(SVAMP_ROW, {**SVAMP_ROW, "Answer": 3.0}),
    ),
    Case(
        "`task.size_train=4` (less than `task.n_train=8`)",
        ["task.size_train=4"],
        ["task.n_train=8, but task arith has only 4 train problems"],
    ),
    Case(
        "`task.operations=- task.min_steps=2 task.max_number=1` (no such problem)",
        ["task.operations=-", "task.min_steps=2", "task.max_number=1"],
        ["no arith problem with 2..2 steps of '-'"],
    ),
    Case(
        "`task.max_number=1 task.max_steps=1 task.operations=+ task.size_test=2000` (every question is a test one)",
        [
            "task.max_number=1",
            "task.min_steps=1",
            "task.max_steps=1",
            "task.operations=+",
            "task.size_test=2000",
            "task.size_train=8",
        ],
        ["only 0 of 8 arith train problems avoid the test questions"],
    ),
    # The model loaders' checks (models/loading.py).
    Case(
        "`model.source=local model.path=/nowhere`",
        ["model.source=local", "model.path={tmp}/no_model"],
        ["{tmp}/no_model", "model.path"],
    ),
    Case(
        "`model.source=local` and a file",
        ["model.source=local", "model.path={tmp}/a_file"],
        ["{tmp}/a_file' is not a directory (model.source=local"],
        A_FILE,
    ),  # fmt: skip
    Case(
        "`model.source=local` and a directory that is not a model",
        ["model.source=local", "model.path={tmp}/empty"],
        ["{tmp}/empty", "no config.json"],
        {"empty/README": "not a model\n"},
    ),
    Case(
        "`model.source=gguf model.path=/nowhere.gguf`",
        ["model.source=gguf", "model.path={tmp}/nowhere.gguf"],
        ["{tmp}/nowhere.gguf", "model.path"],
    ),
    Case(
        "`model.source=gguf` and a file not named `.gguf`",
        ["model.source=gguf", "model.path={tmp}/a_file"],
        ["{tmp}/a_file' is not a .gguf file"],
        A_FILE,
    ),  # fmt: skip
    Case(
        "`model.source=gguf` and a `.gguf` file that is not GGUF",
        ["model.source=gguf", "model.path={tmp}/m.gguf"],
        ["{tmp}/m.gguf' is not a GGUF file"],
        {"m.gguf": "version https://git-lfs.github.com/spec/v1\n"},
    ),
    # Directories that cannot be written.
    Case(
        "`cache_dir` that cannot be created (under a file)",
        ["cache_dir={tmp}/a_file/cache"],
        ["{tmp}/a_file/cache", "cache_dir"],
        A_FILE,
    ),
    Case(
        "an output directory that cannot be created (`hydra.run.dir` under a file)",
        ["hydra.run.dir={tmp}/a_file/out"],
        ["{tmp}/a_file/out", "hydra.run.dir"],
        A_FILE,
    ),
    Case(
        "the default output directory cannot be created (a file named `outputs` in the working directory)",
        [],
        ["cannot create the output directory outputs", "{tmp}/outputs is not a directory", "hydra.run.dir"],
        {"outputs": "a file, not a directory\n"},
        own_run_dir=False,
    ),
]


def start_forked(args: list[str], cwd: Path, env: dict[str, str]) -> int:
    """Start `python main.py *args` in ``cwd`` as a forked child of this (already imported) interpreter, its output
    going to ``cwd/output.txt``; return the child's pid."""
    pid = os.fork()
    if pid == 0:  # the child: behave exactly like `python main.py ...` typed in ``cwd``
        code = 1
        try:
            fd = os.open(cwd / "output.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the child exits below)
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            os.chdir(cwd)
            os.environ.update({"HF_HUB_OFFLINE": "1", "REASONING_RL_THREADS": "1", **env})
            import torch

            torch.set_num_threads(1)  # no OpenMP thread pool in a forked child
            from hydra.core.global_hydra import GlobalHydra

            GlobalHydra.instance().clear()  # a test before this one may have composed configs in the parent
            sys.argv = [str(ROOT / "main.py"), *args]
            runpy.run_path(str(ROOT / "main.py"), run_name="__main__")
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        except BaseException:
            traceback.print_exc()  # what the interpreter prints for an uncaught exception
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def wait_any(deadlines: dict[int, float]) -> tuple[int, int]:
    """Wait until one of the forked children (pid -> deadline) exits: its pid and exit status. A child past its
    deadline is killed and the test fails: a case hangs only if something is badly wrong, and must not hang CI."""
    while True:
        for pid, deadline in deadlines.items():
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return pid, os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"a case (pid {pid}) did not finish in {CASE_TIMEOUT_S} s")
        time.sleep(0.01)


def message(output: str, tmp: Path) -> str:
    """The error as the table shows it: the output without log lines, progress bars and Hydra's hint, with the paths
    that differ between machines (the case's directory, the project, a run key) replaced by placeholders."""
    output = re.sub(
        r"runs/[0-9a-f]{16}", "runs/<key>", output.replace(str(tmp), "<tmp>").replace(str(ROOT), "<project>")
    )
    lines = [line.strip() for line in output.splitlines()]
    # log lines ("[2026-...][module][INFO] - ..."), progress bars of work done before the error
    lines = [line for line in lines if line and not line.startswith("[") and "%|" not in line]
    return " ".join(lines).removeprefix("Error: ")


def run_fresh(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """`python main.py *args` in a new interpreter: exit status and output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "REASONING_RL_THREADS": "1", **env}
    fresh = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600
    )
    return fresh.returncode, fresh.stdout + fresh.stderr


def case_args(case: Case, tmp: Path) -> list[str]:
    args = [*BASE, *(o.format(tmp=tmp) for o in case.overrides)]
    if case.own_run_dir and not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={tmp / 'out'}")
    if not any(a.startswith("cache_dir=") for a in args):
        args.append(f"cache_dir={tmp / 'cache'}")
    return args


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[int, str, Path]]:
    """Every case's exit status, output and directory. Up to PARALLEL cases run at once, each in its own directory."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401 (imported once here, as reasoning_rl.launch.app and torch
    import torch  # are, so that every forked case starts warm: the SQLite store alone takes ~3 s to import)

    import reasoning_rl.launch.app  # noqa: F401

    results: dict[str, tuple[int, str, Path]] = {}
    running: dict[int, tuple[Case, Path, ExitStack]] = {}
    deadlines: dict[int, float] = {}

    def finish_one() -> None:
        pid, code = wait_any(deadlines)
        case, tmp, around = running.pop(pid)
        del deadlines[pid]
        around.close()
        results[case.label] = (code, (tmp / "output.txt").read_text(), tmp)

    for index, case in enumerate(CASES):
        tmp = tmp_path_factory.mktemp(f"case{index}")
        for name, content in case.files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        args = case_args(case, tmp)
        # A forked child shares the CUDA state of this process, which CUDA_VISIBLE_DEVICES set in the child cannot
        # change: where torch has CUDA, a case that sets the variable runs in a fresh interpreter.
        if "CUDA_VISIBLE_DEVICES" in case.env and torch.backends.cuda.is_built():
            results[case.label] = (*run_fresh(args, tmp, case.env), tmp)
            continue
        if len(running) == PARALLEL:
            finish_one()
        around = ExitStack()
        if case.around is not None:
            around.enter_context(case.around(tmp, args))
        pid = start_forked(args, tmp, case.env)
        running[pid], deadlines[pid] = (case, tmp, around), time.monotonic() + CASE_TIMEOUT_S
    while running:
        finish_one()
    return results


def test_every_case_has_its_own_label():
    assert len({case.label for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_bad_input_gets_one_clear_message(outcomes, case):
    code, output, tmp = outcomes[case.label]
    assert code == EXIT_USER_ERROR, output
    assert "Traceback" not in output, output
    for fragment in case.fragments:
        assert fragment.format(tmp=tmp) in output, output
    assert len(message(output, tmp)) < 600, output  # a paragraph, not a wall


def errors_doc(outcomes) -> str:
    rows = ["| input | exit status | message |", "|---|---|---|"]
    for case in CASES:
        code, output, tmp = outcomes[case.label]
        text = message(output, tmp).replace("|", "\\|")  # a "|" inside a cell would end it
        rows.append(f"| {case.label} | {code} | {text} |")
    return (
        "# Bad input and the message it gets\n\n"
        "Written by `REASONING_RL_WRITE_DOCS=1 pytest tests/test_bad_input.py`, which runs every case through "
        "`main.py` (with cheap `model=tiny task=arith` settings under it; `<tmp>` is the case's directory). Each "
        "exits with the status shown and prints no traceback; a plain run of the test checks that this file is "
        "current.\n\n" + "\n".join(rows) + "\n"
    )


def test_errors_doc_is_current(outcomes):
    doc = errors_doc(outcomes)
    if WRITE_DOCS:
        ERRORS_DOC.parent.mkdir(exist_ok=True)
        ERRORS_DOC.write_text(doc)
    current = ERRORS_DOC.read_text() if ERRORS_DOC.is_file() else ""
    assert current == doc, (
        f"{ERRORS_DOC} does not match the messages the cases get now; rewrite it with "
        "`REASONING_RL_WRITE_DOCS=1 pytest tests/test_bad_input.py`, review the diff and commit it."
    )


def test_a_fresh_interpreter_gets_the_same_message(outcomes):
    """The forked runs behave like `python main.py`: one case again in a new process, same status and message."""
    case = next(c for c in CASES if c.label == "`model.source=local model.path=/nowhere`")
    code, output, tmp = outcomes[case.label]
    fresh_code, fresh_output = run_fresh(case_args(case, tmp), tmp, case.env)
    assert fresh_code == code
    assert message(fresh_output, tmp) == message(output, tmp)


def test_messages_name_no_internal_frames(outcomes):
    """No message leaks a source location of ours (a sign of an exception escaping as a traceback fragment)."""
    for label, (_, output, _) in outcomes.items():
        assert not re.search(r"File \".*reasoning_rl", output), label
