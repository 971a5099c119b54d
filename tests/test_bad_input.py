"""Every bad input we know of, through the real command line: one clear message, exit status != 0, no traceback.

The cases run `main.py` in forked processes (the real Hydra entry point, a real exit status and real stdout/stderr,
without paying Python's and torch's start-up for each of the ~20 cases); one case also runs as a fresh interpreter to
show the two agree. The messages they get are the table in ``docs/errors.md``: this test writes it, and fails when
the committed file is out of date (commit the rewritten one).
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
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ERRORS_DOC = ROOT / "docs" / "errors.md"
# Cheap settings under every case, so a case that gets past validation fails (or ends) in seconds.
BASE = ["model=tiny", "task=arith", "algo=none", "logger=none", "task.n_train=8", "task.n_test=2", "eval.k=1",
        "eval.max_new_tokens=8"]  # fmt: skip

GSM8K_ROW = {"question": "Ann has 2 apples and buys 3. How many?", "answer": "2+3=<<2+3=5>>5\n#### 5"}


@dataclass
class Case:
    label: str  # the input, as the table shows it
    overrides: list[str]
    fragments: list[str]  # must all appear in the output (`{tmp}` is the case's directory)
    files: dict[str, str] = field(default_factory=dict)  # files to create first, relative to {tmp}
    own_run_dir: bool = True  # False: no hydra.run.dir=..., the default (outputs/ under the working directory)


def gsm8k_files(test_lines: list[str]) -> dict[str, str]:
    return {"gsm8k/train.jsonl": json.dumps(GSM8K_ROW) + "\n", "gsm8k/test.jsonl": "\n".join(test_lines) + "\n"}


CASES = [
    Case("`algo=nope`", ["algo=nope"], ["Could not find 'algo/nope'", "Available options in 'algo'"]),
    Case("`model.lr=abc`", ["model.lr=abc"], ["model.lr=abc", "could not be converted to Float"]),
    Case("`seed=1.5`", ["seed=1.5"], ["seed=1.5", "could not be converted to Integer"]),
    Case("`device=tpu`", ["device=tpu"], ["device=tpu", "Invalid value 'tpu'"]),
    Case("`model.not_a_field=1`", ["model.not_a_field=1"], ["Key 'not_a_field' not in 'ModelConfig'"]),
    Case("`not_a_key=1`", ["not_a_key=1"], ["Could not override 'not_a_key'"]),
    Case("`+not_a_key=1`", ["+not_a_key=1"], ["unknown config key(s): not_a_key"]),
    Case("`+model.not_a_field=1`", ["+model.not_a_field=1"], ["unknown config key(s): model.not_a_field"]),
    Case("`reward=orm` (with `algo=none`)", ["reward=orm"], ["algo=none cannot use reward=orm"]),
    Case("`algo=rcrl reward=dense`", ["algo=rcrl", "reward=dense"], ["algo=rcrl cannot use reward=dense"]),
    Case("`eval.max_new_tokens=1000` (tiny: `max_seq_len=384`)", ["eval.max_new_tokens=1000"], ["model.max_seq_len"]),
    Case("`algo=ppo algo.steps=0`", ["algo=ppo", "algo.steps=0"], ["algo.steps=0 must be >= 1"]),
    Case(
        "`algo=ei reward=orm orm.n_questions=1` (no ORM can be built)",
        ["algo=ei", "reward=orm", "orm.n_questions=1", "orm.num_samples=1", "orm.max_new_tokens=8", "init.n_shots=0"],
        ["the ORM needs samples of at least 2 questions", "orm.n_questions"],
    ),
    Case("`checkpoint_every=-1`", ["checkpoint_every=-1"], ["checkpoint_every=-1"]),
    Case("`task.operations=/`", ["task.operations=/"], ["task.operations='/'"]),
    Case(
        "`task=gsm_symbolic task.train_seed=1 task.test_seed=1`",
        ["task=gsm_symbolic", "task.train_seed=1", "task.test_seed=1"],
        ["task.train_seed and task.test_seed must differ"],
    ),
    Case(
        "a GSM8K file with a line cut short",
        ["task=gsm8k", "task.data_dir={tmp}/gsm8k"],
        ["{tmp}/gsm8k/test.jsonl line 2", "invalid JSON"],
        gsm8k_files([json.dumps(GSM8K_ROW), json.dumps(GSM8K_ROW)[:30]]),
    ),
    Case(
        "a GSM8K line without `answer`",
        ["task=gsm8k", "task.data_dir={tmp}/gsm8k"],
        ["{tmp}/gsm8k/test.jsonl line 1", "'answer'"],
        gsm8k_files([json.dumps({"question": "Q?"})]),
    ),
    Case(
        "a GSM8K answer without `####`",
        ["task=gsm8k", "task.data_dir={tmp}/gsm8k"],
        ["{tmp}/gsm8k/test.jsonl line 1", "####"],
        gsm8k_files([json.dumps({"question": "Q?", "answer": "5"})]),
    ),
    Case("`task.data_dir=/nowhere`", ["task=gsm8k", "task.data_dir={tmp}/nowhere"], ["{tmp}/nowhere", "task.data_dir"]),
    Case(
        "`task=svamp task.data_path=/nowhere.json`",
        ["task=svamp", "task.data_path={tmp}/nowhere.json"],
        ["{tmp}/nowhere.json", "task.data_path"],
    ),
    Case(
        "a SVAMP file that is not JSON",
        ["task=svamp", "task.data_path={tmp}/svamp.json"],
        ["{tmp}/svamp.json"],
        {"svamp.json": '[{"Body": "x", '},
    ),
    Case(
        "`model.source=local model.path=/nowhere`",
        ["model.source=local", "model.path={tmp}/no_model"],
        ["{tmp}/no_model", "model.path"],
    ),
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
        "`cache_dir` that cannot be created (under a file)",
        ["cache_dir={tmp}/a_file/cache"],
        ["{tmp}/a_file/cache", "cache_dir"],
        {"a_file": "a file, not a directory\n"},
    ),
    Case(
        "an output directory that cannot be created (`hydra.run.dir` under a file)",
        ["hydra.run.dir={tmp}/a_file/out"],
        ["{tmp}/a_file/out", "hydra.run.dir"],
        {"a_file": "a file, not a directory\n"},
    ),
    Case(
        "the default output directory cannot be created (a file named `outputs` in the working directory)",
        [],
        ["cannot create the output directory outputs", "{tmp}/outputs is not a directory", "hydra.run.dir"],
        {"outputs": "a file, not a directory\n"},
        own_run_dir=False,
    ),
]


def run_forked(args: list[str], cwd: Path) -> tuple[int, str]:
    """`python main.py *args` in a forked child of this (already imported) interpreter: exit status and output."""
    log = cwd / "output.txt"
    pid = os.fork()
    if pid == 0:  # the child: behave exactly like `python main.py ...` typed in ``cwd``
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the child exits below)
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            os.chdir(cwd)
            os.environ.update({"HF_HUB_OFFLINE": "1", "REASONING_RL_THREADS": "1"})
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
    deadline = time.monotonic() + 300  # a case hangs only if something is badly wrong: fail it, do not hang CI
    while (waited := os.waitpid(pid, os.WNOHANG)) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"main.py {' '.join(args)} did not finish in 300 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)
    return os.waitstatus_to_exitcode(waited[1]), log.read_text()


def message(output: str, tmp: Path) -> str:
    """The error as the table shows it: the output without log lines, progress bars and Hydra's hint, with the paths
    that differ between machines (the case's directory, the project, a run key) replaced by placeholders."""
    output = re.sub(
        r"runs/[0-9a-f]{16}", "runs/<key>", output.replace(str(tmp), "<tmp>").replace(str(ROOT), "<project>")
    )
    lines = [line.strip() for line in output.splitlines()]
    noise = ("HYDRA_FULL_ERROR", "%|")  # Hydra's stack-trace hint, progress bars of work done before the error
    lines = [line for line in lines if line and not line.startswith("[") and not any(n in line for n in noise)]
    return " ".join(lines).removeprefix("Error: ")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[int, str, Path]]:
    import reasoning_rl.app  # noqa: F401 (imported once here, so every forked case starts warm)

    results = {}
    for index, case in enumerate(CASES):
        tmp = tmp_path_factory.mktemp(f"case{index}")
        for name, text in case.files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
        args = [*BASE, *(o.format(tmp=tmp) for o in case.overrides)]
        if case.own_run_dir and not any(a.startswith("hydra.run.dir=") for a in args):
            args.append(f"hydra.run.dir={tmp / 'out'}")
        if not any(a.startswith("cache_dir=") for a in args):
            args.append(f"cache_dir={tmp / 'cache'}")
        code, output = run_forked(args, tmp)
        results[case.label] = (code, output, tmp)
    return results


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_bad_input_gets_one_clear_message(outcomes, case):
    code, output, tmp = outcomes[case.label]
    assert code != 0, output
    assert "Traceback" not in output, output
    for fragment in case.fragments:
        assert fragment.format(tmp=tmp) in output, output
    assert len(message(output, tmp)) < 600, output  # a paragraph, not a wall


def test_errors_doc_is_current(outcomes):
    rows = ["| input | exit status | message |", "|---|---|---|"]
    for case in CASES:
        code, output, tmp = outcomes[case.label]
        text = message(output, tmp).replace("|", "\\|")  # a "|" inside a cell would end it
        rows.append(f"| {case.label} | {code} | {text} |")
    doc = (
        "# Bad input and the message it gets\n\n"
        "Written by `tests/test_bad_input.py`, which runs every case through `main.py` (with cheap `model=tiny "
        "task=arith` settings under it; `<tmp>` is the case's directory). Each exits with the status shown and "
        "prints no traceback.\n\n" + "\n".join(rows) + "\n"
    )
    if not ERRORS_DOC.is_file() or ERRORS_DOC.read_text() != doc:
        ERRORS_DOC.parent.mkdir(exist_ok=True)
        ERRORS_DOC.write_text(doc)
        pytest.fail(f"{ERRORS_DOC} was out of date and has been rewritten; review and commit it.")


def test_a_fresh_interpreter_gets_the_same_message(outcomes, tmp_path):
    """The forked runs behave like `python main.py`: one case again in a new process, same status and message."""
    case = next(c for c in CASES if c.label == "`model.source=local model.path=/nowhere`")
    code, output, tmp = outcomes[case.label]
    args = [*BASE, *(o.format(tmp=tmp) for o in case.overrides), f"hydra.run.dir={tmp / 'out'}"]
    args.append(f"cache_dir={tmp / 'cache'}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "REASONING_RL_THREADS": "1"}
    fresh = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args], cwd=tmp, capture_output=True, text=True, env=env, timeout=600
    )
    assert fresh.returncode == code
    assert message(fresh.stdout + fresh.stderr, tmp) == message(output, tmp)


def test_messages_name_no_internal_frames(outcomes):
    """No message leaks a source location of ours (a sign of an exception escaping as a traceback fragment)."""
    for label, (_, output, _) in outcomes.items():
        assert not re.search(r"File \".*reasoning_rl", output), label
