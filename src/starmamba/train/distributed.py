"""Processes and devices: torchrun's environment, the process group's backends, and rank-aware samplers."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class Processes:
    """Where this process stands: its rank among ``world_size`` and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(choice: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a clear error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: PyTorch sees no CUDA device here; use --device cpu (or auto)")
    return torch.device(choice)


def group_backend(device: torch.device) -> str:
    """The process group's backend for a run on ``device``: gloo for CPU tensors, and NCCL for CUDA ones on CUDA.

    A CUDA run still reduces CPU tensors (the output folder's claim, logged steps, evaluation counts),
    which NCCL alone refuses ("No backend type associated with device type cpu"): one group with a
    backend per device type carries both.
    """
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


@contextmanager
def joined(device_choice: str) -> Iterator[Processes]:
    """This run's processes: joins torchrun's group (see :func:`group_backend`) and leaves it cleanly.

    After a run that succeeded, every rank meets the others at a barrier, so that no collective
    is still in flight anywhere, and then destroys the group. After an error nothing is torn
    down: waiting at a barrier for a failed peer would hang, and torchrun stops every rank anyway.
    A group the caller had already joined is left to the caller.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(device_choice)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owned = world > 1 and not dist.is_initialized()
    if owned:
        dist.init_process_group(group_backend(device))
    yield Processes(rank, world, device)
    if owned:
        dist.barrier()
        dist.destroy_process_group()


def end_process(code: int) -> int:
    """Return ``code``, except in a process torchrun launched: flush and end it at once with ``code``.

    DistributedDataParallel keeps its process group referenced after ``destroy_process_group``,
    so gloo's worker threads outlive it; one that frees a tensor while the interpreter shuts down
    aborts a finished run with SIGABRT ("terminate called without an active exception", seen on
    2 CPU cores about once in 50 runs). Skipping interpreter shutdown avoids that race; every
    file of the run is closed by then.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (identity in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_min(values: torch.Tensor) -> torch.Tensor:
    """The elementwise minimum of a tensor over processes (identity in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class TrainSampler(Sampler[int]):
    """This process's share of a permutation drawn from (seed, epoch), in whole batches.

    Every process gets the same number of whole batches; the images of the last partial batch
    of an epoch (fewer than world_size * batch_size) are left out of that epoch only, and a
    different set each epoch since the permutation changes. ``set_epoch(epoch, skip)`` skips
    the first ``skip`` batches, which is how a run resumed mid-epoch continues exactly.
    """

    def __init__(self, size: int, batch_size: int, processes: Processes, seed: int) -> None:
        self.size, self.batch_size, self.processes, self.seed = size, batch_size, processes, seed
        self.batches = size // (processes.world_size * batch_size)
        if self.batches == 0:
            raise ValueError(
                f"{size} training images are fewer than one batch of {batch_size} images "
                f"on each of {processes.world_size} process(es)"
            )
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    @property
    def unused_per_epoch(self) -> int:
        return self.size - self.batches * self.batch_size * self.processes.world_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        mine = order[self.processes.rank :: self.processes.world_size][: self.batches * self.batch_size]
        return iter(mine[self.skip * self.batch_size :].tolist())

    def __len__(self) -> int:
        return (self.batches - self.skip) * self.batch_size


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``, in order: each image evaluated exactly once."""

    def __init__(self, size: int, processes: Processes) -> None:
        self.indices = list(range(processes.rank, size, processes.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
