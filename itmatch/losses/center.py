"""Center loss (003 Eq. 1, SPEC §3): L_c = ½ Σ ||x_i − c_{y_i}||², one learned center per group
(training image), shared by the image and its captions so both are pulled to the same point.

Per-sample terms: averaged over the global batch (counts summed over workers) and scaled by
world_size, so DDP's gradient average equals one process on the whole batch.
"""

from __future__ import annotations

from torch import Tensor

from itmatch.losses.gather import LOCAL, Gather, global_mean


def center_loss(img: Tensor, img_center: Tensor, txt: Tensor, txt_center: Tensor, *,
                gather: Gather = LOCAL) -> dict[str, Tensor]:
    """{"center_img", "center_txt"}: ½||x − c_y||² of each side's embeddings to their class centers
    (`*_center` are the centers' rows for each sample's class)."""
    return {"center_img": global_mean(0.5 * ((img.float() - img_center.float()) ** 2).sum(1), gather),
            "center_txt": global_mean(0.5 * ((txt.float() - txt_center.float()) ** 2).sum(1), gather)}


__all__ = ["center_loss"]
