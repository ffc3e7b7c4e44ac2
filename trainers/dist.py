"""Rank, world size, device and metric reductions: the trainer's only torch.distributed calls."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


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


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def mean_over_workers(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalars over workers so every rank reports the same numbers."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    t /= torch_dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def any_worker(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (e.g. a non-finite loss)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item() > 0)
