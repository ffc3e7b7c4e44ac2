"""001 Algorithm 1's mini-batch for phrase localization, built from one worker's phrase rows.

The sampler (batching.py) picks ~data.batch_size ground-truth region-phrase pairs per global batch
(step 1; with neighborhood sampling two phrases of a region together, 3.c.i) and gives each worker
whole pictures. For its phrases a worker's batch holds, as image rows,

    the ground-truth region of every phrase's chain            group id: the chain's region id
    augmented positives (step 2): per phrase, data.augment_positives proposals of its picture with
        IoU >= 0.7 to its box, drawn at random each step (null: all; 0: none)   group id: the chain's
    the negative pool (step 3.b): the proposals of the batch's pictures with IoU < 0.3 to the box
        of some batch phrase of that picture                    group id: unique, negative

and as text rows the phrases (group id: their chain). Positives share a group id, as for image-caption
batches, so the ranking loss's phrase anchors have their ground truth and augmented regions as
positives and its region anchors the phrases of their chain; step 3.a's "phrases not in the same
chain" are exactly the other groups. A phrase's negative regions are narrower than "every other
group": same picture and IoU < 0.3 (3.b) — `region_negatives`, from the batch's `Boxes`, which the
objective applies over the global batch (losses/phrases.py). Hard-negative mining (the top K)
is the loss's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from torch import Tensor

from itmatch.data.batch import Batch, Boxes, Prepare, caption_items
from itmatch.phrases.boxes import NEGATIVE_IOU, POSITIVE_IOU
from itmatch.phrases.sampling import algorithm1_masks

if TYPE_CHECKING:  # phrase_store builds its batches here
    from itmatch.data.phrase_store import PhraseSplit


def augmented_positives(positive: np.ndarray, k: Optional[int], rng: np.random.Generator) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """Step 2: for each phrase (row of `positive` [B, R]) up to k of its positive columns drawn
    uniformly without replacement (k None: all of them) -> (phrase rows [A], columns [A])."""
    if k == 0 or positive.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    draw = np.where(positive, rng.random(positive.shape), np.inf)  # positives in random order first
    order = np.argsort(draw, axis=1, kind="stable")
    order = order if k is None else order[:, :k]
    phrase, slot = np.nonzero(np.take_along_axis(positive, order, axis=1))
    return phrase.astype(np.int64), order[phrase, slot].astype(np.int64)


def algorithm1_rows(split: "PhraseSplit", phrases: np.ndarray, augment: Optional[int],
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The region rows of these phrases' batch and their group ids (module docstring), in the order
    ground truths, augmented positives, negative pool."""
    phrases = np.asarray(phrases, np.int64)
    pictures = np.unique(split.phrase_picture[phrases])
    pool = split.proposal_rows[pictures]
    pool = pool[pool >= 0]
    masks = algorithm1_masks(split.phrase_picture[phrases], split.caption_gid[phrases], split.phrase_box[phrases],
                             split.region_picture[pool], split.region_box[pool], pos_iou=POSITIVE_IOU,
                             neg_iou=NEGATIVE_IOU)
    truth = np.unique(split.caption_image[phrases])
    who, column = augmented_positives(masks["region_positive"], augment, rng)
    # Two phrases of one chain may draw the same proposal: one row serves both.
    extra = np.unique(np.stack([pool[column], split.caption_gid[phrases][who]]), axis=1).reshape(2, -1)
    negatives = pool[masks["region_negative"].any(axis=0)]
    rows = np.concatenate([truth, extra[0], negatives])
    gid = np.concatenate([split.image_ids[truth], extra[1], split.image_ids[negatives]])
    return rows, gid


def phrase_batch(split: "PhraseSplit", phrases: np.ndarray, prepare_image: Prepare, prepare_text: Prepare, *,
                 augment: Optional[int] = 1, train: bool = False, rng: Optional[np.random.Generator] = None) -> Batch:
    """The Batch of these phrase rows of a PhraseSplit (one worker's whole pictures), with the
    rows' pictures and boxes; `rng` draws the augmented positives (seeded per step by the caller)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    phrases = np.asarray(phrases, np.int64)
    rows, gid = algorithm1_rows(split, phrases, augment, rng)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    boxes = Boxes(image_picture=t(split.region_picture[rows]), image_box=t(split.region_box[rows]),
                  text_picture=t(split.phrase_picture[phrases]), text_box=t(split.phrase_box[phrases]))
    return Batch(images=prepare_image(split.images_at(rows), train=train, rng=rng),
                 texts=prepare_text(caption_items(split, prepare_text, phrases), train=train, rng=rng),
                 image_gid=t(gid), text_gid=t(split.caption_gid[phrases]), image_cls=t(rows),
                 text_cls=t(split.caption_image[phrases]), boxes=boxes)


def region_negatives(text_picture: Tensor, text_box: Tensor, image_picture: Tensor, image_box: Tensor, *,
                     neg_iou: float = NEGATIVE_IOU) -> Tensor:
    """[texts, regions] bool: region r may serve as a negative of phrase t (Algorithm 1 step 3.b):
    it lies in t's picture and its IoU with t's box is < neg_iou. IoU in float64 (boxes are pixels:
    the threshold compares like `itmatch.phrases.boxes.box_iou`)."""
    a, b = text_box.double()[:, None, :], image_box.double()[None, :, :]
    inter = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp_min(0).prod(-1)
    area = lambda x: (x[..., 2:] - x[..., :2]).clamp_min(0).prod(-1)  # noqa: E731
    union = area(a) + area(b) - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1e-300), torch.zeros_like(union))
    return (text_picture[:, None] == image_picture[None, :]) & (iou < neg_iou)


__all__ = ["augmented_positives", "algorithm1_rows", "phrase_batch", "region_negatives"]
