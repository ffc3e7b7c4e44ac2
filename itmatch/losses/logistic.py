"""The similarity network's objective (001 §3.3, Eq. 7, SPEC §4): every caption is paired with its
image (z = +1) and with one image of another group (z = −1), and each pair's score p pays
log(1 + exp(−z·p)). Pairs are drawn within a worker's shard; the mean is over the global batch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from itmatch.losses.gather import LOCAL, Gather, global_mean


def logistic_loss(scores: Tensor, labels: Tensor, *, gather: Gather = LOCAL) -> dict[str, Tensor]:
    """001 Eq. 7: log(1 + exp(−z·p)) averaged over the global batch's pairs, z = +1 for positive
    and −1 for negative pairs; scaled by world_size like the other losses (DDP averages)."""
    z = labels.to(scores.dtype) * 2 - 1
    loss = global_mean(F.softplus(-z * scores), gather)
    return {"loss": loss, "logistic": loss.detach()}


def sample_pairs(img_gid: Tensor, txt_gid: Tensor, generator: Optional[torch.Generator] = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(image rows, text rows, labels): every caption with its image (positive) and with one image
    of another group drawn at random (negative), as 001 does. Captions whose image is the batch's
    only one get no negative."""
    match = txt_gid[:, None] == img_gid[None, :]  # [texts, images]
    own = match.float().argmax(dim=1)
    others = (~match).float()
    has_other = others.sum(1) > 0
    neg = torch.multinomial(others[has_other] + 0.0, 1, generator=generator).squeeze(1) if has_other.any() \
        else own.new_zeros(0)
    text_rows = torch.arange(len(txt_gid), device=txt_gid.device)
    image_rows = torch.cat([own, neg])
    text_idx = torch.cat([text_rows, text_rows[has_other]])
    labels = torch.cat([torch.ones_like(own), torch.zeros_like(neg)])
    return image_rows, text_idx, labels


__all__ = ["logistic_loss", "sample_pairs"]
