"""001 Algorithm 1's pair/triplet masks for one batch of region-phrase pairs (pure, numpy).

A batch holds B ground-truth phrase-region pairs (phrase b: its image, its coreference chain and
its chain's merged box) and a pool of R candidate regions (the proposals of the batch's images,
and the ground-truth regions themselves if the caller adds them), each with its image and box.
`algorithm1_masks` says, per phrase, which pool regions are

    positive  same image and IoU >= pos_iou (0.7) with the phrase's box: step 2's augmentation
              candidates, and step 3.c.ii's second positive for neighborhood sampling
    negative  same image and IoU < neg_iou (0.3): step 3.b's regions x' for the text-anchor triplets
              (y, x, x') and the similarity network's negative pairs (x', y)

and, per pair of phrases, which are negatives of each other: different chains (step 3.a's
(x, y, y'): y' from the batch "not in the same coreference chain as y"), and which are neighbours
(same chain, step 3.c.i). Hard-negative mining ("keep at most K = 30 with the highest non-negative
loss") is the loss's job: these masks say what may be mined. Chain ids must be unique across images
(`read_entities`' chain_id is). `sample_positive_regions` draws step 2's random augmented positive.
"""

from __future__ import annotations

import numpy as np

from itmatch.phrases.boxes import NEGATIVE_IOU, POSITIVE_IOU, as_boxes, box_iou


def algorithm1_masks(phrase_image, phrase_chain, phrase_box, region_image, region_box, *,
                     pos_iou: float = POSITIVE_IOU, neg_iou: float = NEGATIVE_IOU) -> dict[str, np.ndarray]:
    """Masks for B phrases and R pool regions: region_iou [B, R] (0 across images),
    region_positive / region_negative [B, R] bool, phrase_negative / phrase_neighbor [B, B] bool
    (a phrase is not its own neighbour)."""
    if not 0.0 <= neg_iou <= pos_iou <= 1.0:
        raise ValueError(f"algorithm1_masks: need 0 <= neg_iou <= pos_iou <= 1, got {neg_iou}, {pos_iou}")
    p_img, chain = np.asarray(phrase_image, np.int64), np.asarray(phrase_chain, np.int64)
    r_img = np.asarray(region_image, np.int64)
    p_box = as_boxes(phrase_box, "phrase_box").reshape(-1, 4)
    r_box = as_boxes(region_box, "region_box").reshape(-1, 4)
    if not (len(p_img) == len(chain) == len(p_box)) or len(r_img) != len(r_box):
        raise ValueError(f"algorithm1_masks: {len(p_img)} phrase images, {len(chain)} chains, {len(p_box)} phrase "
                         f"boxes; {len(r_img)} region images, {len(r_box)} region boxes")
    same_image = p_img[:, None] == r_img[None, :]
    iou = np.where(same_image, box_iou(p_box, r_box), 0.0)
    same_chain = chain[:, None] == chain[None, :]
    return {
        "region_iou": iou,
        "region_positive": same_image & (iou >= pos_iou),
        "region_negative": same_image & (iou < neg_iou),
        "phrase_negative": ~same_chain,
        "phrase_neighbor": same_chain & ~np.eye(len(chain), dtype=bool),
    }


def sample_positive_regions(region_positive, rng: np.random.Generator) -> np.ndarray:
    """Algorithm 1 step 2: per phrase a uniformly random positive region's column, -1 if none."""
    pos = np.asarray(region_positive, bool)
    counts = pos.sum(axis=1)
    pick = np.floor(rng.random(len(pos)) * np.maximum(counts, 1)).astype(np.int64)  # the pick-th positive
    cumulative = np.cumsum(pos, axis=1)
    column = np.argmax(cumulative > pick[:, None], axis=1)
    return np.where(counts > 0, column, -1)


__all__ = ["algorithm1_masks", "sample_positive_regions"]
