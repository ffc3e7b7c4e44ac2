"""Center loss (003 Eq. 1, SPEC §3): L_c = ½ Σ ||x_i − c_{y_i}||², one learned center per group
(training image), shared by the image and its captions so both are pulled to the same point.

`softmax_center_loss` is the joint supervision of Wen et al. (003's ref. [28]) that trains 003's
single network (`loss.name=softmax_center`): L = L_softmax + λ·L_c, the softmax being the instance loss
(instance.py: one class per training image, one classifier for both modalities), λ =
loss.center_weight. Both parts are computed whatever λ, so every parameter is used (DDP).

Per-sample terms: averaged over the global batch (counts summed over workers) and scaled by
world_size, so DDP's gradient average equals one process on the whole batch.
"""

from __future__ import annotations

from torch import Tensor

from itmatch.losses.gather import LOCAL, Gather, global_mean
from itmatch.losses.instance import instance_loss


def center_loss(img: Tensor, img_center: Tensor, txt: Tensor, txt_center: Tensor, *,
                gather: Gather = LOCAL) -> dict[str, Tensor]:
    """{"center_img", "center_txt"}: ½||x − c_y||² of each side's embeddings to their class centers
    (`*_center` are the centers' rows for each sample's class)."""
    return {"center_img": global_mean(0.5 * ((img.float() - img_center.float()) ** 2).sum(1), gather),
            "center_txt": global_mean(0.5 * ((txt.float() - txt_center.float()) ** 2).sum(1), gather)}


def softmax_center_loss(img: Tensor, img_logits: Tensor, img_center: Tensor, img_cls: Tensor, txt: Tensor,
                        txt_logits: Tensor, txt_center: Tensor, txt_cls: Tensor, *, center_weight: float,
                        gather: Gather = LOCAL) -> dict[str, Tensor]:
    """{"loss", "visual", "textual", "center_img", "center_txt"}: loss = visual + textual +
    center_weight · (center_img + center_txt); rows of each side are samples of class `*_cls`."""
    parts = {**instance_loss(img_logits, img_cls, txt_logits, txt_cls, gather=gather),
             **center_loss(img, img_center, txt, txt_center, gather=gather)}
    softmax, center = parts["visual"] + parts["textual"], parts["center_img"] + parts["center_txt"]
    return {**parts, "loss": softmax + center_weight * center}


__all__ = ["center_loss", "softmax_center_loss"]
