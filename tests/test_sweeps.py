"""The sweep files, the launchers' configs, MLflow's parent/child runs, the report and the notebook.

The composition tests read each sweep file's own ``hydra.sweeper.params`` and compose every job it would launch, at
every scale: a typo in a row or a scale file fails here, not an hour into a sweep. The end-to-end test runs a real
multirun through ``hydra/launcher=submitit_local`` (separate submitit processes) against a real ``mlflow server``
process on loopback, then regenerates the tables and figures from it with ``python -m reasoning_rl.report`` and
executes the notebook against the same server.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from reasoning_rl.algos.ei import EVALUATION_FIELDS
from reasoning_rl.config import ExperimentConfig, register_configs, to_experiment
from reasoning_rl.launch.sweep import sweep_axes

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ["sft_table", "pretrained_table", "sample_complexity", "ei_rounds"]
BEYOND_THE_PAPER = ["GRPO", "RLOO", "Dr. GRPO"]  # after the paper's rows, in both tables and the figure
SFT_TABLE = ["SFT", "EI", "ORM EI", "ORM RCRL", "Sparse PPO", "Dense PPO", "Sparse ORM PPO", "Dense ORM PPO",
             *BEYOND_THE_PAPER]  # fmt: skip
PRETRAINED_TABLE = ["Prompted", "EI", "ORM EI", "Sparse PPO", "Sparse ORM PPO", "Dense ORM PPO", *BEYOND_THE_PAPER]


def compose_sweep_job(sweep: str, overrides: list[str]) -> ExperimentConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "sweeps"), version_base="1.3"):
        cfg = compose(sweep, overrides=[f"hydra.searchpath=[file://{ROOT / 'conf'}]", *overrides])
    return to_experiment(cfg)


def sweep_jobs(sweep: str) -> list[list[str]]:
    """The jobs a sweep file launches: the cartesian product of its hydra.sweeper.params."""
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "sweeps"), version_base="1.3"):
        cfg = compose(sweep, overrides=[f"hydra.searchpath=[file://{ROOT / 'conf'}]"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.key_or_group}={v}" for v in (o.sweep_string_iterator() if o.is_sweep_override() else [o.value()])]
            for o in parsed]  # fmt: skip
    return [list(job) for job in itertools.product(*axes)]


# Every sweep at the tiny and smollm2_135m scales (their own scale files) and at the paper's (the options' defaults);
# the SFT table at 13b, which composes like 7b (no scale files), so the rest would only repeat it.
SCALES = [(s, m) for s in SWEEPS for m in ("tiny", "smollm2_135m", "7b")] + [("sft_table", "13b")]


@pytest.mark.parametrize("sweep,model", SCALES)
def test_every_job_of_every_sweep_composes_at_every_scale(sweep, model):
    from reasoning_rl.report import row_name

    task = ["task=arith"] if model in ("tiny", "smollm2_135m") else []  # their tables run on the synthetic task
    rows = []
    for job in sweep_jobs(sweep):
        cfg = compose_sweep_job(sweep, [f"model={model}", *task, *job])
        rows.append(row_name(cfg.algo.name, cfg.reward.name.value, cfg.init.name.value))
        if model == "tiny":  # conf/scale/tiny_<algo>.yaml sized the run for a CPU; a pretrained base, 2-step task
            assert cfg.task.n_train == 2000 and (cfg.task.min_steps, cfg.task.max_steps) == (2, 2)
            assert cfg.model.pretrain_steps == 300 and cfg.eval.max_new_tokens == cfg.orm.max_new_tokens == 64
            assert getattr(cfg.algo, "max_new_tokens", 64) == 64
            if cfg.algo.name == "rcrl":  # its labeller, the EI row's policy
                assert cfg.algo.ei.max_new_tokens == 64
            # conf/scale/init/tiny_pretrained.yaml: room for the 4-shot prompts (up to ~670 characters)
            assert cfg.model.max_seq_len == (768 if cfg.init.name.value == "pretrained" else 384)
        elif model == "smollm2_135m":  # conf/scale/smollm2_135m*.yaml: K = 16, 500 problems, equal samples drawn
            assert cfg.eval.k == 16 and cfg.task.n_train == 2000 and cfg.task.n_test == 500
            assert cfg.orm.n_questions == 300 and cfg.eval.max_new_tokens == 128
            if cfg.algo.name == "ei":  # 1,024 a round: the tables' 2 rounds draw PPO's 2,048 (the figure runs 4)
                assert cfg.algo.n_questions * cfg.algo.num_samples == 1024
            elif cfg.algo.name not in ("none", "rcrl"):
                assert cfg.algo.steps * cfg.algo.rollout_questions * cfg.algo.num_samples == 2048
        else:
            assert cfg.task.name == "gsm8k" and cfg.task.n_train is None
    expected = {"sft_table": SFT_TABLE, "pretrained_table": PRETRAINED_TABLE, "ei_rounds": ["EI", "EI"],
                "sample_complexity": ["EI", "Sparse PPO", *BEYOND_THE_PAPER]}[sweep]  # fmt: skip
    assert rows == expected


def test_the_figure_sweeps_evaluate_along_the_way():
    ppo = compose_sweep_job("sample_complexity", ["model=tiny", "task=arith", "row=sparse_ppo", "init=sft"])
    assert ppo.algo.eval_every == 2 and ppo.algo.steps == 8  # conf/curve/ppo.yaml, conf/scale/tiny_ppo.yaml
    for row in ("grpo", "rloo", "dr_grpo"):  # conf/curve/<algo>.yaml, and tiny PPO's samples drawn per step
        job = compose_sweep_job("sample_complexity", ["model=tiny", "task=arith", f"row={row}", "init=sft"])
        assert job.algo.name == row and job.algo.eval_every == 2
        assert job.algo.steps * job.algo.rollout_questions * job.algo.num_samples == 8 * 32 * 4 == (
            ppo.algo.steps * ppo.algo.rollout_questions * ppo.algo.num_samples)  # fmt: skip
    ei = compose_sweep_job("ei_rounds", ["model=7b", "row=ei", "init=pretrained"])
    assert ei.algo.rounds == 4 and ei.algo.eval_init and ei.algo.eval_every == 1
    for sweep in ("ei_rounds", "sample_complexity"):  # every round, at a scale whose table cells evaluate the last only
        job = compose_sweep_job(sweep, ["model=smollm2_135m", "task=arith", "row=ei", "init=sft"])
        assert job.algo.eval_every == 1, sweep


def test_smollm2_on_gsm8k_uses_the_pilots_sizes_and_shares_the_rcrl_labeller_with_ei():
    """conf/scale/task/smollm2_135m_gsm8k.yaml and conf/scale/init/smollm2_135m_sft.yaml; RCRL's labeller must have
    the EI row's settings, or it trains a second EI policy instead of sharing that stage."""
    cfg = compose_sweep_job("sft_table", ["model=smollm2_135m", "task=gsm8k", "row=sft", "init=sft"])
    assert (cfg.task.n_train, cfg.task.n_test, cfg.eval.k) == (2000, 500, 16)
    assert (cfg.init.epochs, cfg.init.lr) == (1, 5e-5)
    ei = compose_sweep_job("sft_table", ["model=smollm2_135m", "task=arith", "row=ei", "init=sft"]).algo
    rcrl = compose_sweep_job("sft_table", ["model=smollm2_135m", "task=arith", "row=orm_rcrl", "init=sft"]).algo
    assert {k: v for k, v in vars(rcrl.ei).items() if k not in EVALUATION_FIELDS} == {
        k: v for k, v in vars(ei).items() if k not in EVALUATION_FIELDS}  # fmt: skip
    assert ei.eval_every == 0  # a table cell evaluates its final policy only (~28 min an evaluation)


def test_a_plain_multirun_over_algo_reward_and_init_is_valid():
    """python main.py -m algo=ei,ppo reward=sparse,orm init=sft,pretrained: all eight jobs are valid configs."""
    for algo, reward, init in itertools.product(["ei", "ppo"], ["sparse", "orm"], ["sft", "pretrained"]):
        register_configs()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = to_experiment(compose("config", overrides=[f"algo={algo}", f"reward={reward}", f"init={init}"]))
        assert (cfg.algo.name, cfg.reward.name.value, cfg.init.name.value) == (algo, reward, init)


def test_the_slurm_launcher_requeues_and_reads_the_site_settings(tmp_path):
    """hydra/launcher=slurm: requeue on timeout, then conf/local/slurm.yaml (here from a directory on the search
    path, as a git-ignored file in conf/local/ would be), then the command line."""
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "slurm.yaml").write_text("partition: gpu\naccount: lab\ngpus_per_node: 8\n")
    (example,) = (ROOT / "conf" / "local").glob("slurm.yaml.example")  # the format, checked in
    assert "partition:" in example.read_text()
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        overrides = ["hydra/launcher=slurm", f"hydra.searchpath=[file://{tmp_path}]", "hydra.launcher.account=other"]
        launcher = compose("config", overrides=overrides, return_hydra_config=True).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.max_num_timeout == 3  # requeued on timeout (submitit requeues on preemption regardless)
    assert (launcher.partition, launcher.gpus_per_node, launcher.account) == ("gpu", 8, "other")
    assert "/conf/local/*.yaml" in (ROOT / ".gitignore").read_text()  # site settings stay out of git


def test_sweep_axes_are_the_overrides_that_vary():
    axes = sweep_axes(["model=tiny", "seed=0,1,2", "algo.lr=range(1,3)", "+extra=choice(a,b)"], {"row": "sft,ei"})
    assert axes == ("seed", "algo.lr", "extra", "row")
    assert sweep_axes(["model=tiny"], {"init": "sft"}) == ()  # one value: not an axis


# ------------------------------------------------------------------------- end to end: mlflow server, submitit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on loopback, with a temporary SQLite store and artifact root."""
    tmp = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "artifacts"),
        "--workers", "1",
    ]  # fmt: skip
    log = (tmp / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield uri, tmp
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


# EI from a briefly fine-tuned tiny model, two seeds: enough for a table cell with a std and an accuracy-vs-round
# curve, small enough for seconds per job. (The sweep files themselves are composed job by job above.)
TINY_EI = [
    "row=ei", "init=sft", "seed=0,1", "model=tiny", "task=arith", "task.n_train=64", "task.n_test=10",
    "init.max_steps=10", "eval.k=2", "eval.max_new_tokens=48", "algo.rounds=2", "algo.n_questions=16",
    "algo.max_steps=4", "algo.max_new_tokens=48",
]  # fmt: skip


@pytest.mark.slow
def test_submitit_sweep_logs_nested_runs_to_a_server_and_the_report_tables_them(mlflow_server, tmp_path):
    import mlflow

    uri, _ = mlflow_server
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "REASONING_RL_THREADS": "1"}
    command = [
        sys.executable, str(ROOT / "main.py"), "-m", *TINY_EI, "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", f"cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # One parent, two FINISHED children tagged with their seed; each job ran in its own submitit process.
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("reasoning-rl")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.tags["sweep/axes"] == "seed" and parent.info.status == "FINISHED"
    assert parent.data.tags["sweep/launcher"] == "LocalLauncher"
    assert sorted(r.data.tags["seed"] for r in children) == ["0", "1"]
    assert all(r.info.status == "FINISHED" and r.data.tags["row"] == "ei" for r in children)
    assert len(list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))) == 2

    # The report: python -m reasoning_rl.report, from the sweep directory (it finds the server and the parent).
    out = tmp_path / "report"
    report = subprocess.run(
        [sys.executable, "-m", "reasoning_rl.report", "--sweep-dir", str(tmp_path / "sweep"), "--out", str(out),
         "--paper"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    table = (out / "table_sft_arith.md").read_text()
    (ei_line,) = [line for line in table.splitlines() if line.startswith("| EI |")]
    cells = [c.strip() for c in ei_line.strip("|").split("|")]
    # row, maj@1 tiny, paper 7b, paper 13b, maj@K ..., rerank@K ..., pass@K ..., seeds
    assert " ± " in cells[1] and cells[2:4] == ["0.48", "0.53"] and cells[-1] == "2"
    assert cells[7] == "–"  # rerank@K: no ORM in this sweep
    assert r"\begin{tabular}" in (out / "table_sft_arith.tex").read_text()
    assert "eval/" not in (out / "runs.csv").read_text().splitlines()[0]  # columns named as in the paper
    for figure in ("sample_complexity.png", "ei_rounds.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same sweep typed again: every job finds its run finished ("Already done"), and the new sweep's report
    # still tables both (they join the new parent through their `sweeps` tag, sweep.join_sweep).
    again = subprocess.run(
        [*command[:-2], f"hydra.sweep.dir={tmp_path / 'again'}", command[-1]],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert len(list((tmp_path / "again" / ".submitit").glob("*/*_result.pkl"))) == 2
    report = subprocess.run(
        [sys.executable, "-m", "reasoning_rl.report", "--sweep-dir", str(tmp_path / "again"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    runs_again = (out / "runs.csv").read_text().splitlines()[1:]
    assert sorted(line.split(",")[0] for line in runs_again) == sorted(r.info.run_id for r in children)

    # The notebook, executed against the same server.
    import nbclient
    import nbformat

    notebook = nbformat.read(ROOT / "notebooks" / "runs_table.ipynb", as_version=4)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # the kernel inherits it
    try:
        nbclient.NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    outputs = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", ""))
                      for c in notebook.cells if c.cell_type == "code" for o in c.outputs)  # fmt: skip
    assert "2 finished runs" in outputs and "EI" in outputs and " ± " in outputs
    assert any("image/png" in o.get("data", {}) for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


def test_a_sweep_whose_job_fails_marks_its_parent_run_failed(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [
        sys.executable, str(ROOT / "main.py"), "-m", "algo=none", "model=tiny", "task=gsm8k", "seed=0,1",
        f"task.data_dir={tmp_path / 'missing'}", f"logger.tracking_uri={uri}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "does not exist" in result.stderr
    runs = mlflow.tracking.MlflowClient(tracking_uri=uri).search_runs(["1"])
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    (job,) = [r for r in runs if r.data.tags.get("sweep") != "parent"]  # the first job failed; the sweep stopped
    assert parent.info.status == "FAILED" and job.info.status == "FAILED"
    assert job.data.tags["sweeps"] == parent.info.run_id == job.data.tags["mlflow.parentRunId"]


@pytest.mark.parametrize("model", ["tiny", "7b"])
def test_orm_rcrl_labels_with_the_ei_rows_policy(model):
    """RCRL's labelling policy is the EI row's: at every scale, the `ei_policy` stage an ORM RCRL job asks for is
    the one the EI job of the same table publishes (same key), trained with the ground-truth reward."""
    from reasoning_rl.algos.ei import ei_policy_inputs
    from reasoning_rl.run.stages import stage_key

    task = ["task=arith"] if model == "tiny" else []
    ei_job = compose_sweep_job("sft_table", [f"model={model}", *task, "init=sft", "row=ei"])
    rcrl_job = compose_sweep_job("sft_table", [f"model={model}", *task, "init=sft", "row=orm_rcrl"])
    assert rcrl_job.reward.name.value == "orm" and ei_job.reward.name.value == "sparse"
    train: list = []  # the data fingerprint is the same for both jobs; the settings are what is compared
    ei_inputs = ei_policy_inputs(ei_job, ei_job.algo, train)
    rcrl_inputs = ei_policy_inputs(rcrl_job, rcrl_job.algo.ei, train)
    assert stage_key("ei_policy", rcrl_inputs) == stage_key("ei_policy", ei_inputs), (ei_inputs, rcrl_inputs)
    assert rcrl_job.algo.lr is not None and rcrl_job.algo.lr <= 1e-4 if model == "tiny" else True
