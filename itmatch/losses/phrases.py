"""The region-phrase batch's negatives for the pure losses (001 Algorithm 1, step 3.b and the
similarity network's pair sampling): masks computed from the batch's `Boxes`. Image-caption
batches carry no boxes and get None: every other group's candidate is a negative, as before."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from itmatch.data.batch import Batch
from itmatch.data.phrase_batch import region_negatives
from itmatch.losses.gather import Gather


def ranking_negatives(batch: Batch, gather: Gather) -> Optional[dict[str, Tensor]]:
    """{"t2i": [local phrases, global regions]}: a phrase's negative regions among every worker's
    (gathered, as the loss gathers their embeddings): same picture, IoU < 0.3. Collective when
    distributed; every rank calls it (all batches of a run carry boxes, or none does)."""
    b = batch.boxes
    if b is None:
        return None
    (regions,) = gather.layout(b.image_picture.shape[0])  # one exchange of counts for both tensors
    return {"t2i": region_negatives(b.text_picture, b.text_box, regions.cat_nograd(b.image_picture),
                                    regions.cat_nograd(b.image_box))}


def pair_negatives(batch: Batch) -> Optional[Tensor]:
    """[local phrases, local regions]: the regions a phrase's negative pairs are drawn from (pairs
    stay within a worker; a picture's regions are all on its phrases' worker)."""
    b = batch.boxes
    return None if b is None else region_negatives(b.text_picture, b.text_box, b.image_picture, b.image_box)


__all__ = ["ranking_negatives", "pair_negatives"]
