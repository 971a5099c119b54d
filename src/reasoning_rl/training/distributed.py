"""Data parallelism inside one job: N processes, each sampling and training on its shard, gradients summed.

Launch (every process runs the same ``main.py`` command; torch's ``RANK`` / ``WORLD_SIZE`` say which one it is)::

    accelerate launch --multi_gpu --num_processes 2 main.py algo=ppo ...   # on a CPU machine too: gloo
    torchrun --nproc_per_node 2 main.py algo=ppo ...                       # the same, without accelerate
    python main.py -m hydra/launcher=slurm hydra.launcher.tasks_per_node=2 ...  # Slurm: submitit's environment

What each rank does (``DataParallel``; one process is ``SINGLE`` and every call below is then the identity):

- **Sampling**: each rank samples :meth:`~DataParallel.shard` of the questions (EI's round, PPO's step, the
  evaluation's test problems); :meth:`~DataParallel.gather` puts the results back together in the original order
  on every rank, so EI's dataset, the evaluation's metrics and the per-problem records are those of all questions.
- **Training**: every rank draws the same global batch, takes its shard, and divides its summed token losses by the
  *global* token count; :meth:`~DataParallel.sum_gradients` then sums the gradients over the ranks before clipping.
  That is the gradient one process computes on the whole batch, up to summation order (tests/test_distributed.py:
  rtol 1e-5), so the replicas take the same optimizer step and stay identical. This is DDP's all-reduce, done once
  per optimizer step (not overlapped with the backward pass: at the sizes this runs on CPU the step is compute-bound).
- **Side effects**: rank 0 alone logs to MLflow, writes checkpoints and the run's state, and builds the cached stages
  (:meth:`~DataParallel.main_first`: the others wait, then reuse what it built). All ranks restore a checkpoint.

The backend is NCCL when the job computes on CUDA, gloo otherwise. A rank that fails stops the job: torchrun (which
``accelerate launch`` runs) terminates the other ranks when one exits.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# How long a rank waits for the others at one collective. Rank 0 builds a stage (the SFT checkpoint: hours at 7B)
# while the others wait at a barrier, so the default 30 minutes is far too short; a rank that died ends the job
# through torchrun before this matters.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the job's ``world_size`` processes."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share: every ``world_size``-th item from position ``rank`` (shares differ by one at most)."""
        return list(items[self.rank :: self.world_size])

    def gather(self, local: Sequence[T]) -> list[T]:
        """The inverse of :meth:`shard`, on every rank: the shards of all ranks in their original order."""
        if not self.active:
            return list(local)
        shards: list[list[T] | None] = [None] * self.world_size
        dist.all_gather_object(shards, list(local))
        merged: list[T] = []
        for position in range(max(len(s) for s in shards if s is not None)):
            merged.extend(s[position] for s in shards if s is not None and position < len(s))
        return merged

    def share(self, value: T) -> T:
        """Rank 0's ``value``, on every rank (a decision only rank 0 can make, such as whether the run resumes)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, value: float) -> float:
        """``value`` summed over the ranks."""
        if not self.active:
            return value
        return float(self.sum_tensor(torch.tensor([value], dtype=torch.float64)).item())

    def sum_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Each metric summed over the ranks, in one collective."""
        if not self.active:
            return dict(metrics)
        names = sorted(metrics)
        values = self.sum_tensor(torch.tensor([float(metrics[n]) for n in names], dtype=torch.float64))
        return dict(zip(names, values.tolist(), strict=True))

    def mean_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Each metric averaged over the ranks: for means over rows that the ranks' equal shards hold, the mean
        over all rows."""
        return {name: value / self.world_size for name, value in self.sum_metrics(metrics).items()}

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (a new tensor, on ``tensor``'s device)."""
        if not self.active:
            return tensor
        total = tensor.to(self._device(), copy=True)
        dist.all_reduce(total)
        return total.to(tensor.device)

    def sum_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the ranks, in place (a rank whose shard was empty adds zeros)."""
        if not self.active:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def broadcast_parameters(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Overwrite each parameter with rank 0's values, in place (DDP does this when it wraps a model): weights
        drawn at random on each rank (LoRA's A matrices) must be the same on every replica."""
        if not self.active:
            return
        for p in params:
            dist.broadcast(p.data, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it builds the cached stages); the others run it once it is done (and reuse
        them). What the block computes must not depend on which rank ran first."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def _device(self) -> torch.device:
        backend = dist.get_backend()
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


SINGLE = DataParallel()


def from_environment(device: torch.device) -> DataParallel:
    """The job's data parallelism: torchrun's (or ``accelerate launch``'s) ``RANK`` and ``WORLD_SIZE``, or a Slurm
    job's tasks as submitit describes them; one process (:data:`SINGLE`) when there is neither. Starts the process
    group on first use (NCCL for CUDA, gloo otherwise)."""
    if "WORLD_SIZE" not in os.environ:
        _export_slurm_tasks()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return DataParallel(dist.get_rank(), dist.get_world_size())


def _export_slurm_tasks() -> None:
    """Inside a submitit job of several tasks (``hydra.launcher.tasks_per_node``): set torch's variables from it.
    Slurm's view wins over any of them the job inherited from the shell that submitted it (sbatch exports that
    shell's environment, e.g. a ``LOCAL_WORLD_SIZE`` or ``MASTER_ADDR`` left there by another tool)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
