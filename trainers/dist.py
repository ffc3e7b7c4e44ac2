"""This worker's rank, world size and device under Ray Train. The collectives themselves live in
itmatch.dist, the one module that calls torch.distributed."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WorkerContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    node_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def spans_nodes(self) -> bool:
        return self.local_world_size < self.world_size


def worker_context(use_gpu: bool = False) -> WorkerContext:
    """This worker's place in the Ray Train group (or a single process outside Ray); with `use_gpu`
    a GPU is required (NCCL on CPU tensors fails far from the cause)."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        rank, world, local = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
        node, on_node = ctx.get_node_rank(), ctx.get_local_world_size()
    except (ImportError, RuntimeError, AttributeError):
        rank, world, local, node, on_node = 0, 1, 0, 0, 1
    if torch.cuda.is_available():
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    if use_gpu and device.type != "cuda":
        raise RuntimeError(f"scaling.use_gpu=true but Ray Train worker {rank} sees no GPU "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return WorkerContext(rank, world, local, device, node, on_node)


def local_context(use_gpu: bool) -> WorkerContext:
    """The one worker of a job that trains in its own process (trainers/in_process.py): rank 0 of 1,
    on the first GPU Ray gave this process (CUDA_VISIBLE_DEVICES) or the CPU."""
    device = torch.device("cuda", 0) if use_gpu and torch.cuda.is_available() else torch.device("cpu")
    if use_gpu and device.type != "cuda":
        raise RuntimeError("scaling.use_gpu=true but this process sees no GPU")
    return WorkerContext(0, 1, 0, device)


__all__ = ["WorkerContext", "local_context", "worker_context"]
