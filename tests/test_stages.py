"""Cached stages: keyed by their inputs, reused, built once under concurrent jobs, never seen half-written."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from reasoning_rl.config import ModelConfig
from reasoning_rl.run.stages import cached_stage, stage_key
from reasoning_rl.run.tracking import NullTracker


class TagRecorder(NullTracker):
    def __init__(self) -> None:
        self.tags: dict[str, str] = {}

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)


def write_file(text: str):
    def build(directory: Path) -> None:
        (directory / "out.txt").write_text(text)

    return build


def test_key_depends_on_inputs_not_their_order():
    assert stage_key("sft", {"a": 1, "b": 2}) == stage_key("sft", {"b": 2, "a": 1})
    assert stage_key("sft", {"a": 1}) != stage_key("sft", {"a": 2})
    assert stage_key("sft", {"a": 1}) != stage_key("orm", {"a": 1})
    # config dataclasses and enums hash by value
    assert stage_key("sft", {"m": ModelConfig(name="x")}) == stage_key("sft", {"m": ModelConfig(name="x")})
    assert stage_key("sft", {"m": ModelConfig(name="x")}) != stage_key("sft", {"m": ModelConfig(name="x", lr=1.0)})


def test_second_call_reuses_and_is_tagged(tmp_path):
    tracker = TagRecorder()
    first = cached_stage(tmp_path, "demo", {"x": 1}, write_file("one"), tracker)
    assert not first.reused and tracker.tags["stage/demo"] == f"computed {first.path}"
    second = cached_stage(tmp_path, "demo", {"x": 1}, write_file("two"), tracker)  # not built again
    assert second.reused and second.path == first.path and tracker.tags["stage/demo"] == f"reused {first.path}"
    assert (second.path / "out.txt").read_text() == "one"
    assert json.loads((second.path / "stage.json").read_text())["inputs"] == {"x": 1}
    other = cached_stage(tmp_path, "demo", {"x": 2}, write_file("two"), tracker)
    assert not other.reused and (other.path / "out.txt").read_text() == "two"


def test_a_failed_build_leaves_nothing_and_the_next_call_builds(tmp_path):
    def crash(directory: Path) -> None:
        (directory / "partial.txt").write_text("half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        cached_stage(tmp_path, "demo", {"x": 1}, crash, NullTracker())
    assert [p.name for p in (tmp_path / "stages" / "demo").iterdir() if not p.name.endswith(".lock")] == []
    stage = cached_stage(tmp_path, "demo", {"x": 1}, write_file("ok"), NullTracker())
    assert not stage.reused and (stage.path / "out.txt").read_text() == "ok"


def slow_build_job(cache_dir: str, log_path: str) -> bool:
    def build(directory: Path) -> None:
        with open(log_path, "a") as log:  # one line per build actually run
            log.write("built\n")
        time.sleep(1.0)  # long enough for the other jobs to arrive while this one holds the lock
        (directory / "out.txt").write_text("shared")

    return cached_stage(Path(cache_dir), "demo", {"x": 1}, build, NullTracker()).reused


def test_concurrent_jobs_build_once(tmp_path):
    log_path = tmp_path / "builds.log"
    context = multiprocessing.get_context("spawn")  # separate processes, as sweep jobs are
    with context.Pool(3) as pool:
        reused = pool.starmap(slow_build_job, [(str(tmp_path / "cache"), str(log_path))] * 3)
    assert log_path.read_text() == "built\n"
    assert sorted(reused) == [False, True, True]
