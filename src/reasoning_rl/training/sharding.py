"""FSDP2 in the fine-tuning loop: the trained weights, their gradients and AdamW's moments split over the ranks.

With ``model.fsdp=true`` and several processes (training/distributed.py), :func:`~reasoning_rl.training.finetune.
finetune` trains a *sharded copy* of the model (:func:`sharded_copy`) built with torch's FSDP2 (``fully_shard``):

- **Units**: each decoder layer is one unit, whose full weights exist only during its own forward and backward
  passes; the rest (embeddings, final norm, output and ORM heads) is the root unit, so tied weights (the embedding
  and the LM head) stay in one unit. Each rank holds 1/N of the float32 weights, gradients and AdamW moments: the
  16 bytes per trained parameter that docs/memory.md finds too large for one 80 GB GPU at 7B and 13B.
- **The gradient** is the one data parallelism computes without sharding: each rank divides its summed token
  losses by the *global* token count, and FSDP2's reduce-scatter sums the ranks' gradients (its own division by N
  is switched off), so every rank's shard of the gradient is that shard of the one-process gradient
  (tests/test_distributed.py: rtol 1e-5 against one process).
- **Precision**: in float32 FSDP2 gathers the float32 weights and the sharded update is the unsharded one. In bf16
  each unit is gathered in bf16 (``MixedPrecisionPolicy``; the shards, the gradients' reduction and AdamW stay
  float32): half the traffic, and no whole-model bf16 copy held from the forward to the backward pass, as
  autocast's casts of whole weights are; the loop's autocast still covers the rest. The norms' weights are then
  bf16 too, so a sharded bf16 step is close to the unsharded one, not equal (tests/test_distributed.py). float16
  is refused (its loss scaling is not built for sharded gradients).
- **What the loop hands on**: when training ends, the full weights are gathered into the original model on every
  rank (:func:`sharded_copy` on exit), so the sampler, the stage cache and the next EI round see a plain model.
- **Checkpoints** (:func:`gather_weights`, :func:`full_optimizer_state`, :func:`load_full_optimizer_state`): the
  weights and AdamW's moments gathered to whole tensors one at a time, written by rank 0 as an unsharded checkpoint
  would be, read by every rank and sharded again on resume.

On a GPU the whole model waits in host memory while its shards train (``model.to("cpu")``, and back when
training ends), so the GPU holds the shards and one unit's whole weights at a time; that branch has not run on a
GPU yet (none was lent): on CPU everything stays where it is. Sharded: the SFT stage (every rank trains it together,
``run/stages.py: cached_stage_together``) and EI's rounds, through :func:`sharded_copy`; PPO's and the GRPO family's
updates, through :func:`shard`: their sharded copy (``ppo.PolicyValue``: the policy and its value head) lives for the
whole run, the whole policy beside it samples and scores each step and takes its weights after every update
(:func:`gather_weights`), and the critic warm-up's fitted head goes the other way (:func:`scatter_weights`). Not
sharded: the ORM stage (rank 0 trains it alone while the others wait).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor

from reasoning_rl.training.distributed import DataParallel
from reasoning_rl.training.lora import language_model

log = logging.getLogger(__name__)


def sharding_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP2 shards one by one: the transformer's blocks, as transformers names them
    (``_no_split_modules``, e.g. ``LlamaDecoderLayer``)."""
    lm = language_model(model)
    block_names = set(getattr(lm, "_no_split_modules", None) or ())
    units = [module for module in model.modules() if type(module).__name__ in block_names]
    if not units:
        raise TypeError(
            f"model.fsdp=true: {type(lm).__name__} names no transformer block to shard by (_no_split_modules is "
            f"{sorted(block_names) or 'empty'}); set model.fsdp=false."
        )
    return units


def shard(
    model: torch.nn.Module, data_parallel: DataParallel, compute_dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """A copy of ``model`` sharded over the job's ranks, whose units gather their weights in ``compute_dtype``;
    ``model`` keeps its whole weights. Every rank must call it together (collectives)."""
    if compute_dtype == torch.float16:
        raise ValueError("FSDP2 sharding computes in float32 or bfloat16: float16's loss scaling is not built for "
                         "sharded gradients")  # fmt: skip
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (data_parallel.world_size,))
    # bf16 compute: each unit is gathered in bf16 and its gradients reduced in float32 (the shards stay float32), so
    # no whole-model bf16 copy outlives a unit's forward as autocast's cast cache would keep it (2 bytes/param)
    precision = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                     reduce_dtype=torch.float32)  # fmt: skip
    sharded = copy.deepcopy(model)
    units = sharding_units(sharded)
    for unit in units:  # each unit's weights go to the device (whole), then only this rank's shard stays there
        fully_shard(unit, mesh=mesh, mp_policy=precision)
    fully_shard(sharded, mesh=mesh, mp_policy=precision)
    for module in sharded.modules():
        if isinstance(module, FSDPModule):  # sum the ranks' gradients: each rank's loss is over the global count
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum
    local, total = sum(p.to_local().numel() for p in sharded.parameters()), sum(p.numel() for p in model.parameters())
    log.info("FSDP2: %d units over %d ranks; rank %d holds %d of the model's %d values", len(units) + 1,
             data_parallel.world_size, data_parallel.rank, local, total)  # fmt: skip
    return sharded


@contextmanager
def sharded_copy(
    model: torch.nn.Module, data_parallel: DataParallel, compute_dtype: torch.dtype = torch.float32
) -> Iterator[torch.nn.Module]:
    """:func:`shard`'s copy of ``model`` for a block that trains it; on leaving the block without an error its
    trained weights are gathered back into ``model`` on every rank. On a GPU the whole ``model`` waits in host
    memory meanwhile. Every rank must enter and leave together (collectives)."""
    device = next(model.parameters()).device
    offload = device.type != "cpu"
    if offload:  # the whole model waits in host memory while its shards train: 4 bytes per parameter off the GPU
        model.to("cpu")
    sharded = shard(model, data_parallel, compute_dtype)
    yield sharded
    gather_weights(sharded, model)
    if offload:
        model.to(device)


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@torch.no_grad()
def gather_weights(sharded: torch.nn.Module, model: torch.nn.Module) -> None:
    """Copy the sharded copy's weights into ``model`` (same names), on every rank, one whole tensor at a time: a
    whole state dict gathered at once would put 4 bytes per parameter on the GPU. A collective."""
    targets = dict(model.named_parameters())
    for name, param in sharded.named_parameters():
        targets[name].copy_(param.full_tensor())


@torch.no_grad()
def scatter_weights(model: torch.nn.Module, sharded: torch.nn.Module, names: Collection[str]) -> None:
    """The inverse of :func:`gather_weights` for the parameters ``names``: ``model``'s whole tensors into the sharded
    copy, each rank keeping its shard (PPO's critic warm-up fits the whole value head). Every rank holds the same
    whole tensors, so no rank sends anything."""
    sources = dict(model.named_parameters())
    for name, param in sharded.named_parameters():
        if name in names:
            whole = sources[name].detach().to(param.device, param.dtype)
            mine = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(mine.to_local())


def full_optimizer_state(sharded: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """AdamW's state as whole tensors for a checkpoint: an unsharded model's ``optimizer.state_dict()``; a sharded
    copy's keyed by parameter name, in host memory, on rank 0 (the checkpoint's writer; the other ranks get an empty
    dict), a collective."""
    if not is_sharded(sharded):
        return optimizer.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(sharded, optimizer, options=options)


def load_full_optimizer_state(sharded: torch.nn.Module, optimizer: torch.optim.Optimizer, state: Any) -> None:
    """Put :func:`full_optimizer_state`'s whole tensors back into the sharded copy's ``optimizer`` (each rank keeps
    its shard; every rank passes the state it read from the checkpoint). The weights come with the copy, made from a
    model that holds the checkpoint's. A collective. An unsharded model's ``optimizer`` loads ``state`` as it is."""
    if not is_sharded(sharded):
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(sharded, optimizer, state, options=StateDictOptions(full_state_dict=True))
