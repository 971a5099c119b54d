"""The tiny model's pretraining stage (``model.pretrain_steps``): its corpus tells the stories with their sums but
never in the task's format nor about a test question; the stage trains the network, is built once and reused, and
the runs that follow start from it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from reasoning_rl.config import ConfigError, ModelConfig, ModelSource, register_configs, to_experiment
from reasoning_rl.launch.pipeline import run_experiment
from reasoning_rl.models.loading import build_tiny_model, build_tiny_tokenizer, load_checkpoint
from reasoning_rl.run.stages import init_stage_inputs
from reasoning_rl.run.tracking import NullTracker
from reasoning_rl.tasks.arith import generate_arith, generate_arith_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["model=tiny", "task=arith", "task.min_steps=1", "task.max_steps=1", "task.n_train=32", "task.n_test=4",
            "eval.k=2", "eval.max_new_tokens=24", "logger=none", "init=pretrained", "init.n_shots=0"]  # fmt: skip


def compose_experiment(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_experiment(compose(config_name="config", overrides=overrides))


class TagRecorder(NullTracker):
    def __init__(self) -> None:
        self.tags: dict[str, str] = {}

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)


def question_of(prose: str) -> str:
    """The arith question a corpus line tells (the inverse of Story.prose, for the test)."""
    steps = re.sub(r", so (?:he|she) has \d+[+-]\d+=\d+\.", ".", prose)
    match = re.fullmatch(r"(.*) In the end (\w+) has \d+ (\w+)\.", steps)
    assert match, prose
    return f"{match[1]} How many {match[3]} does {match[2]} have?"


def test_the_corpus_is_prose_with_right_sums_without_the_task_format_or_a_test_question():
    test = generate_arith(10, 200, 1, 1, 3, "+-", seed=0).test  # a small space of problems: overlaps are likely
    avoid = {p.question for p in test}
    documents = generate_arith_corpus(60, 200, seed=0, avoid=avoid, max_steps=1, max_number=3)
    assert len(documents) == 60 and all(len(d) <= 200 for d in documents)
    for marker in ("<<", "####", "Question:", "Answer:"):
        assert not any(marker in d for d in documents), marker
    lines = [line for d in documents for line in d.splitlines()]
    assert not avoid & {question_of(line) for line in lines}
    unguarded = generate_arith_corpus(60, 200, seed=0, max_steps=1, max_number=3)  # the same draw, nothing avoided
    assert avoid & {question_of(line) for d in unguarded for line in d.splitlines()}  # so the check above has teeth
    for line in lines:
        for a, op, b, result in re.findall(r"(\d+)([+-])(\d+)=(\d+)", line):
            assert int(result) == (int(a) + int(b) if op == "+" else int(a) - int(b)), line
    assert generate_arith_corpus(5, 200, seed=1) != generate_arith_corpus(5, 200, seed=0)


def test_pretrain_steps_is_for_the_tiny_model_only():
    expected = "model.pretrain_steps=10 must be >= 0, and above 0 only with model.source=tiny"
    with pytest.raises(ConfigError, match=expected):
        ModelConfig(name="x", source=ModelSource.hub, path="org/model", pretrain_steps=10)
    with pytest.raises(ConfigError, match="model.pretrain_steps=-1"):
        ModelConfig(name="tiny", source=ModelSource.tiny, pretrain_steps=-1)


def corpus_loss(model: torch.nn.Module) -> float:
    """Next-token loss on corpus documents of another seed than the ones trained on."""
    tokenizer = build_tiny_tokenizer()
    ids = torch.tensor([tokenizer(d)["input_ids"][:120] for d in generate_arith_corpus(4, 380, seed=99)
                        if len(tokenizer(d)["input_ids"]) >= 120])  # fmt: skip
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def eval_completions(output_dir: Path) -> list[list[str]]:
    """What the evaluated policy wrote: each test problem's greedy answer and its K samples."""
    records = [json.loads(line) for line in (output_dir / "eval" / "samples.jsonl").read_text().splitlines()]
    return [[r["greedy"]["text"], *(s["text"] for s in r["samples"])] for r in records]


def test_pretraining_trains_the_network_once_and_the_run_starts_from_it(tmp_path):
    cache = tmp_path / "cache"
    cfg = compose_experiment([*TINY_RUN, "model.pretrain_steps=30", f"cache_dir={cache}"])
    first = TagRecorder()
    run_experiment(cfg, first, base_dir=tmp_path, output_dir=tmp_path / "first")
    status, stage = first.tags["stage/pretrain"].split(" ", 1)
    assert status == "computed"
    pretrained, _ = load_checkpoint(Path(stage) / "model", torch.device("cpu"))
    random_network = build_tiny_model(ModelConfig(name="tiny", source=ModelSource.tiny), 100, seed=cfg.seed)
    assert corpus_loss(pretrained) < corpus_loss(random_network) - 1.0  # ~4.6 (uniform over 100) -> ~2 after 30 steps

    second = TagRecorder()
    # a longer context (init=pretrained's few-shot prompts) shares the stage: the tiny model has no positional weights
    longer = compose_experiment([*TINY_RUN, "model.pretrain_steps=30", "model.max_seq_len=640", f"cache_dir={cache}"])
    run_experiment(longer, second, base_dir=tmp_path, output_dir=tmp_path / "second")
    assert second.tags["stage/pretrain"] == f"reused {stage}"
    assert eval_completions(tmp_path / "second") == eval_completions(tmp_path / "first")  # the reused weights

    untrained = TagRecorder()
    run_experiment(compose_experiment([*TINY_RUN, f"cache_dir={cache}"]), untrained, base_dir=tmp_path,
                   output_dir=tmp_path / "untrained")  # fmt: skip
    assert "stage/pretrain" not in untrained.tags
    assert eval_completions(tmp_path / "untrained") != eval_completions(tmp_path / "first")


def test_the_init_stages_key_on_pretraining_and_keep_their_old_keys_without_it():
    train = generate_arith(8, 2, 1, 1, 9, "+-", seed=0).train
    without = init_stage_inputs(compose_experiment(TINY_RUN), train)
    assert "pretrain_steps" not in without["model"]  # stages built before the field existed are still found
    pretrained = init_stage_inputs(compose_experiment([*TINY_RUN, "model.pretrain_steps=30"]), train)
    assert pretrained["model"]["pretrain_steps"] == 30


def test_how_a_model_is_run_does_not_enter_the_stage_keys():
    # the sampler's batch, gradient checkpointing and FSDP2 sharding change the speed and memory, not the weights
    train = generate_arith(8, 2, 1, 1, 9, "+-", seed=0).train
    plain = init_stage_inputs(compose_experiment(TINY_RUN), train)
    how = ["model.sample_batch_size=3", "model.gradient_checkpointing=true", "model.fsdp=true"]
    assert init_stage_inputs(compose_experiment([*TINY_RUN, *how]), train) == plain
    assert init_stage_inputs(compose_experiment([*TINY_RUN, "model.lr=0.5"]), train) != plain
