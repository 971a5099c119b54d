"""benchmarks/grpo_vs_trl.py's pure pieces: the timing summary, with numbers worked by hand, and the equal-settings
check, on the config our run composes and the TRL config built from it (skipped without TRL, the `bench` extra)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # as `python benchmarks/...` would
import grpo_vs_trl  # noqa: E402

from reasoning_rl.config import register_configs  # noqa: E402


def test_timed_steps_drop_the_warmup_and_weigh_tokens_by_time() -> None:
    # steps of 10, 2, 4, 3 s with 100, 20, 40, 30 tokens, one warm-up: the timed steps are 2, 4, 3 s,
    # median 3 s; tokens/s = (20 + 40 + 30) / (2 + 4 + 3) = 90 / 9 = 10
    timing = grpo_vs_trl.timed_steps([10.0, 2.0, 4.0, 3.0], [100, 20, 40, 30], warmup=1)
    assert timing.seconds == [2.0, 4.0, 3.0] and timing.tokens == [20, 40, 30]
    assert timing.median_seconds == 3.0
    assert timing.tokens_per_second == pytest.approx(10.0)


def test_timed_steps_refuse_too_few_steps_or_unmatched_counts() -> None:
    with pytest.raises(ValueError, match="after 2 warm-up"):
        grpo_vs_trl.timed_steps([1.0, 2.0], [5, 5], warmup=2)  # nothing left to time
    with pytest.raises(ValueError, match="3 step times and 2 token counts"):
        grpo_vs_trl.timed_steps([1.0, 2.0, 3.0], [5, 5], warmup=1)


def test_summary_gives_the_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    # ours: median 2 s, 60 tokens in 6 s = 10 tokens/s; TRL: median 8 s, 48 tokens in 24 s = 2 tokens/s.
    # TRL's step / ours = 8 / 2 = 4x (>= 3: yes); our rate / TRL's = 10 / 2 = 5x
    ours = grpo_vs_trl.Timing([1.0, 2.0, 3.0], [10, 20, 30])
    theirs = grpo_vs_trl.Timing([8.0, 8.0, 8.0], [16, 16, 16])
    args = argparse.Namespace(questions=1, k=8, max_new_tokens=128, steps=3, warmup=1)
    grpo_vs_trl.print_summary(args, {"float32": (ours, theirs)}, "1.16.0")
    out = capsys.readouterr().out
    assert "| reasoning_rl algo=grpo | float32 | 2.00 | 10.0 | 10, 20, 30 | 1.00, 2.00, 3.00 |" in out
    assert "| TRL 1.16.0 GRPOTrainer | float32 | 8.00 | 2.0 |" in out
    assert "TRL's median step / ours = 4.00x; our tokens/s / TRL's = 5.00x (ours >= 3x faster: yes by step" in out


def test_unequal_names_each_setting_that_differs() -> None:
    rows = [("K", 8, 8), ("KL coefficient", 0.04, 0.0), ("loss normalisation", "grpo", "dapo")]
    assert grpo_vs_trl.unequal(rows) == [
        "KL coefficient: ours 0.04, TRL 0.0",
        "loss normalisation: ours 'grpo', TRL 'dapo'",
    ]


def test_trl_config_matches_ours(tmp_path: Path) -> None:
    """TRL's defaults differ from ours (beta 0, loss_type dapo, gradient checkpointing and bf16 on, a linear
    schedule): the config the benchmark builds must set every one of them to our run's value."""
    pytest.importorskip("trl")
    register_configs()
    args = argparse.Namespace(questions=2, k=4, max_new_tokens=32, micro_batch_size=4, lr=1e-6, kl_coef=0.04,
                              warmup=1, steps=2, seed=0)  # fmt: skip
    for dtype in ("float32", "bfloat16"):
        cfg = grpo_vs_trl.compose_config(args, dtype)
        trl_args = grpo_vs_trl.trl_config(args, cfg.algo, dtype, tmp_path)
        rows = grpo_vs_trl.settings_rows(cfg.algo, dtype, trl_args)
        assert grpo_vs_trl.unequal(rows) == []
        # 2 questions x 4 completions = 8 sequences per optimizer step, 4 per forward: 2 accumulation steps
        assert trl_args.gradient_accumulation_steps == 2 and trl_args.generation_batch_size == 8
