"""Instance loss (004 §4.2, SPEC §3): every training image is a class, and one classifier W_share
scores both modalities, so an image and its captions must land on the same class:

    L_visual = −log softmax(W_share f_img)[c],   L_textual = −log softmax(W_share f_txt)[c]

Per-sample terms: nothing is gathered, but the mean is over the *global* batch (counts summed over
workers) and scaled by world_size, so DDP's gradient average equals one process on the whole batch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from itmatch.losses.gather import LOCAL, Gather, global_mean


def instance_loss(img_logits: Tensor, img_cls: Tensor, txt_logits: Tensor, txt_cls: Tensor, *,
                  gather: Gather = LOCAL) -> dict[str, Tensor]:
    """{"visual", "textual"}: cross-entropy of each side's logits [N, n_classes] against its class."""
    if img_logits.shape[1] != txt_logits.shape[1]:
        raise ValueError(f"one shared classifier: got {img_logits.shape[1]} and {txt_logits.shape[1]} classes")
    return {"visual": global_mean(F.cross_entropy(img_logits.float(), img_cls, reduction="none"), gather),
            "textual": global_mean(F.cross_entropy(txt_logits.float(), txt_cls, reduction="none"), gather)}


__all__ = ["instance_loss"]
