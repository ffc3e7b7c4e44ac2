"""Chunked cross-modal retrieval metrics (SPEC §5).

Conventions: recalls are percentages; ranks are 1-based ranks of the first correct item; a query
image hits at K if any of its captions is in its top K; a caption hits if its image is. Ranks are
pessimistic: every wrong item that is not strictly below the correct one counts ahead of it, so ties
count against the query (a collapsed model, every embedding equal, ranks last rather than first)
and a NaN score ranks last. The positive's score is always read from the same score block as the
negatives it is compared with, so GEMM rounding cannot make an item beat itself.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

ScoreFn = Callable[[Tensor, Tensor], Tensor]
KS = (1, 5, 10)


def _scores(queries: Tensor, gallery: Tensor, score_fn: Optional[ScoreFn], chunk: int) -> Tensor:
    """[q, G] scores of a query block against the whole gallery, the gallery blocked too for score_fn."""
    if score_fn is None:
        return queries @ gallery.T
    return torch.cat([score_fn(queries, gallery[j:j + chunk]) for j in range(0, len(gallery), chunk)], dim=1)


def _ahead(s: Tensor, correct: Tensor, exclude: Tensor) -> Tensor:
    """Per row, the wrong items not strictly below the correct score: ties and NaNs count against
    the query (`~(s < c)` is True for NaN on either side)."""
    return (~(s < correct) & ~exclude).sum(dim=1)


def _summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    out = {f"{prefix}_r{k}": float(100.0 * np.mean(ranks <= k)) for k in KS}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)))  # VSE++'s convention: an integer rank
    out[f"{prefix}_meanr"] = float(np.mean(ranks))
    return out


def i2t_ranks(img: Tensor, txt: Tensor, txt_img: Tensor, *, chunk: int = 1024,
              score_fn: Optional[ScoreFn] = None) -> np.ndarray:
    """Rank of each captioned image's best caption among all captions."""
    queries = torch.unique(txt_img)
    ranks = []
    for start in range(0, len(queries), chunk):
        rows = queries[start:start + chunk]
        s = _scores(img[rows], txt, score_fn, chunk)
        positive = txt_img[None, :] == rows[:, None]
        best = torch.where(positive, s, torch.full_like(s, -torch.inf)).max(dim=1, keepdim=True).values
        ranks.append(_ahead(s, best, positive) + 1)
    return torch.cat(ranks).cpu().numpy()


def t2i_ranks(img: Tensor, txt: Tensor, txt_img: Tensor, *, chunk: int = 1024,
              score_fn: Optional[ScoreFn] = None) -> np.ndarray:
    """Rank of each caption's own image among all images."""
    ranks = []
    for start in range(0, len(txt), chunk):
        own = txt_img[start:start + chunk]
        if score_fn is None:
            s = txt[start:start + chunk] @ img.T
        else:  # score_fn takes (images, texts): score blocks of images against this caption block
            s = torch.cat([score_fn(img[j:j + chunk], txt[start:start + chunk]).T for j in range(0, len(img), chunk)],
                          dim=1)
        own_column = torch.zeros_like(s, dtype=torch.bool).scatter_(1, own[:, None], True)
        ranks.append(_ahead(s, s.gather(1, own[:, None]), own_column) + 1)
    return torch.cat(ranks).cpu().numpy()


def retrieval_metrics(img: Tensor, txt: Tensor, txt_img: Tensor, *, chunk: int = 1024,
                      score_fn: Optional[ScoreFn] = None) -> dict[str, float]:
    """R@1/5/10, median and mean rank both ways, and rsum; never holds more than a chunk of scores."""
    txt_img = txt_img.long()
    out = _summary(i2t_ranks(img, txt, txt_img, chunk=chunk, score_fn=score_fn), "i2t")
    out.update(_summary(t2i_ranks(img, txt, txt_img, chunk=chunk, score_fn=score_fn), "t2i"))
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in KS)
    return out


def coco_protocols(img: Tensor, txt: Tensor, txt_img: Tensor, *, fold_size: int = 1000, chunk: int = 1024,
                   score_fn: Optional[ScoreFn] = None) -> dict[str, float]:
    """COCO "1K": mean over consecutive folds of `fold_size` images (remainder images left out);
    "5K": everything at once. Keys are prefixed 1k_ and 5k_."""
    txt_img = txt_img.long()
    out = {f"5k_{k}": v for k, v in retrieval_metrics(img, txt, txt_img, chunk=chunk, score_fn=score_fn).items()}
    folds = []
    for f in range(max(len(img) // fold_size, 1)):
        lo, hi = f * fold_size, min((f + 1) * fold_size, len(img))
        keep = (txt_img >= lo) & (txt_img < hi)
        folds.append(retrieval_metrics(img[lo:hi], txt[keep], txt_img[keep] - lo, chunk=chunk, score_fn=score_fn))
    out.update({f"1k_{k}": float(np.mean([m[k] for m in folds])) for k in folds[0]})
    return out


def sentence_retrieval(txt: Tensor, txt_gid: Tensor, *, chunk: int = 1024) -> dict[str, float]:
    """001 Table 4: a caption retrieves the other captions of its image (itself excluded)."""
    txt_gid = txt_gid.long()
    ranks = []
    for start in range(0, len(txt), chunk):
        q = torch.arange(start, min(start + chunk, len(txt)))
        s = txt[q] @ txt.T
        positive = txt_gid[None, :] == txt_gid[q, None]
        positive[torch.arange(len(q)), q] = False
        has = positive.any(dim=1)
        best = torch.where(positive, s, torch.full_like(s, -torch.inf)).max(dim=1, keepdim=True).values
        itself = torch.zeros_like(positive).scatter_(1, q[:, None], True)  # never retrieves itself
        r = _ahead(s, best, positive | itself) + 1
        ranks.append(r[has])
    return _summary(torch.cat(ranks).cpu().numpy(), "s2s")


def pair_cosines(img: Tensor, txt: Tensor, txt_img: Tensor, *, max_pairs: int = 2_000_000,
                 seed: int = 0) -> tuple[Tensor, Tensor]:
    """(every positive pair's cosine, a seeded sample of up to `max_pairs` negative pairs' cosines)."""
    txt_img = txt_img.long()
    pos = (img[txt_img] * txt).sum(dim=1)
    g = torch.Generator().manual_seed(seed)
    n = min(max_pairs, len(img) * len(txt))
    i = torch.randint(len(img), (n,), generator=g)
    j = torch.randint(len(txt), (n,), generator=g)
    neg_mask = txt_img[j] != i
    neg = (img[i[neg_mask]] * txt[j[neg_mask]]).sum(dim=1)
    return pos, neg


def overlap_of(pos: Tensor, neg: Tensor, *, bins: int = 200) -> float:
    """004 Eq. 10: ∫ min(P, Q) of the two cosine histograms on [-1, 1] (lower is better)."""
    p = torch.histc(pos.float().clamp(-1, 1), bins=bins, min=-1, max=1)
    q = torch.histc(neg.float().clamp(-1, 1), bins=bins, min=-1, max=1)
    return float(torch.minimum(p / p.sum(), q / q.sum()).sum())


def overlap_indicator(img: Tensor, txt: Tensor, txt_img: Tensor, *, bins: int = 200,
                      max_pairs: int = 2_000_000, seed: int = 0) -> float:
    """004 Eq. 10: overlap of the positive- and negative-pair cosine histograms on [-1, 1] (lower is better)."""
    return overlap_of(*pair_cosines(img, txt, txt_img, max_pairs=max_pairs, seed=seed), bins=bins)


def format_metrics(m: dict[str, float]) -> str:
    """One line for progress logs."""
    return (f"i2t {m['i2t_r1']:.1f}/{m['i2t_r5']:.1f}/{m['i2t_r10']:.1f} "
            f"t2i {m['t2i_r1']:.1f}/{m['t2i_r5']:.1f}/{m['t2i_r10']:.1f} rsum {m['rsum']:.1f} "
            f"medr {m['i2t_medr']:g}/{m['t2i_medr']:g}")
