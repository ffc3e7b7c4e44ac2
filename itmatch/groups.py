"""Group tables shared by the mined loss and retrieval: for each query, the candidate columns of
its group (its positives), found by sorting ids rather than by [query, candidate] masks."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def group_columns(query_gid: Tensor, cand_gid: Tensor, *, exclude: Optional[Tensor] = None,
                  pad: int = 0) -> tuple[Tensor, Tensor]:
    """Per query, the candidate columns sharing its group id, ascending: ([n_query, P_max] indices
    padded with `pad`, [n_query, P_max] validity). `exclude` names one candidate column per query to
    leave out (itself, for intra-modal retrieval); it is skipped only if it is in the query's group.
    Costs a sort of the candidates' ids, never an [n_query, n_cand] tensor."""
    order = torch.argsort(cand_gid, stable=True)
    sorted_gid, query_gid = cand_gid[order].contiguous(), query_gid.contiguous()
    lo = torch.searchsorted(sorted_gid, query_gid)
    count = torch.searchsorted(sorted_gid, query_gid, right=True) - lo
    skip = torch.full_like(lo, torch.iinfo(lo.dtype).max)  # position in the group's run to step over
    if exclude is not None:
        sorted_pos = torch.empty_like(order)
        sorted_pos[order] = torch.arange(len(order), device=order.device)
        own = cand_gid[exclude] == query_gid
        skip = torch.where(own, sorted_pos[exclude] - lo, skip)
        count = count - own.long()
    k = torch.arange(int(count.max()) if count.numel() else 0, device=lo.device)
    at = lo[:, None] + k + (k >= skip[:, None])
    valid = k < count[:, None]
    cols = order[at.clamp(max=max(len(order) - 1, 0))] if len(order) else at
    return torch.where(valid, cols, torch.full_like(cols, pad)), valid


__all__ = ["group_columns"]
