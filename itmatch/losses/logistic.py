"""The similarity network's objective (001 §3.3, Eq. 7, SPEC §4): every caption is paired with its
image (z = +1) and with one image of another group (z = −1) — a phrase with each of its regions and,
per such pair, one negative region of its picture (Algorithm 1) — and each pair's score p pays
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


def sample_pairs(img_gid: Tensor, txt_gid: Tensor, generator: Optional[torch.Generator] = None, *,
                 negatives: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(image rows, text rows, labels): every positive pair (a caption and an image of its group:
    its image; a phrase and each of its regions) once, and for each one negative pair, the text with
    an image drawn at random among those of another group, as 001 does; `negatives` ([texts,
    images] bool) narrows them (Algorithm 1: a phrase's regions of its picture with IoU < 0.3).
    A positive pair whose text has no negative gets none."""
    match = txt_gid[:, None] == img_gid[None, :]  # [texts, images]
    pos_text, pos_image = match.nonzero(as_tuple=True)  # text order: one pair per caption for retrieval
    others = ~match if negatives is None else negatives & ~match
    others = others[pos_text].float()
    has_other = others.sum(1) > 0
    neg = torch.multinomial(others[has_other] + 0.0, 1, generator=generator).squeeze(1) if has_other.any() \
        else pos_image.new_zeros(0)
    image_rows = torch.cat([pos_image, neg])
    text_idx = torch.cat([pos_text, pos_text[has_other]])
    labels = torch.cat([torch.ones_like(pos_image), torch.zeros_like(neg)])
    return image_rows, text_idx, labels


__all__ = ["logistic_loss", "sample_pairs"]
