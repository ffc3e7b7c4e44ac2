"""Bi-directional ranking loss with neighborhood constraints and top-K hard-negative mining.

SPEC §3, 001 Eq. 6:

    L = λ1 Σ[m + d(x_i, y_j) − d(x_i, y_k)]+      image anchor, text positive/negative
      + λ2 Σ[m + d(x_j', y_i') − d(x_k', y_i')]+  text anchor, image positive/negative
      + λ3 Σ[m + d(x_i, x_j) − d(x_i, x_k)]+      image anchor, other images of its group
      + λ4 Σ[m + d(y_i', y_j') − d(y_i', y_k')]+  text anchor, other texts of its group

For every (anchor, positive) pair only the `top_k` largest positive hinges over the negatives are
kept (top_k=1 with cosine is VSE++ max-violation; top_k=None sums every hinge).

A negative is every candidate of another group, unless the caller narrows a term's negatives with a
[local anchor, global candidate] mask (`negatives`): 001 Algorithm 1 takes a phrase's negative
regions only from its own picture with IoU < 0.3 (itmatch.data.phrase_batch.region_negatives).

Memory strategy. A hinge m + c(a,p) − c(a,n) (c = distance, or −similarity for cosine) falls as the
negative's cost c(a,n) rises, so for every positive of anchor a the K largest hinges are against the
same K *nearest negatives of a*: one top-K of each anchor's negative costs serves all of its
positives, and the kept hinges form an [anchor, positives-per-anchor, K] block. With top_k=None,
one sort serves them all: n_viol = #negatives with cost < m + c(a,p) (searchsorted), and the
violators' hinges sum to n_viol·(m + c(a,p)) − prefix_sum[n_viol]. The only [anchor, candidate]
tensors are the similarities and, without a graph, the costs the K nearest are picked from:
O(local × global) memory, never an [anchor, pos, neg] cube. Positives are [anchor, P] column
tables, not [anchor, candidate] masks, and only the picked P + K costs per anchor are recomputed
with a graph, so the backward is one GEMM per side plus a scatter (same gradients, bit for bit).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from itmatch.groups import group_columns
from itmatch.losses.gather import LOCAL, Gather, reduction_scale

# Keeps sqrt's gradient finite when two embeddings coincide (d = 0).
_EPS = 1e-12
_METRICS = ("euclidean", "cosine")
_REDUCTIONS = ("sum", "mean")
_TERMS = ("i2t", "t2i", "i2i", "t2t")


def _cost_of(sim: Tensor, metric: str) -> Tensor:
    """Cost whose *increase* makes a pair less similar, elementwise from cosine similarities.

    euclidean: distance on the unit sphere, sqrt(2 − 2cos). cosine: −similarity, so the VSE++
    hinge m + s(a,n) − s(a,p) has the same form m + cost(a,p) − cost(a,n) as the distance one.
    """
    if metric == "euclidean":
        return torch.sqrt(torch.clamp(2.0 - 2.0 * sim, min=_EPS))
    return -sim


def _negated_negative_costs(sim: Tensor, same: Tensor, same_valid: Tensor, metric: str) -> Tensor:
    """−cost of every negative, −inf elsewhere, without a graph: what the K nearest negatives are
    picked from. In place on one buffer; bit for bit −_cost_of(sim) (−2s + 2 is 2 − 2s exactly)."""
    out = torch.mul(sim, -2.0) if metric == "euclidean" else sim.clone()
    if metric == "euclidean":
        out.add_(2.0).clamp_min_(_EPS).sqrt_().neg_()
    rows = torch.arange(len(sim), device=sim.device)[:, None].expand_as(same)
    out.view(-1).index_fill_(0, (rows * sim.shape[1] + same)[same_valid], float("-inf"))
    return out


def _nearest_negative_costs(sim: Tensor, same: Tensor, same_valid: Tensor, top_k: int, metric: str,
                            allowed: Tensor | None = None) -> Tensor:
    """[n_anchor, K] costs of each anchor's K nearest negatives (+inf where it has fewer than K);
    `allowed` ([n_anchor, n_cand] bool) narrows the negatives to its True entries.

    The K are picked on a detached copy; only their K costs are recomputed with a graph, so the
    backward touches K entries per anchor instead of passing through every [anchor, candidate]
    elementwise op (the costs and gradients are the same as a top-k through the full cost matrix).
    """
    with torch.no_grad():
        negated = _negated_negative_costs(sim, same, same_valid, metric)
        if allowed is not None:
            negated.masked_fill_(~allowed, float("-inf"))
        picked = torch.topk(negated, top_k, dim=1)
    cost = _cost_of(sim.gather(1, picked.indices), metric)
    return cost.masked_fill(torch.isinf(picked.values), float("inf"))


def _all_violations_sum(cost: Tensor, thresh: Tensor, valid: Tensor, same: Tensor, same_valid: Tensor,
                        allowed: Tensor | None = None) -> Tensor:
    """Σ over positive pairs of every positive hinge thresh − c(a, n) over the negatives n."""
    # Non-negatives become +inf: never a violator, zero hinge, zero gradient.
    rows = torch.arange(len(cost), device=cost.device)[:, None].expand_as(same)
    flat = (rows * cost.shape[1] + same)[same_valid]
    masked = cost.reshape(-1).index_fill(0, flat, float("inf")).view_as(cost)
    if allowed is not None:
        masked = masked.masked_fill(~allowed, float("inf"))
    # Sort each anchor's negatives once; n_viol = #negatives below the threshold, and the violators'
    # costs sum to a prefix sum.
    neg_sorted = torch.sort(masked, dim=1).values
    n_viol = torch.searchsorted(neg_sorted.detach(), thresh.detach().contiguous(), right=False)
    # float64 prefix sums: n·thresh − prefix cancels, which in float32 would lose the small
    # hinge values once thousands of negatives are summed (a large global batch).
    finite = torch.where(torch.isfinite(neg_sorted), neg_sorted, torch.zeros_like(neg_sorted))
    prefix = F.pad(torch.cumsum(finite.double(), dim=1), (1, 0))
    per_pair = n_viol.double() * thresh.double() - prefix.gather(1, n_viol)
    return torch.where(valid, per_pair, torch.zeros_like(per_pair)).sum().to(cost.dtype)


def _term(
    anchor: Tensor,
    anchor_gid: Tensor,
    cand: Tensor,
    cand_gid: Tensor,
    self_offset: int | None,
    *,
    margin: float,
    top_k: int | None,
    metric: str,
    allowed: Tensor | None = None,
) -> Tensor:
    """Unreduced sum of kept hinges for local anchors against global candidates: over positive
    pairs (a, p), the top_k largest positive hinges m + c(a,p) − c(a,n), n a negative of a (another
    group's candidate, and one that `allowed` [anchor, candidate] admits, when given).

    Positives and same-group candidates are [anchor, P] column tables (`group_columns`), never
    [anchor, candidate] masks. With `self_offset` (intra-modal terms) the anchor's own candidate
    row, global index self_offset + r, is not its own positive.
    """
    itself = None if self_offset is None else torch.arange(len(anchor), device=anchor.device) + self_offset
    pos, valid = group_columns(anchor_gid, cand_gid, exclude=itself)
    if not valid.any():
        # Keeps the graph (every rank must run the same backward) without scoring anything.
        return (anchor.sum() + cand.sum()) * 0.0
    same, same_valid = group_columns(anchor_gid, cand_gid)
    sim = anchor @ cand.T
    thresh = margin + _cost_of(sim.gather(1, pos), metric)  # hinge(a, p, n) > 0  <=>  c(a, n) < thresh[a, p]
    if top_k is None or top_k >= cand.shape[0]:
        return _all_violations_sum(_cost_of(sim, metric), thresh, valid, same, same_valid, allowed)
    # The K largest hinges of every positive are against the anchor's K nearest negatives.
    nearest = _nearest_negative_costs(sim, same, same_valid, top_k, metric, allowed)  # [n_anchor, K]
    hinge = (thresh[:, :, None] - nearest[:, None, :]).clamp_min(0)  # [n_anchor, P_max, K]
    return torch.where(valid[:, :, None], hinge, torch.zeros_like(hinge)).sum()


def _check_args(
    img: Tensor, img_gid: Tensor, txt: Tensor, txt_gid: Tensor,
    lambdas: tuple[float, ...], top_k: int | None, metric: str, reduction: str,
    negatives: Mapping[str, Tensor] | None = None,
) -> None:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if len(lambdas) != 4:
        raise ValueError(f"lambdas must have 4 entries (i2t, t2i, i2i, t2t), got {lambdas}")
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"img and txt must be [N, d] with equal d, got {img.shape}, {txt.shape}")
    if img_gid.shape != img.shape[:1] or txt_gid.shape != txt.shape[:1]:
        raise ValueError("img_gid / txt_gid must hold one group id per row")
    unknown = sorted(set(negatives or {}) - set(_TERMS))
    if unknown:
        raise ValueError(f"negatives: unknown term(s) {unknown}; terms are {_TERMS}")


def ranking_loss(
    img: Tensor,
    img_gid: Tensor,
    txt: Tensor,
    txt_gid: Tensor,
    *,
    lambdas: tuple[float, float, float, float] = (1.0, 1.5, 0.0, 0.0),
    margin: float = 0.05,
    top_k: int | None = 10,
    metric: str = "euclidean",
    reduction: str = "mean",
    gather: Gather = LOCAL,
    negatives: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Bi-directional ranking loss with neighborhood constraints (001 Eq. 6), SPEC §3.

    Args:
        img: [Ni, d] L2-normalised image embeddings, this worker's rows (the anchors).
        img_gid: [Ni] int64 group ids; rows sharing a group id are positives of each other.
        txt: [Nt, d] L2-normalised text embeddings, this worker's rows.
        txt_gid: [Nt] int64 group ids.
        lambdas: weights of the (i2t, t2i, i2i, t2t) terms; a term with weight 0 is not computed.
        margin: hinge margin m.
        top_k: hinges kept per (anchor, positive) pair, largest first; None keeps all.
        metric: "euclidean" (d = sqrt(2 − 2cos)) or "cosine" (VSE++ dot-product hinge).
        reduction: "sum" of kept hinges, or "mean": every term divided by P, the number of
            positive (image, text) pairs in the global batch (the same P for all four terms).
        gather: supplies the global candidates; anchors stay local (O(local × global) memory).
        negatives: per term name ("i2t", "t2i", "i2i", "t2t"), a [local anchors, global candidates]
            bool mask of the candidates that may be an anchor's negatives (besides being of another
            group); terms without one take every other group's candidate.

    Both reductions are multiplied by gather.world_size so that DDP's gradient averaging matches
    the single-process loss; with LOCAL the factor is 1.

    Returns:
        {"loss": λ-weighted total, "i2t", "t2i", "i2i", "t2t": unweighted reduced terms}.
    """
    _check_args(img, img_gid, txt, txt_gid, lambdas, top_k, metric, reduction, negatives)
    images, texts = gather.layout(img.shape[0], txt.shape[0])  # every worker's counts, exchanged once
    img_all, txt_all = images.cat(img), texts.cat(txt)
    img_gid_all, txt_gid_all = images.cat_nograd(img_gid), texts.cat_nograd(txt_gid)
    img_off, txt_off = images.offset(img.shape[0]), texts.offset(txt.shape[0])

    # (anchor, anchor_gid, candidates, candidate_gid, self offset or None for cross-modal)
    setups = {
        "i2t": (img, img_gid, txt_all, txt_gid_all, None),
        "t2i": (txt, txt_gid, img_all, img_gid_all, None),
        "i2i": (img, img_gid, img_all, img_gid_all, img_off),
        "t2t": (txt, txt_gid, txt_all, txt_gid_all, txt_off),
    }
    scale = reduction_scale(img_gid, txt_gid_all, reduction, gather, img)
    out: dict[str, Tensor] = {}
    total = img.new_zeros(())
    for name, lam in zip(_TERMS, lambdas):
        if lam == 0:
            out[name] = img.new_zeros(())
            continue
        allowed = (negatives or {}).get(name)
        if allowed is not None and allowed.shape != (setups[name][0].shape[0], setups[name][2].shape[0]):
            raise ValueError(f"negatives[{name!r}] has shape {tuple(allowed.shape)}, expected [local anchors, "
                             f"global candidates] = {(setups[name][0].shape[0], setups[name][2].shape[0])}")
        term = _term(*setups[name], margin=margin, top_k=top_k, metric=metric, allowed=allowed) * scale
        out[name] = term
        total = total + lam * term
    out["loss"] = total
    return out


__all__ = ["ranking_loss"]
