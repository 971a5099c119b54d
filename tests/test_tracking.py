"""The MLflow experiment opens on its runs: it is created tagged mlflow.experimentKind=custom_model_development
(MLflow 3 otherwise opens it on the GenAI traces overview, empty for training runs). Real MLflow, a SQLite store."""

from __future__ import annotations

from reasoning_rl.run.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MLflowTracker, experiment_id


def test_the_experiment_a_run_creates_is_tagged_to_open_on_its_runs(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MLflowTracker(uri, "kind-test", "run-1", tags={"algo": "none"})
    tracker.log_metrics({"eval/maj_at_1": 0.5})
    tracker.finish()
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("kind-test")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development" == EXPERIMENT_KIND
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == tracker.run_id
    # a second run joins the same experiment, which keeps its one tag
    MLflowTracker(uri, "kind-test", "run-2", tags={}).finish()
    assert len(client.search_runs([experiment.experiment_id])) == 2
    assert client.get_experiment_by_name("kind-test").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_an_experiment_without_a_kind_gets_it_and_a_chosen_kind_stays(tmp_path):
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    old = client.create_experiment("made-before-the-tag")  # as MLflow's set_experiment made ours before
    assert experiment_id(client, "made-before-the-tag") == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert experiment_id(client, "chosen") == chosen
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_a_sweeps_parent_run_creates_the_experiment_tagged_too(tmp_path):
    import mlflow
    from omegaconf import OmegaConf

    from reasoning_rl.launch.sweep import MLflowSweepCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # the fields of the launching process's config the callback reads (a multirun's, with its sweep file's axes)
    config = OmegaConf.create({
        "logger": {"name": "mlflow", "tracking_uri": uri, "experiment": "sweep-kind"},
        "hydra": {"sweep": {"dir": str(tmp_path / "multirun")}, "sweeper": {"params": {"row": "sft,ei"}},
                  "overrides": {"task": ["model=tiny"]}, "job": {"config_name": "sft_table"},
                  "launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}},
    })  # fmt: skip
    callback = MLflowSweepCallback()
    callback.on_multirun_start(config)
    callback.on_multirun_end(config)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("sweep-kind")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    (parent,) = client.search_runs([experiment.experiment_id])
    assert parent.data.tags["sweep"] == "parent" and parent.data.tags["sweep/axes"] == "row"
