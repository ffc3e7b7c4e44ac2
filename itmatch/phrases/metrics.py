"""Phrase localization metrics (001 §4, §4.4) and 001 Eq. 8's image-sentence / region-phrase combination.

Localization: each phrase ranks the proposals of its own image by score; a proposal is a hit when
its IoU with the phrase's ground-truth box (plural chains: the enclosing box) is >= 0.5. Proposals
are given padded, per image ([I, P, 4] with an [I, P] validity mask, `entities.padded_proposals`)
or per phrase ([N, P, 4]); scores are [N, P] (padding ignored).

    phrase_r{1,5,10}   % of phrases whose best-ranked hit is within the top K
    phrase_upper       % of phrases with any hit among their proposals (001 Table 1's "R@200" bound)
    phrase_random_r1   the expected R@1 of a uniformly random ranking, computed exactly: the mean of
                       (hits / proposals) per phrase

Conventions, as in `itmatch.eval.retrieval`: percentages; ranks are pessimistic (a non-hit scored
equal to the best hit counts ahead of it, so a constant scorer gets no credit from ties) and a NaN
score ranks last; a phrase whose image has no proposals is a miss, never dropped. Every phrase of
the inputs counts (001 / Plummer's evaluation keeps all visual phrases).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from itmatch.phrases.boxes import HIT_IOU, as_boxes, box_iou

KS = (1, 5, 10)
EQ8_ALPHA = 0.2  # 001 §5.6: "We set α = 0.2"
_CHUNK = 2048


def _numpy(x, dtype=None) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def localization_hits(gt_boxes, proposals, *, phrase_image=None, valid=None,
                      iou_threshold: float = HIT_IOU) -> np.ndarray:
    """[N, P] bool: proposal p of phrase n's image has IoU >= `iou_threshold` with its box.
    `proposals`: [N, P, 4] per phrase, or [I, P, 4] per image with `phrase_image` ([N] rows into
    it); `valid` has the proposals' leading shape ([N, P] or [I, P]); invalid entries are never hits."""
    gt = as_boxes(_numpy(gt_boxes), "gt_boxes").reshape(-1, 4)
    props = as_boxes(_numpy(proposals), "proposals")
    if props.ndim != 3:
        raise ValueError(f"localization_hits: proposals must be [N or I, P, 4], got shape {props.shape}")
    ok = np.ones(props.shape[:2], bool) if valid is None else _numpy(valid, bool)
    if ok.shape != props.shape[:2]:
        raise ValueError(f"localization_hits: valid has shape {ok.shape}, proposals {props.shape}")
    rows = np.arange(len(gt)) if phrase_image is None else _numpy(phrase_image, np.int64)
    if rows.shape != (len(gt),) or (len(rows) and (rows.min() < 0 or rows.max() >= len(props))):
        raise ValueError(f"localization_hits: {len(gt)} phrases need {len(gt)} rows into the {len(props)} "
                         f"proposal rows (phrase_image), got {rows.shape}")
    hits = np.zeros((len(gt), props.shape[1]), bool)
    for lo in range(0, len(gt), _CHUNK):
        r = rows[lo:lo + _CHUNK]
        iou = box_iou(gt[lo:lo + _CHUNK, None, :], props[r])[:, 0, :]
        hits[lo:lo + _CHUNK] = (iou >= iou_threshold) & ok[r]
    return hits


def _check(scores, hits, valid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s, h = _numpy(scores, np.float64), _numpy(hits, bool)
    v = np.ones_like(h) if valid is None else _numpy(valid, bool)
    if s.ndim != 2 or s.shape != h.shape or v.shape != h.shape:
        raise ValueError(f"phrase metrics: scores {s.shape}, hits {h.shape} and valid {v.shape} must be one [N, P]")
    return s, h & v, v


def hit_ranks(scores, hits, valid=None) -> np.ndarray:
    """[N] float: the 1-based rank of each phrase's best-scored hit among its valid proposals
    (pessimistic: every valid non-hit not strictly below it counts ahead), inf where it has no hit."""
    s, h, v = _check(scores, hits, valid)
    best = np.where(h, s, -np.inf).max(axis=1, initial=-np.inf)  # NaN if a hit's score is NaN
    with np.errstate(invalid="ignore"):
        ahead = (v & ~h & ~(s < best[:, None])).sum(axis=1)
    return np.where(h.any(axis=1), 1.0 + ahead, np.inf)


def random_recall(n_hits, n_valid, k: int) -> np.ndarray:
    """Exact expected R@k (a fraction) of a uniformly random ranking: 1 - C(n - h, k) / C(n, k)
    per phrase with h hits among n proposals (0 where h = 0, 1 where k >= n - h + 1 and h > 0)."""
    h, n = _numpy(n_hits, np.float64), _numpy(n_valid, np.float64)
    miss = np.ones(np.broadcast(h, n).shape)
    for j in range(int(k)):
        left = n - j
        with np.errstate(invalid="ignore", divide="ignore"):
            miss = miss * np.where(left > 0, np.clip((left - h) / np.where(left > 0, left, 1), 0, 1), 1.0)
    return np.where(h > 0, 1.0 - miss, 0.0)


def localization_recall(scores, hits, valid=None, *, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """{phrase_r<k>..., phrase_upper, phrase_random_r1} from [N, P] scores, hits and validity."""
    s, h, v = _check(scores, hits, valid)
    if len(s) == 0:
        raise ValueError("phrase metrics: no phrases to evaluate")
    ranks = hit_ranks(s, h, v)
    out = {f"phrase_r{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}
    out["phrase_upper"] = float(100.0 * np.mean(h.any(axis=1)))
    out["phrase_random_r1"] = float(100.0 * np.mean(random_recall(h.sum(axis=1), v.sum(axis=1), 1)))
    return out


def phrase_localization_metrics(scores, gt_boxes, proposals, *, phrase_image=None, valid=None,
                                iou_threshold: float = HIT_IOU, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """001 §4's evaluation: [N, P] scores of each phrase against its image's proposals ->
    {phrase_r1, phrase_r5, phrase_r10, phrase_upper, phrase_random_r1} (percentages).
    `proposals`/`valid`/`phrase_image` as in `localization_hits`."""
    hits = localization_hits(gt_boxes, proposals, phrase_image=phrase_image, valid=valid, iou_threshold=iou_threshold)
    rows = np.arange(len(hits)) if phrase_image is None else _numpy(phrase_image, np.int64)
    ok = np.ones(hits.shape, bool) if valid is None else _numpy(valid, bool)[rows]
    return localization_recall(scores, hits, ok, ks=ks)


# --------------------------------------------------------------------------- 001 Eq. 8


def unit_distance(cos: Tensor) -> Tensor:
    """Euclidean distance of unit vectors from their cosine: sqrt(2 - 2 cos) (SPEC §2)."""
    return torch.sqrt(torch.clamp(2.0 - 2.0 * cos, min=0.0))


PairDistance = Callable[[Tensor, Tensor], Tensor]
"""(regions [i, R, D], phrases [m, D]) -> [i, m, R] region-phrase distances (lower is closer)."""


def cosine_pair_distance(regions: Tensor, phrases: Tensor) -> Tensor:
    """The embedding network's region-phrase distance: unit vectors' Euclidean distance."""
    return unit_distance(torch.einsum("ird,md->imr", regions, phrases.to(regions.dtype)))


def region_phrase_distance(region_emb: Tensor, phrase_emb: Tensor, phrase_sentence: Tensor, n_sentences: int, *,
                           region_valid: Tensor | None = None, budget: int = 2**24) -> Tensor:
    """001 Eq. 8's d_rp: [I, S], for image x and sentence y the mean over y's phrases of the
    distance from the phrase to its best-matching (nearest) region of x. Embeddings are unit
    vectors: region_emb [I, R, D] (padding marked False in region_valid [I, R]), phrase_emb
    [M, D], phrase_sentence [M] in [0, S). NaN where the sentence has no phrase or the image no
    region. Computed in blocks of at most `budget` region-phrase-dimension products."""
    n_images, R, D = region_emb.shape
    rows = torch.arange(n_images * R, device=region_emb.device).view(n_images, R)
    if region_valid is not None:
        rows = rows.masked_fill(~region_valid.bool(), -1)
    return sentence_region_distance(region_emb.reshape(-1, D), rows, phrase_emb, phrase_sentence, n_sentences,
                                    budget=budget)


def sentence_region_distance(region_emb: Tensor, image_regions: Tensor, phrase_emb: Tensor, phrase_sentence: Tensor,
                             n_sentences: int, *, pair_distance: Optional[PairDistance] = None,
                             budget: int = 2**24) -> Tensor:
    """001 Eq. 8's d_rp [I, S] with regions given as rows: region_emb [N, D], image_regions [I, R]
    rows into it per image (-1: padding), phrase_emb [M, D], phrase_sentence [M] in [0, S).
    `pair_distance` scores regions against phrases (default: `cosine_pair_distance`; a learned
    pair score turned into a distance for the similarity network). NaN where the sentence has no
    phrase or the image no region (`combine_distances` then keeps d). Blocks of images and of
    phrases hold at most `budget` region x phrase x dimension products (the similarity network's
    head runs on exactly that element-wise product)."""
    distance = pair_distance or cosine_pair_distance
    n_images, R = image_regions.shape
    M, D = phrase_emb.shape
    sent = phrase_sentence.long()
    count = torch.zeros(n_sentences, dtype=torch.float64, device=region_emb.device)
    count.index_add_(0, sent, torch.ones(M, dtype=torch.float64, device=region_emb.device))
    if R == 0 or M == 0:
        return torch.full((n_images, n_sentences), torch.nan, dtype=torch.float64, device=region_emb.device)
    m_step = max(1, min(M, budget // (R * D)))
    i_step = max(1, budget // (m_step * R * D))
    out = []
    for lo in range(0, n_images, i_step):
        rows = image_regions[lo:lo + i_step].long()
        valid = rows >= 0
        regions = region_emb[rows.clamp(min=0)]  # [i, R, D]
        best = torch.cat([distance(regions, phrase_emb[m:m + m_step]).double()
                          .masked_fill(~valid[:, None, :], torch.inf).amin(dim=2)
                          for m in range(0, M, m_step)], dim=1)  # [i, M]: each phrase's nearest region
        best = best.masked_fill(~valid.any(dim=1, keepdim=True), torch.nan)  # no region: nothing to match
        total = torch.zeros(len(rows), n_sentences, dtype=torch.float64, device=best.device)
        out.append(total.index_add_(1, sent, best) / count)  # 0 / 0 = NaN: a sentence without phrases
    return torch.cat(out) if out else torch.zeros(0, n_sentences, dtype=torch.float64)


def combine_distances(d: Tensor, d_rp: Tensor, alpha: float = EQ8_ALPHA) -> Tensor:
    """001 Eq. 8: D(x, y) = (1 - α) d(x, y) + α d_rp(x, y), [I, S] each (lower is closer). Where
    d_rp is NaN (a sentence without visual phrases, an image without regions) D = d: the
    region-phrase model has nothing to add there."""
    if d.shape != d_rp.shape:
        raise ValueError(f"combine_distances: d {tuple(d.shape)} and d_rp {tuple(d_rp.shape)} differ")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"combine_distances: alpha must be in [0, 1], got {alpha}")
    combined = (1.0 - alpha) * d + alpha * d_rp
    return torch.where(torch.isnan(d_rp), d, combined)


__all__ = ["KS", "EQ8_ALPHA", "localization_hits", "hit_ranks", "random_recall", "localization_recall",
           "phrase_localization_metrics", "unit_distance", "PairDistance", "cosine_pair_distance",
           "region_phrase_distance", "sentence_region_distance", "combine_distances"]
