"""The real CLI at the tiny scale: SFT on `arith` beats the untrained model, and MLflow holds everything.

Two real `python main.py` processes share one SQLite MLflow store. The SFT run must score clearly above the
untrained (randomly initialised, unprompted) model on the same held-out problems.
"""

from __future__ import annotations

import json
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


def run_main(overrides: list[str], tracking_uri: str, out: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *overrides, f"hydra.run.dir={out}", f"cache_dir={cache}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stage_cache):
    import mlflow

    tmp = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cache = stage_cache  # the SFT stage computed here (or by test_ppo.py) is reused by every later run
    run_main([*COMMON, "init=sft", f"init.max_steps={SFT_STEPS}"], uri, tmp / "sft", cache)
    run_main([*COMMON, "init=pretrained", "init.n_shots=0"], uri, tmp / "untrained", cache)
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


# Expert Iteration from the SFT init above (its stage is reused), with an ORM trained for rerank@K. Calibrated on
# seeds 0, 1, 2 (the closing note of issue 3): maj@1 went 0.60 -> 0.89, 0.655 -> 0.71 and 0.48 -> 0.62 over two
# rounds; the ORM's held-out AUC was 0.60, 0.62 and 0.66. At this scale the ORM learns which questions are hard but
# not which of one question's samples is right, so rerank@4 stays below greedy maj@1: we check the reranking itself,
# not that it wins. Exploration samples at temperature 0.7: at 1.0 the tiny model's "correct" samples are often
# garbled (a broken annotation, the right final number), and training on them cost accuracy in round 1.
EI_WITH_ORM = [
    *[o for o in COMMON if not o.startswith(("algo=", "task.n_test="))],
    "init=sft", f"init.max_steps={SFT_STEPS}", "task.n_test=200",  # the SFT stage keys on the training set only
    "algo=ei", "algo.rounds=2", "algo.n_questions=1000", "algo.max_new_tokens=48",
    "algo.reinit_each_round=false", "algo.lr=1e-3", "algo.epochs=1", "algo.temperature=0.7",
    "orm.rerank=true", "orm.n_questions=1000", "orm.max_new_tokens=48",
]  # fmt: skip
EI_MARGIN = 0.04  # the smallest calibrated gain was 0.055
AUC_FLOOR = 0.55


def history(client, run, name: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}


@pytest.mark.slow
def test_expert_iteration_beats_its_sft_init_and_the_orm_reranks(runs, tmp_path, stage_cache):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_main(EI_WITH_ORM, uri, tmp_path / "ei", stage_cache)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("reasoning-rl").experiment_id])
    assert run.data.tags["algo"] == "ei" and run.info.status == "FINISHED"
    assert run.data.tags["stage/sft"].startswith("reused")  # computed by the `runs` fixture

    # the accuracy-vs-round curve: the init at step 0, then every round
    maj1 = history(client, run, "eval/maj_at_1")
    rerank = history(client, run, "eval/rerank_at_k")
    auc = run.data.metrics["train/orm_heldout_auc"]
    print(f"maj@1 by round {maj1}, rerank@4 {rerank}, ORM held-out AUC {auc:.3f}")
    assert sorted(maj1) == [0, 1, 2] and sorted(rerank) == [0, 1, 2]
    assert maj1[2] >= maj1[0] + EI_MARGIN
    assert auc >= AUC_FLOOR

    # rerank@K: each problem's pick is the answer of its highest-scoring sample (the earliest among ties)
    samples = client.download_artifacts(run.info.run_id, "eval/samples.jsonl", str(tmp_path))
    records = [json.loads(line) for line in Path(samples).read_text().splitlines()]
    picks_correct = []
    for record in records:
        best = max(range(len(record["samples"])), key=lambda i: (record["samples"][i]["score"], -i))
        assert record["rerank_answer"] == record["samples"][best]["answer"]
        picks_correct.append(record["samples"][best]["correct"])
    assert rerank[2] == pytest.approx(sum(picks_correct) / len(records))

    # per-round bookkeeping
    assert history(client, run, "train/ei_samples_drawn") == {1: 4000.0, 2: 8000.0}  # 1000 questions x K=4
    sizes = history(client, run, "train/ei_dataset_size")
    assert sizes[2] >= sizes[1] > 0  # D_2 = R_2 ∪ D_1 never shrinks
    assert 0 < history(client, run, "train/ei_fraction_correct")[1] <= 1
    assert history(client, run, "train/ei_kept_precision")[1] == 1.0  # reward=sparse keeps correct samples only
    assert len(history(client, run, "train/ei_loss")) >= 2


@pytest.mark.slow
def test_orm_ei_twice_reuses_the_sft_and_orm_stages(runs, tmp_path, stage_cache):
    """reward=orm: ORM EI. Run twice, the second run computes no stage; the ORM is the one trained above."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    small_ei = ["reward=orm", "algo.rounds=1", "algo.n_questions=100", "algo.max_steps=20", "eval.k=2"]
    overrides = [*[o for o in EI_WITH_ORM if not o.startswith(("algo.rounds", "algo.n_questions", "eval.k"))],
                 *small_ei]  # fmt: skip
    run_main(overrides, uri, tmp_path / "first", stage_cache)
    # resume=false: the same config again would otherwise be reported as finished (checkpointing.py), not rerun
    run_main([*overrides, "resume=false"], uri, tmp_path / "second", stage_cache)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    first, second = client.search_runs(
        [client.get_experiment_by_name("reasoning-rl").experiment_id], order_by=["attributes.start_time ASC"]
    )
    for name in ("sft", "orm_samples", "orm"):
        assert second.data.tags[f"stage/{name}"].startswith("reused"), name
        assert second.data.tags[f"stage/{name}"].split()[1] == first.data.tags[f"stage/{name}"].split()[1]
    assert second.data.metrics["eval/maj_at_1"] == first.data.metrics["eval/maj_at_1"]  # same ORM, same seed
    kept = history(client, second, "train/ei_fraction_kept")[1]
    assert 0 <= kept <= 1 and "eval/rerank_at_k" in second.data.metrics


@pytest.mark.slow
@pytest.mark.parametrize("reward", ["sparse", "orm"])
def test_rcrl_runs_end_to_end_from_the_ei_stage(runs, tmp_path, stage_cache, reward):
    """RCRL labels steps by rollouts (sparse) or by the ORM (orm: "ORM RCRL", reusing the ORM trained above)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        *[o for o in COMMON if o != "algo=none"], "init=sft", f"init.max_steps={SFT_STEPS}", "task.n_test=50",
        "eval.k=2", f"reward={reward}", "orm.n_questions=1000", "orm.max_new_tokens=48",
        "algo=rcrl", "algo.ei.rounds=1", "algo.ei.n_questions=200", "algo.ei.max_new_tokens=48",
        "algo.ei.max_steps=40", "algo.n_questions=100", "algo.num_solutions=2", "algo.num_rollouts=2",
        "algo.max_new_tokens=48", "algo.max_steps=40",
    ]  # fmt: skip
    run_main(overrides, uri, tmp_path / "rcrl", stage_cache)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("reasoning-rl").experiment_id])
    metrics = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["stage/ei_policy"].startswith("computed")
    assert 0 < metrics["train/rcrl_steps_labelled"] and 0 <= metrics["train/rcrl_fraction_good"] <= 1
    assert "train/rcrl_loss" in metrics and "eval/maj_at_1" in metrics
    if reward == "orm":  # the ORM labels the steps: no rollouts; and it reranks
        assert metrics["train/rcrl_rollouts"] == 0 and "eval/rerank_at_k" in metrics
        assert run.data.tags["stage/orm"].startswith("reused")
    else:
        assert metrics["train/rcrl_rollouts"] > 0 and "eval/rerank_at_k" not in metrics
    samples = client.download_artifacts(run.info.run_id, "eval/samples.jsonl", str(tmp_path))
    assert "[GOOD]" not in Path(samples).read_text()  # goal tokens are special: dropped from decoded samples


@pytest.mark.slow
def test_init_baselines_sweep_runs_both_rows(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, str(ROOT / "main.py"), "-m", "--config-dir", str(ROOT / "sweeps"),
        "--config-name", "init_baselines", "model=tiny", "task=arith", "task.n_train=64", "task.n_test=10",
        "eval.k=2", "eval.max_new_tokens=48", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    found = client.search_runs([client.get_experiment_by_name("reasoning-rl").experiment_id])
    (parent,) = [r for r in found if r.data.tags.get("sweep") == "parent"]  # the multirun's parent (sweep.py)
    runs = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["init"] for r in runs) == ["pretrained", "sft"]
    assert parent.data.tags["sweep/axes"] == "init" and all(r.data.tags["sweep/job"] in ("0", "1") for r in runs)
    assert all(r.info.status == "FINISHED" and "eval/maj_at_1" in r.data.metrics for r in runs)
