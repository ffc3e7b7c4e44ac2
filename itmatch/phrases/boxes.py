"""Boxes: IoU, merging a plural entity's boxes, and labelling proposals against a ground truth.

Convention (the one every function here and every table of this subpackage uses): a box is
`(x1, y1, x2, y2)` in pixels, 0-based and **exclusive** (half-open): pixel column i covers
[i, i + 1), so a box holding pixel columns 3..7 is x1 = 3, x2 = 8, its width is x2 - x1 and its
area (x2 - x1) * (y2 - y1). A box with x2 <= x1 or y2 <= y1 is empty (area 0).

Flickr30K Entities stores PASCAL-VOC boxes: 1-based and **inclusive** (xmin..xmax are the first and
last pixel columns, width xmax - xmin + 1), and the evaluation code 001 uses (Plummer et al.,
pl-clc `getIOU.m`) computes IoU inclusively, with the "+1" widths. `from_inclusive` converts such a
box to this convention (x1 = xmin - 1, x2 = xmax for 1-based input), after which the exclusive IoU
here equals that inclusive IoU exactly: widths, intersections and unions are the same numbers.
`box_iou(..., inclusive=True)` computes the "+1" IoU directly on boxes left in the inclusive form.
"""

from __future__ import annotations

import numpy as np

POSITIVE_IOU = 0.7  # 001 §4.1 / Algorithm 1: extra positives (augmentation)
NEGATIVE_IOU = 0.3  # 001 §4.1 / Algorithm 1: negatives from the same image
HIT_IOU = 0.5  # 001 §4: a proposal localises a phrase at test time


def as_boxes(boxes, what: str = "boxes") -> np.ndarray:
    """`boxes` as a float64 [..., 4] array; anything else is a ValueError naming `what`."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.ndim == 1 and array.size == 0:
        array = array.reshape(0, 4)
    if array.shape[-1:] != (4,):
        raise ValueError(f"{what}: expected boxes of shape [..., 4] (x1, y1, x2, y2), got shape {array.shape}")
    return array


def box_area(boxes, *, inclusive: bool = False) -> np.ndarray:
    """Area of each box ([..., 4] -> [...]); empty boxes have area 0."""
    b = as_boxes(boxes)
    one = 1.0 if inclusive else 0.0
    return np.clip(b[..., 2] - b[..., 0] + one, 0, None) * np.clip(b[..., 3] - b[..., 1] + one, 0, None)


def box_iou(a, b, *, inclusive: bool = False) -> np.ndarray:
    """Pairwise IoU: [N, 4] x [M, 4] -> [N, M] float64 (any leading shapes: [..., N, 4] x [..., M, 4]
    broadcast to [..., N, M]). Two empty boxes, or boxes that do not overlap, have IoU 0.
    `inclusive=True` reads boxes as inclusive pixel ranges (the "+1" widths of VOC / Plummer's eval)."""
    a, b = as_boxes(a, "a"), as_boxes(b, "b")
    one = 1.0 if inclusive else 0.0
    lo = np.maximum(a[..., :, None, :2], b[..., None, :, :2])
    hi = np.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = np.clip(hi - lo + one, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a, inclusive=inclusive)[..., :, None] + box_area(b, inclusive=inclusive)[..., None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def paired_iou(a, b, *, inclusive: bool = False) -> np.ndarray:
    """Element-wise IoU of matching rows: [..., 4] x [..., 4] -> [...] (broadcasting)."""
    a, b = as_boxes(a, "a"), as_boxes(b, "b")
    return box_iou(a[..., None, :], b[..., None, :], inclusive=inclusive)[..., 0, 0]


def from_inclusive(boxes, *, one_based: bool = True) -> np.ndarray:
    """Inclusive pixel ranges (VOC / Flickr30K Entities XML: 1-based; `flickr30k_entities_utils.py`
    output: 0-based) -> this module's 0-based exclusive boxes."""
    b = as_boxes(boxes).copy()
    shift = 1.0 if one_based else 0.0
    b[..., :2] -= shift
    b[..., 2:] += 1.0 - shift
    return b


def to_inclusive(boxes, *, one_based: bool = True) -> np.ndarray:
    """The inverse of `from_inclusive` (for writing VOC-style XML)."""
    b = as_boxes(boxes).copy()
    shift = 1.0 if one_based else 0.0
    b[..., :2] += shift
    b[..., 2:] -= 1.0 - shift
    return b


def enclosing_box(boxes) -> np.ndarray:
    """The smallest box containing all of `boxes` ([M, 4] -> [4], M >= 1): how 001 (footnote 2,
    after Plummer et al.) turns a plural entity's instance boxes into one ground-truth box."""
    b = as_boxes(boxes).reshape(-1, 4)
    if len(b) == 0:
        raise ValueError("enclosing_box: no boxes to enclose")
    return np.concatenate([b[:, :2].min(axis=0), b[:, 2:].max(axis=0)])


def merge_boxes(boxes, groups) -> tuple[np.ndarray, np.ndarray]:
    """Merge boxes by group: ([M, 4] boxes, [M] group keys) -> (the sorted unique keys [G],
    each key's enclosing box [G, 4]). Vectorised (one sort and two reduceat passes)."""
    b = as_boxes(boxes).reshape(-1, 4)
    keys = np.asarray(groups)
    if keys.shape != (len(b),):
        raise ValueError(f"merge_boxes: {len(b)} boxes but groups has shape {keys.shape}")
    if len(b) == 0:
        return keys[:0], b[:0]
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    lo = np.minimum.reduceat(b[order, :2], starts, axis=0)
    hi = np.maximum.reduceat(b[order, 2:], starts, axis=0)
    return sorted_keys[starts], np.concatenate([lo, hi], axis=1)


def label_proposals(proposals, gt_boxes, *, pos_iou: float = POSITIVE_IOU,
                    neg_iou: float = NEGATIVE_IOU) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label proposals against ground-truth boxes of the same image (001 §4.1, Algorithm 1):
    ([P, 4] proposals, [G, 4] ground truths) -> (iou [G, P], positive [G, P], negative [G, P]) where
    positive = IoU >= pos_iou (extra positives for augmentation) and negative = IoU < neg_iou
    (background regions); proposals in between are neither. (001's text says "> 0.7" in §4.1 and
    "≥ 0.7" in Algorithm 1; SPEC §1 takes ≥.)"""
    if not 0.0 <= neg_iou <= pos_iou <= 1.0:
        raise ValueError(f"label_proposals: need 0 <= neg_iou <= pos_iou <= 1, got neg_iou={neg_iou}, "
                         f"pos_iou={pos_iou}")
    iou = box_iou(as_boxes(gt_boxes, "gt_boxes").reshape(-1, 4), as_boxes(proposals, "proposals").reshape(-1, 4))
    return iou, iou >= pos_iou, iou < neg_iou


def clip_boxes(boxes, width: float, height: float) -> np.ndarray:
    """Boxes clipped to the image [0, width] x [0, height]."""
    b = as_boxes(boxes).copy()
    b[..., 0::2] = np.clip(b[..., 0::2], 0, width)
    b[..., 1::2] = np.clip(b[..., 1::2], 0, height)
    return b


__all__ = ["POSITIVE_IOU", "NEGATIVE_IOU", "HIT_IOU", "as_boxes", "box_area", "box_iou", "paired_iou",
           "from_inclusive", "to_inclusive", "enclosing_box", "merge_boxes", "label_proposals", "clip_boxes"]
