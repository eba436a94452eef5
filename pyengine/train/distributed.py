"""Multi-process training helpers: torchrun / DistributedDataParallel plumbing in one place.

Launched by ``torchrun`` (or ``python -m torch.distributed.run``) the environment carries
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; :func:`init` turns that
into a process group (NCCL on CUDA, gloo on CPU). Everything here degrades to the
single-process answer when no process group exists, so callers need no branches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True when started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def default_backend(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init(device: str | torch.device = "cpu", backend: str | None = None) -> DistInfo:
    """Join (or create) the default process group from torchrun's environment variables.

    A no-op returning the current group when one exists already; a single process without
    torchrun's variables gets ``DistInfo(0, 1, 0, None)``.
    """
    if is_initialized():
        return DistInfo(rank(), world_size(), local_rank(), dist.get_backend())
    if not launched():
        return DistInfo(0, 1, 0, None)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = backend or default_backend(device)
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return DistInfo(rank(), world_size(), local_rank(), backend)


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (in place, returned); identity without a process group."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def device_for_rank(device: str | torch.device) -> torch.device:
    """``cuda`` means this rank's GPU (``cuda:LOCAL_RANK``) under torchrun."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and is_initialized():
        return torch.device("cuda", local_rank())
    return d


def wrap(model: torch.nn.Module, device: torch.device,
         find_unused_parameters: bool = False) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` under a process group; ``model`` itself otherwise."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model) if type(model).__name__ in (
        "DistributedDataParallel", "DataParallel") else model
