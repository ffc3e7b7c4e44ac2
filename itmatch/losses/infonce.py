"""Symmetric contrastive InfoNCE with group-aware positives (SPEC §3: the CLIP-style baseline).

With several captions per image, a plain CLIP loss would treat an image's other captions as
negatives. Here every positive pair (a, p) is its own softmax over {p} ∪ negatives(a):

    ℓ(a, p) = −s(a,p)/τ + log( exp(s(a,p)/τ) + Σ_{n ∉ group(a)} exp(s(a,n)/τ) )

so other positives are neither negatives nor competitors. One logsumexp over each anchor's
negatives serves all of its positives: memory is O(local anchors × global candidates), and the
anchors are this worker's rows while the candidates come from `gather` (every worker's rows).
"""

from __future__ import annotations

import torch
from torch import Tensor

from itmatch.losses.gather import LOCAL, Gather, reduction_scale


def _direction(anchor: Tensor, anchor_gid: Tensor, cand: Tensor, cand_gid: Tensor, temperature: float) -> Tensor:
    """Σ over positive pairs of ℓ(a, p) for local anchors against global candidates."""
    logits = anchor @ cand.T / temperature
    same = anchor_gid[:, None] == cand_gid[None, :]
    # The lowest finite value, not -inf: an anchor without negatives then gets ℓ = 0 and a zero
    # (not NaN) gradient.
    neg_lse = torch.logsumexp(logits.masked_fill(same, torch.finfo(logits.dtype).min), dim=1, keepdim=True)
    per_pair = torch.logaddexp(logits, neg_lse) - logits
    return torch.where(same, per_pair, torch.zeros_like(per_pair)).sum()


def infonce_loss(
    img: Tensor,
    img_gid: Tensor,
    txt: Tensor,
    txt_gid: Tensor,
    *,
    temperature: float = 0.05,
    weights: tuple[float, float] = (1.0, 1.0),
    reduction: str = "mean",
    gather: Gather = LOCAL,
) -> dict[str, Tensor]:
    """Image→text and text→image InfoNCE over the global batch.

    Args:
        img, txt: [N, d] L2-normalised embeddings of this worker (the anchors).
        img_gid, txt_gid: group ids; equal ids are positives of each other.
        temperature: τ of the softmax.
        weights: weights of the (i2t, t2i) directions.
        reduction: "mean" divides by the global number of positive pairs P (per direction),
            "sum" keeps the sum. Either is multiplied by gather.world_size for DDP averaging.
        gather: supplies every worker's rows as candidates.

    Returns:
        {"loss": weighted total, "i2t", "t2i": reduced directions}.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    images, texts = gather.layout(img.shape[0], txt.shape[0])  # every worker's counts, exchanged once
    img_all, txt_all = images.cat(img), texts.cat(txt)
    img_gid_all, txt_gid_all = images.cat_nograd(img_gid), texts.cat_nograd(txt_gid)
    scale = reduction_scale(img_gid, txt_gid_all, reduction, gather, img)
    out = {
        "i2t": _direction(img, img_gid, txt_all, txt_gid_all, temperature) * scale,
        "t2i": _direction(txt, txt_gid, img_all, img_gid_all, temperature) * scale,
    }
    out["loss"] = weights[0] * out["i2t"] + weights[1] * out["t2i"]
    return out


__all__ = ["infonce_loss"]
