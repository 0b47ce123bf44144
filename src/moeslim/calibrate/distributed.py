"""Data parallelism for the layer-wise runner on torch.distributed (gloo on CPU, NCCL on GPUs).

Started by ``torchrun --nproc-per-node N moeslim plan ...``: every process loads (or streams) the model,
runs its contiguous share of the calibration batches through each layer, and the observers merge their
statistics (``sync``: counts all-reduced, per-token samples gathered in window order) before the method
decides, so every process decides on exactly what one process would have seen. Rank 0 writes the outputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's rank and the number of processes (0 of 1 when torch.distributed is not running)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_from_env(device: torch.device) -> World:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment), else run alone.

    gloo for CPU compute, NCCL for CUDA (each process on ``cuda:LOCAL_RANK``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return World()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(process_device(device, World(0, 2)))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return world()


def leave() -> None:
    """Leave torchrun's process group before the interpreter exits (no-op when none was joined).

    Left to interpreter teardown, gloo's worker threads can outlive the group and abort the process ("terminate
    called without an active exception", SIGABRT) after its work is done; torch asks for this call at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_device(device: torch.device, w: World) -> torch.device:
    """Each process computes on its own GPU (``cuda:LOCAL_RANK``) unless a device index was given."""
    if w.size > 1 and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def batch_share(batches: int, w: World) -> range:
    """The contiguous batches rank ``w.rank`` runs (shares differ by at most one batch)."""
    base, extra = divmod(batches, w.size)
    start = w.rank * base + min(w.rank, extra)
    return range(start, start + base + (1 if w.rank < extra else 0))


def expert_share(items: int, rank: int, size: int) -> range:
    """The work items (e.g. the quantized experts of a layer, in order) process ``rank`` of ``size`` does:
    every ``size``-th, so experts of similar cost spread evenly."""
    return range(rank, items, size)


class RankedCommunicator(Protocol):
    """A ``Communicator`` that also says which process this is (to split per-expert work)."""

    rank: int
    size: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over processes, in place."""

    def all_gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order."""


class TorchCommunicator:
    """The observers' ``Communicator`` over the default process group."""

    def __init__(self, device: torch.device) -> None:
        # gloo reduces CPU tensors, NCCL CUDA tensors.
        self.device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        moved = tensor.to(self.device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        tensor.copy_(moved)

    def all_gather(self, value: Any) -> list[Any]:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        return gathered


def process_communicator(device: torch.device) -> TorchCommunicator | None:
    """The communicator of this torchrun job, or None in a single process."""
    return TorchCommunicator(device) if world().size > 1 else None


def sync_observers(observers: list[Any], device: torch.device) -> None:
    """Merge every observer's statistics across processes (no-op in a single process)."""
    if world().size == 1:
        return
    comm = TorchCommunicator(device)
    for observer in observers:
        sync = getattr(observer, "sync", None)
        if sync is None:
            raise NotImplementedError(f"{type(observer).__name__} cannot merge its statistics across processes; "
                                      "run this method in a single process (without torchrun)")
        sync(comm)
