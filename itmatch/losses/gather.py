"""How a batch-level loss sees the other workers' embeddings.

Losses score *local* anchors against *global* candidates. A `Gather` supplies the global
candidates; `LocalGather` is the single-process identity. The distributed implementation
(all_gather with gradients routed back to the owner) belongs here too, so that this module and
trainers/dist.py are the only places that call torch.distributed.
"""

from __future__ import annotations

from typing import Protocol

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


LOCAL = LocalGather()

__all__ = ["Gather", "LocalGather", "LOCAL"]
