"""torchrun plumbing for the recipe: process group, model wrapping, full state dicts.

One process (``python -m recipes.flashsloth.train``) and torchrun
(``torchrun --nproc_per_node 8 -m recipes.flashsloth.train``) share one code path:
`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``) and starts a process group only when ``WORLD_SIZE > 1``.

Data parallelism (``training.parallelism``):

- ``fsdp``: FSDP2 (`torch.distributed.fsdp.fully_shard`), one unit per decoder layer of
  the LLM (the EmbQ graft's wrapped layer with EmbQ inside), then the root (embeddings,
  LM head, vision encoder, SAP, projector).
  Parameters, gradients and optimizer states are sharded; frozen and trainable
  parameters may share a unit (FSDP2 keeps ``requires_grad`` per parameter). Works on
  CUDA (NCCL) and, for tests, on CPU (gloo).
- ``ddp``: `DistributedDataParallel`, full replicas; simpler, more memory.

Checkpoints hold full (unsharded) state dicts whatever the parallelism, gathered with
`torch.distributed.checkpoint.state_dict` and written by rank 0, so a run can resume on
another world size or parallelism, and stage 2 reads stage 1 without caring how it ran.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistributedEnv",
    "Parallelism",
    "all_reduce_sum",
    "barrier",
    "full_model_state_dict",
    "full_optimizer_state_dict",
    "init_distributed",
    "load_full_model_state_dict",
    "load_full_optimizer_state_dict",
    "no_gradient_sync",
    "teardown_distributed",
    "unwrap",
    "wrap_model",
]

logger = logging.getLogger(__name__)

Parallelism = Literal["fsdp", "ddp"]


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistributedEnv:
    """Read torchrun's environment; start a process group (NCCL on CUDA, else gloo) if needed.

    ``device`` is the config's ``training.device`` ("cuda" or "cpu"); on CUDA each process
    takes GPU ``LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_type = torch.device(device).type
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("training.device is cuda but CUDA is not available; use training.device=cpu")
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device(device_type)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistributedEnv(rank, world_size, local_rank, torch_device)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of ``value`` over all ranks (in place; a no-op in one process)."""
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


# ----------------------------------------------------------------------------- wrapping


def fsdp_unsupported_reason() -> str | None:
    """Why this torch cannot run the recipe's FSDP2 training, or None if it can.

    Ranks whose micro-batches leave EmbQ (no query block) or the vision path (text only)
    without gradient must still reduce those parameters, or the ranks' collectives stop
    matching; FSDP2 does that with `set_reduce_scatter_unused_params`, new in torch 2.13.
    """
    from torch.distributed.fsdp import FSDPModule

    if hasattr(FSDPModule, "set_reduce_scatter_unused_params"):
        return None
    return (
        f"training.parallelism='fsdp' needs torch>=2.13 (FSDP2's set_reduce_scatter_unused_params, "
        f"which keeps ranks in step when a batch leaves EmbQ or the vision path without gradient); "
        f"torch {torch.__version__} is installed: set training.parallelism=ddp, or upgrade torch"
    )


def wrap_model(
    model: nn.Module, env: DistributedEnv, parallelism: Parallelism, *, shard_units: Iterable[nn.Module] = ()
) -> nn.Module:
    """The model ready for data-parallel training (unchanged in one process).

    FSDP2 shards in place and returns the same object (its class gains FSDP methods):
    each of ``shard_units`` (the LLM's decoder layers) is one unit, the rest is the
    root unit. The vision path stays in the root on purpose: a text-only micro-batch
    skips it, and a unit that one rank skips while another runs it would issue
    mismatched collectives; the root always runs, and its unused parameters reduce
    zeros. DDP returns a wrapper whose ``.module`` is the model.
    """
    if not env.is_distributed:
        return model
    if parallelism == "fsdp":
        if (reason := fsdp_unsupported_reason()) is not None:
            raise RuntimeError(reason)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        # Gradients are reduced in fp32 (autocast computes in bf16, parameters stay fp32);
        # an explicit reduce dtype also lets unused parameters reduce zeros of that dtype.
        policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        for unit in shard_units:
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        # EmbQ gets no gradient from a batch without query blocks, the vision path none
        # from a text-only batch: reduce zeros for them so every rank issues the same calls.
        model.set_reduce_scatter_unused_params(True)
        return model
    if parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [env.local_rank] if env.device.type == "cuda" else None
        # Frozen stages (1: only SAP + projector learn) leave most parameters without
        # gradients; DDP only buckets parameters that require them, so no unused-parameter
        # search is needed. Text-only micro-batches skip the vision path, hence the flag.
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)
    raise ValueError(f"unknown parallelism {parallelism!r}; expected 'fsdp' or 'ddp'")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 does not wrap)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce of a micro-batch that is not the last of its step."""
    if not enabled or not dist.is_initialized():
        yield
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


# ----------------------------------------------------------------------------- state dicts


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state on CPU (complete on rank 0; every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(unwrap(model), options=_options(cpu_offload=dist.is_initialized()))


def load_full_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into a (possibly sharded) model; strict."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    result = set_model_state_dict(unwrap(model), state, options=_options(strict=True))
    if result is not None and (result.missing_keys or result.unexpected_keys):
        raise KeyError(f"model state mismatch: missing {result.missing_keys}, unexpected {result.unexpected_keys}")


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter names (not positions), unsharded, on CPU."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(model), optimizer, options=_options(cpu_offload=dist.is_initialized()))


def load_full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(unwrap(model), optimizer, state, options=_options())
