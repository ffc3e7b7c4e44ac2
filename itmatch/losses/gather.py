"""How a batch-level loss sees the other workers' embeddings.

Losses score *local* anchors against *global* candidates. A `Gather` supplies the global
candidates; `LocalGather` is the single-process identity. The distributed implementation
(all_gather with gradients routed back to the owner) is `itmatch.dist.DistGather`, the one module
that calls torch.distributed.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class Gather(Protocol):
    world_size: int

    def cat(self, t: Tensor) -> Tensor:
        """Every worker's rows of `t`, concatenated in rank order; gradients reach the owner."""

    def cat_nograd(self, t: Tensor) -> Tensor:
        """Same as `cat` for tensors that need no gradient (group ids)."""

    def offset(self, n_local: int) -> int:
        """Global row index of this worker's first local row in `cat` output."""

    def sum(self, t: Tensor) -> Tensor:
        """Sum of a (detached) tensor over workers."""

    def layout(self, *n_local: int) -> tuple["Gather", ...]:
        """One `Gather` per local row count (e.g. images, captions), each for the tensors of that many
        rows, with every worker's counts exchanged once for all of them."""


class LocalGather:
    """One process holds the whole batch."""

    world_size = 1

    def cat(self, t: Tensor) -> Tensor:
        return t

    def cat_nograd(self, t: Tensor) -> Tensor:
        return t

    def offset(self, n_local: int) -> int:
        return 0

    def sum(self, t: Tensor) -> Tensor:
        return t

    def layout(self, *n_local: int) -> tuple["LocalGather", ...]:
        return tuple(self for _ in n_local)


LOCAL = LocalGather()


def reduction_scale(img_gid: Tensor, txt_gid_all: Tensor, reduction: str, gather: Gather, like: Tensor) -> Tensor:
    """Factor applied to every term's local sum of a batch loss.

    DDP averages gradients over workers, so each worker's share is multiplied by world_size:
    the averaged gradient then equals that of the single-process loss. For "mean" the divisor P
    is the global number of positive (image, text) pairs, shared by all terms so their weights keep
    their relative size. P = 0 gives scale 0 (terms are zero, never NaN).
    """
    world = float(gather.world_size)
    if reduction == "sum":
        return like.new_tensor(world)
    n_pos = (img_gid[:, None] == txt_gid_all[None, :]).sum().to(like.dtype)
    p_global = gather.sum(n_pos.detach())
    # Tensor ops rather than `if p_global > 0`: no host sync on CUDA.
    return torch.where(p_global > 0, world / p_global.clamp_min(1.0), torch.zeros_like(p_global))

def global_mean(per_sample: Tensor, gather: Gather) -> Tensor:
    """Mean of a per-sample loss over the *global* batch (counts summed over workers), times
    world_size so that DDP's gradient average equals one process on the whole batch."""
    count = gather.sum(per_sample.new_tensor(float(per_sample.numel()))).clamp_min(1.0)
    return per_sample.sum() * gather.world_size / count


__all__ = ["Gather", "LocalGather", "LOCAL", "reduction_scale", "global_mean"]
