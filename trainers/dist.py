"""This worker's rank, world size and device under Ray Train. The collectives themselves live in
itmatch.dist, the one module that calls torch.distributed."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WorkerContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def worker_context() -> WorkerContext:
    """This worker's place in the Ray Train group (or a single process outside Ray)."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        rank, world, local = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    except (ImportError, RuntimeError, AttributeError):
        rank, world, local = 0, 1, 0
    if torch.cuda.is_available():
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    return WorkerContext(rank, world, local, device)


__all__ = ["WorkerContext", "worker_context"]
