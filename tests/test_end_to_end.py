"""The real CLI at the tiny scale: SFT on `arith` beats the untrained model, and MLflow holds everything.

Two real `python main.py` processes share one SQLite MLflow store. The SFT run must score clearly above the
untrained (randomly initialised, unprompted) model on the same held-out problems.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One-operation problems with small numbers: the 0.9M-parameter character model learns them in 300 steps of 16
# (~90 s on 2 cores; greedy accuracy ~0.6 against ~0 untrained).
COMMON = [
    "model=tiny",
    "task=arith",
    "algo=none",
    "task.min_steps=1",
    "task.max_steps=1",
    "task.max_number=9",
    "task.n_train=2000",
    "task.n_test=100",
    "eval.k=4",
    "eval.max_new_tokens=48",
    "seed=0",
]
SFT_STEPS = 300


def run_main(overrides: list[str], tracking_uri: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *overrides, f"hydra.run.dir={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import mlflow

    tmp = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    run_main([*COMMON, "init=sft", f"init.max_steps={SFT_STEPS}"], uri, tmp / "sft")
    run_main([*COMMON, "init=pretrained", "init.n_shots=0"], uri, tmp / "untrained")
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("reasoning-rl")
    found = {r.data.tags["init"]: r for r in client.search_runs([experiment.experiment_id])}
    return client, found, tmp


@pytest.mark.slow
def test_sft_beats_the_untrained_model(runs):
    _, found, _ = runs
    sft, untrained = found["sft"].data.metrics, found["pretrained"].data.metrics
    print(f"maj@1 sft={sft['eval/maj_at_1']:.2f} untrained={untrained['eval/maj_at_1']:.2f}")
    assert sft["eval/maj_at_1"] >= untrained["eval/maj_at_1"] + 0.25
    assert sft["eval/pass_at_k"] >= sft["eval/maj_at_1"] - 0.05  # K samples rarely all miss what greedy gets


@pytest.mark.slow
def test_mlflow_run_holds_metrics_params_tags_and_artifacts(runs):
    client, found, tmp = runs
    run = found["sft"]
    for name in (
        "eval/maj_at_1",
        "eval/maj_at_k",
        "eval/pass_at_k",
        "eval/pass_at_1_unbiased",
        "eval/pass_at_4_unbiased",
        "eval/mean_completion_tokens",
        "train/sft_loss",
    ):
        assert name in run.data.metrics, name
    assert 0 <= run.data.metrics["eval/maj_at_1"] <= 1
    assert run.data.params["eval.k"] == "4"
    assert run.data.params["model.name"] == "tiny"
    assert run.data.params["model.source"] == "tiny"  # enums logged by value, not as "ModelSource.tiny"
    assert {k: run.data.tags[k] for k in ("algo", "reward", "init", "model", "task")} == {
        "algo": "none",
        "reward": "sparse",
        "init": "sft",
        "model": "tiny",
        "task": "arith",
    }
    assert run.info.status == "FINISHED"
    loss_history = client.get_metric_history(run.info.run_id, "train/sft_loss")
    assert len(loss_history) >= 10 and loss_history[-1].value < loss_history[0].value
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "eval", "checkpoints"} <= artifacts
    overrides = client.download_artifacts(run.info.run_id, "config/overrides.txt", str(tmp))
    assert "init=sft" in Path(overrides).read_text()
    samples = client.download_artifacts(run.info.run_id, "eval/samples.jsonl", str(tmp))
    assert len(Path(samples).read_text().splitlines()) == 100


@pytest.mark.slow
def test_notebook_tabulates_the_runs(runs, monkeypatch):
    import nbclient
    import nbformat

    _, _, tmp = runs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    notebook = nbformat.read(ROOT / "notebooks" / "runs_table.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(ROOT)}}).execute()
    printed = "".join(o["text"] for o in notebook.cells[1].outputs if o.get("name") == "stdout")
    assert "2 finished runs" in printed  # (stderr carries import warnings, e.g. tqdm's about ipywidgets)
    (table_output,) = [o for o in notebook.cells[2].outputs if o["output_type"] == "execute_result"]
    table = table_output["data"]["text/plain"]
    assert "sft" in table and "pretrained" in table and "maj@1" in table


@pytest.mark.slow
def test_expert_iteration_runs_rounds_and_logs_the_curve(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        *[o for o in COMMON if not o.startswith(("algo=", "task.n_test=", "eval.k="))],
        "algo=ei", "init=sft", "init.max_steps=150", "task.n_test=50", "eval.k=2",
        "algo.rounds=2", "algo.num_samples=2", "algo.n_questions=100", "algo.max_steps=40", "algo.max_new_tokens=48",
    ]  # fmt: skip
    run_main(overrides, uri, tmp_path / "ei")
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("reasoning-rl").experiment_id])
    assert run.data.tags["algo"] == "ei" and run.info.status == "FINISHED"

    def history(name: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}

    assert sorted(history("eval/maj_at_1")) == [0, 1, 2]  # the init, then after each round
    assert history("train/ei_samples_drawn") == {1: 200.0, 2: 400.0}  # 100 questions x K=2 per round
    sizes = history("train/ei_dataset_size")
    assert sizes[2] >= sizes[1] > 0  # D_2 = R_2 ∪ D_1 never shrinks
    assert 0 < history("train/ei_fraction_correct")[1] <= 1
    assert len(history("train/ei_loss")) >= 2


@pytest.mark.slow
def test_init_baselines_sweep_runs_both_rows(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, str(ROOT / "main.py"), "-m", "--config-dir", str(ROOT / "sweeps"),
        "--config-name", "init_baselines", "model=tiny", "task=arith", "task.n_train=64", "task.n_test=10",
        "eval.k=2", "eval.max_new_tokens=48", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("reasoning-rl").experiment_id])
    assert sorted(r.data.tags["init"] for r in runs) == ["pretrained", "sft"]
    assert all(r.info.status == "FINISHED" and "eval/maj_at_1" in r.data.metrics for r in runs)
