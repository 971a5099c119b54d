"""Mixed precision: the compute dtype follows the hardware, and training keeps float32 master weights."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from reasoning_rl.config import DType, ModelConfig, ModelSource
from reasoning_rl.models.loading import build_tiny_model, build_tiny_tokenizer, load_policy
from reasoning_rl.rollout.native import CastSampler, generate
from reasoning_rl.rollout.sampler import SamplingParams, weights_signature
from reasoning_rl.run.tracking import NullTracker
from reasoning_rl.tasks.arith import generate_arith
from reasoning_rl.training import precision
from reasoning_rl.training.finetune import FinetuneParams, finetune, summed_token_loss, tokenize_examples
from reasoning_rl.training.packing import collate_packed, packed_attention
from reasoning_rl.training.precision import CPU_BF16_FLAGS, Precision, cpuinfo_flags, resolve_compute_dtype

TINY = ModelConfig(name="tiny", source=ModelSource.tiny)
CPU = torch.device("cpu")


class LossCurve(NullTracker):
    """The train/sft_loss points a fine-tune logs (through the one Tracker interface)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.losses.append(metrics["train/sft_loss"])


def arith_examples(n: int) -> list[tuple[str, str]]:
    splits = generate_arith(n, 1, min_steps=1, max_steps=1, max_number=9, operations="+", seed=0)
    return [(f"Q: {p.question}\nA: ", p.reference) for p in splits.train]


# ----------------------------------------------------------------------------------------------- auto


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_is_bf16_exactly_where_the_hardware_computes_in_it(monkeypatch, has_bf16):
    monkeypatch.setattr(precision, "cpu_computes_bf16", lambda: has_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: has_bf16)
    expected = torch.bfloat16 if has_bf16 else torch.float32
    assert resolve_compute_dtype(DType.auto, torch.device("cpu")) == expected
    assert resolve_compute_dtype(DType.auto, torch.device("cuda")) == expected
    for dtype in (DType.float32, DType.bfloat16, DType.float16):  # an explicit choice is kept on any machine
        assert resolve_compute_dtype(dtype, torch.device("cpu")) == precision.TORCH_DTYPES[dtype]


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="the kernel's CPU flags are read from /proc/cpuinfo")
def test_the_real_probe_agrees_with_the_kernels_cpu_flags():
    # torch's own probe (cpuinfo, CPUID) and the kernel's flag list are two independent readings of this CPU
    flags = cpuinfo_flags()
    assert flags, "no flags line in /proc/cpuinfo"
    assert precision.cpu_computes_bf16() == bool(flags & set(CPU_BF16_FLAGS))
    expected = torch.bfloat16 if flags & set(CPU_BF16_FLAGS) else torch.float32
    assert resolve_compute_dtype(DType.auto, CPU) == expected


# ------------------------------------------------------------------------------------ master weights


def test_the_policy_is_loaded_in_float32_whatever_the_compute_dtype(tmp_path):
    for dtype in (DType.bfloat16, DType.float16, DType.auto):
        model, _ = load_policy(ModelConfig(name="tiny", source=ModelSource.tiny, dtype=dtype), seed=0,
                               cache_dir=tmp_path, device=CPU)  # fmt: skip
        assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_one_adamw_step_at_lr_1e6_in_bf16_compute_moves_every_weight_with_a_gradient():
    # AdamW's first step moves a weight by lr * g / (|g| + eps) (its bias-corrected moments are g and g^2): ~1e-6
    # wherever |g| >> eps = 1e-8. A float32 weight of magnitude w has a spacing of ~w * 1.2e-7, so every weight
    # below ~8 moves; a bf16 weight's spacing is w * 7.8e-3 (2^-7), so any weight above ~1.3e-4 in magnitude (all
    # but a handful here) rounds its step away, as the paper-scale configs' pure bf16 did (98% never moved).
    tok = build_tiny_tokenizer()
    model = build_tiny_model(TINY, len(tok), seed=0)
    examples = arith_examples(8)
    bf16 = Precision("cpu", torch.bfloat16)

    # the gradient of the same batch, in the same compute dtype, on a copy
    probe = copy.deepcopy(model).train()
    batch = collate_packed(tokenize_examples(tok, examples, 256), -100)
    with packed_attention(probe), bf16.autocast():
        summed_token_loss(probe, batch).backward()
    with_gradient = {n: p.grad.abs() > 1e-6 for n, p in probe.named_parameters()}  # Adam's step there is ~lr

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    signature = weights_signature(model)
    params = FinetuneParams(lr=1e-6, epochs=1, batch_size=8, micro_batch_size=8, max_seq_len=256, seed=0,
                            max_steps=1, compute_dtype=torch.bfloat16)  # fmt: skip
    finetune(model, tok, examples, params, NullTracker(), progress=False)
    # the cast sampler and the vLLM engine see the step through the weights' version counters (fused AdamW does
    # not bump them)
    assert weights_signature(model) != signature
    moved_any = 0
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        moved = p.detach() != before[name]
        stuck = with_gradient[name] & ~moved
        assert not stuck.any(), f"{name}: {int(stuck.sum())} of {int(with_gradient[name].sum())} did not move"
        moved_any += int(moved.sum())
    assert moved_any > 0.9 * sum(p.numel() for p in model.parameters())


def test_100_sft_steps_in_mixed_precision_follow_the_float32_loss_curve():
    # A 2-layer, 64-wide tiny model on 256 one-digit sums, 100 steps of 8 at lr 3e-3, the loss logged every 10 steps.
    # The runs see the same batches in the same order; mixed precision rounds each matmul's inputs to 8 (bf16) or
    # 11 (fp16) significant bits, so the curves drift apart a little as the updates compound. Measured on an AMD EPYC
    # (one thread): fp32 falls from 2.93 to 0.70; the largest gap to it was 2.0% for bf16 and 1.3% for fp16. The
    # tolerance, 5% of the loss, is far under the factor ~4 the curve falls by. (bf16 is emulated on that CPU: ~20 s
    # a run against 4 s in fp32.)
    small = ModelConfig(name="tiny", source=ModelSource.tiny, hidden_size=64, num_layers=2, num_heads=4,
                        intermediate_size=192)  # fmt: skip
    tok = build_tiny_tokenizer()
    init = build_tiny_model(small, len(tok), seed=0)
    examples = arith_examples(256)
    curves = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tracker = LossCurve()
        params = FinetuneParams(lr=3e-3, epochs=100, batch_size=8, micro_batch_size=8, max_seq_len=256, seed=0,
                                max_steps=100, compute_dtype=dtype)  # fmt: skip
        finetune(copy.deepcopy(init), tok, examples, params, tracker, progress=False)
        curves[dtype] = torch.tensor(tracker.losses)
    fp32 = curves[torch.float32]
    assert len(fp32) == 10 and fp32[-1] < 0.3 * fp32[0]  # it learns
    for dtype in (torch.bfloat16, torch.float16):
        assert not torch.equal(curves[dtype], fp32), f"{dtype}: the same curve to the last bit: autocast is off"
        torch.testing.assert_close(curves[dtype], fp32, rtol=0.05, atol=0.0, msg=str(dtype))


# ------------------------------------------------------------------------------------------ sampling


def test_the_cast_sampler_samples_the_current_policy_in_its_dtype():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(TINY, len(tok), seed=0)
    sampler = CastSampler(torch.bfloat16)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    bf16_copy = copy.deepcopy(model).to(torch.bfloat16)
    assert sampler(model, tok, ["Q: 1+2\nA: "], greedy) == generate(bf16_copy, tok, ["Q: 1+2\nA: "], greedy)
    assert sampler.copy is not None and {p.dtype for p in sampler.copy.parameters()} == {torch.bfloat16}
    with torch.no_grad():  # an optimizer step writes the weights in place: the next call samples the new policy
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    bf16_copy = copy.deepcopy(model).to(torch.bfloat16)
    assert sampler(model, tok, ["Q: 1+2\nA: "], greedy) == generate(bf16_copy, tok, ["Q: 1+2\nA: "], greedy)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the master weights are untouched
