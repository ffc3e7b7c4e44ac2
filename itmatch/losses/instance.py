"""Instance loss (004 §4.2, SPEC §3): every training image is a class, and one classifier W_share
scores both modalities, so an image and its captions must land on the same class:

    L_visual = −log softmax(W_share f_img)[c],   L_textual = −log softmax(W_share f_txt)[c]

Per-sample terms: nothing is gathered, but the mean is over the *global* batch (counts summed over
workers) and scaled by world_size, so DDP's gradient average equals one process on the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from itmatch.losses.gather import LOCAL, Gather


def _global_mean_ce(logits: Tensor, labels: Tensor, gather: Gather) -> Tensor:
    total = F.cross_entropy(logits.float(), labels, reduction="sum")
    count = gather.sum(logits.new_tensor(float(labels.numel())))
    return total * gather.world_size / count.clamp_min(1.0)


def instance_loss(img_logits: Tensor, img_cls: Tensor, txt_logits: Tensor, txt_cls: Tensor, *,
                  gather: Gather = LOCAL) -> dict[str, Tensor]:
    """{"visual", "textual"}: cross-entropy of each side's logits [N, n_classes] against its class."""
    if img_logits.shape[1] != txt_logits.shape[1]:
        raise ValueError(f"one shared classifier: got {img_logits.shape[1]} and {txt_logits.shape[1]} classes")
    return {"visual": _global_mean_ce(img_logits, img_cls, gather),
            "textual": _global_mean_ce(txt_logits, txt_cls, gather)}


__all__ = ["instance_loss"]
