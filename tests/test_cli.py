"""The real command line: bad input gets one clear paragraph and exit status != 0, never a traceback wall."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GSM8K_DIR = ROOT.parent / "shared" / "data" / "gsm8k"


def run_main(*overrides: str, cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *overrides, f"hydra.run.dir={cwd / 'out'}"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in output, output


def test_unknown_algo_names_the_valid_choices(tmp_path):
    result = run_main("algo=nope", cwd=tmp_path)
    assert_clean_failure(result, "Could not find 'algo/nope'", "Available options in 'algo'", "none")


def test_wrongly_typed_value_says_which_key_and_type(tmp_path):
    result = run_main("model.lr=abc", cwd=tmp_path)
    assert_clean_failure(result, "model.lr=abc", "could not be converted to Float")


def test_impossible_combination_is_refused_before_work(tmp_path):
    result = run_main("reward=orm", "logger=none", cwd=tmp_path)
    assert_clean_failure(result, "algo=none cannot use reward=orm")
    assert result.returncode == 2


@pytest.mark.skipif(not GSM8K_DIR.exists(), reason="needs ../shared/data/gsm8k")
def test_broken_gsm8k_line_names_file_and_line(tmp_path):
    data = tmp_path / "gsm8k"
    data.mkdir()
    shutil.copy(GSM8K_DIR / "train.jsonl", data / "train.jsonl")
    lines = (GSM8K_DIR / "test.jsonl").read_text().splitlines()
    lines[6] = lines[6][:40]  # line 7 is cut in the middle of its JSON
    (data / "test.jsonl").write_text("\n".join(lines) + "\n")
    result = run_main("model=tiny", "logger=none", f"task.data_dir={data}", cwd=tmp_path)
    assert_clean_failure(result, str(data / "test.jsonl"), "line 7")
    assert result.returncode == 2


def test_missing_data_dir_says_how_to_fix(tmp_path):
    result = run_main("model=tiny", "logger=none", f"task.data_dir={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert_clean_failure(result, str(tmp_path / "nowhere"), "task.data_dir")


def test_missing_model_path_names_it(tmp_path):
    result = run_main(
        "model=tiny",
        "model.source=local",
        f"model.path={tmp_path / 'no_model'}",
        "logger=none",
        "task=arith",
        cwd=tmp_path,
    )
    assert_clean_failure(result, str(tmp_path / "no_model"))
