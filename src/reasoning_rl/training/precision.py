"""Mixed precision: the compute dtype follows the hardware, the weights and the optimizer stay in float32.

``model.dtype`` is the *compute* dtype. Every model we train keeps float32 weights (the master copy) and AdamW's
float32 moments; the forward passes run under ``torch.autocast`` in the compute dtype, so matmuls are bf16 (or fp16)
and the update is applied to the float32 weights. Pure bf16 weights would not train at RL learning rates: a bf16
weight of magnitude ~0.02 moves in steps of ~1e-4, so AdamW's ~lr-sized updates (1e-6 for PPO) round to nothing
(tests/test_precision.py checks that every weight with a gradient moves after one step at lr 1e-6).

``auto`` (the default) is bfloat16 where the hardware computes in it (a CUDA GPU with bf16, a CPU with AMX or
AVX512-BF16) and float32 elsewhere: a CPU without them emulates bf16 matmuls, ~50x slower than fp32 (an AMD EPYC
with AVX2 measured 0.3-0.9 GFLOP/s in bf16 against 48-64 in fp32). float16 adds dynamic loss scaling
(``torch.amp.GradScaler``): its narrow exponent range underflows small gradients otherwise.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch

from reasoning_rl.config import DType

TORCH_DTYPES: dict[DType, torch.dtype] = {
    DType.float32: torch.float32,
    DType.bfloat16: torch.bfloat16,
    DType.float16: torch.float16,
}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs that compute in bf16 natively


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AMX or AVX512-BF16), as torch's own CPU probe reports it."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as the kernel lists them (empty off Linux): a second opinion on torch's probe."""
    if not path.is_file():
        return set()
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def resolve_compute_dtype(requested: DType, device: torch.device) -> torch.dtype:
    """The compute dtype of ``model.dtype=requested`` on ``device``; ``auto`` asks the hardware."""
    if requested != DType.auto:
        return TORCH_DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_computes_bf16() else torch.float32
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Precision:
    """How a loop computes: autocast to ``dtype`` on ``device_type`` (nothing for float32), and a gradient scaler
    that is live for float16 only (for float32 and bf16 its calls pass straight through)."""

    device_type: str = "cpu"
    dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, module: torch.nn.Module, dtype: torch.dtype) -> Precision:
        return cls(next(module.parameters()).device.type, dtype)

    def autocast(self) -> AbstractContextManager:
        """The forward passes run inside this; the backward pass, the optimizer step and float32 maths outside."""
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """``scale(loss).backward()``, ``unscale_(optimizer)`` before clipping, ``step(optimizer)``, ``update()``."""
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)


FLOAT32 = Precision()
