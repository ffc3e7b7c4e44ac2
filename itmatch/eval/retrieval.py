"""Chunked cross-modal retrieval metrics (SPEC §5).

Conventions: recalls are percentages; ranks are 1-based ranks of the first correct item; a query
image hits at K if any of its captions is in its top K; a caption hits if its image is. Ranks are
pessimistic: every wrong item that is not strictly below the correct one counts ahead of it, so ties
count against the query (a collapsed model, every embedding equal, ranks last rather than first)
and a NaN score ranks last. The positive's score is always read from the same score block as the
negatives it is compared with, so GEMM rounding cannot make an item beat itself.

Speed (5K images x 25K captions is GEMM-bound): a query's correct items are a handful of columns,
gathered from the score block through a [query, P] index table (`group_columns`) rather than found
with [query, gallery] masks; the wrong items ahead are "all items not below the best correct one"
minus the correct (and excluded) ones, so the only full-width pass besides the GEMM is one
comparison into a reused byte buffer, counted in int32. Score blocks are sized to stay in cache.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from itmatch.groups import group_columns

ScoreFn = Callable[[Tensor, Tensor], Tensor]
KS = (1, 5, 10)
# Bytes of one [rows, gallery] score block. 16 MiB keeps the block, its comparison bytes and the
# GEMM's working set in a server CPU's last-level cache; measured on the 2-core sandbox, larger
# blocks (page faults and DRAM traffic) made the ranking pass slower, not faster.
BLOCK_BYTES = 16 * 2**20


def _block_rows(chunk: int, gallery: int, dtype: torch.dtype) -> int:
    """Query rows per score block: at most `chunk`, and at most BLOCK_BYTES of scores."""
    return max(1, min(chunk, BLOCK_BYTES // max(1, gallery * dtype.itemsize)))


# Comparison bytes are counted as int64 words, 8 bytes each, in runs of 255 words: a byte lane then
# sums to at most 255 and never carries into the next, and adding the 8 lanes gives the exact count.
# (A bool or uint8 sum widens every byte to int64 and cost 3x the comparison itself.)
_RUN = 255
_LANES = 8


class _Blocks:
    """Reused [rows, gallery] score and comparison buffers: a fresh block per chunk would be
    page-faulted in again every time (large CPU allocations are not cached)."""

    def __init__(self, rows: int, gallery: int, like: Tensor) -> None:
        self.gallery = gallery
        self.scores = torch.empty(rows, gallery, dtype=like.dtype, device=like.device)
        width = -(-gallery // (_LANES * _RUN)) * _LANES * _RUN  # whole runs; the padding stays False
        self.below = torch.zeros(rows, width, dtype=torch.bool, device=like.device)
        self.shifts = torch.arange(0, 8 * _LANES, 8, device=like.device)

    def scores_of(self, queries: Tensor, gallery: Tensor, score_fn: Optional[ScoreFn], chunk: int) -> Tensor:
        """[q, G] scores of a query block against the whole gallery, the gallery blocked too for score_fn."""
        if score_fn is None:
            return torch.mm(queries, gallery.T, out=self.scores[:len(queries)])
        return torch.cat([score_fn(queries, gallery[j:j + chunk]) for j in range(0, len(gallery), chunk)], dim=1)

    def not_below(self, s: Tensor, best: Tensor) -> Tensor:
        """Per row, the items whose score is not strictly below `best` (NaN on either side is not
        below): one comparison, its bytes counted a word at a time."""
        n = len(s)
        torch.lt(s, best, out=self.below[:n, :self.gallery])
        runs = self.below[:n].view(torch.int64).view(n, -1, _RUN).sum(dim=2)
        below = ((runs[..., None] >> self.shifts) & 0xFF).sum(dim=(1, 2))
        return self.gallery - below


def _ranks(blocks: _Blocks, s: Tensor, correct: Tensor, valid: Tensor, excluded: Tensor) -> Tensor:
    """1 + the wrong items not strictly below the best correct score (`correct`: [q, P] scores read
    from s, `valid` marking real entries; `excluded`: [q, E] scores of items that are neither
    correct nor wrong). A NaN correct score makes the best NaN, so every item counts ahead."""
    best = correct.masked_fill(~valid, -torch.inf)
    best = best.amax(dim=1, keepdim=True) if best.shape[1] else best.new_full((len(s), 1), -torch.inf)
    not_wrong = torch.cat([~(correct < best) & valid, ~(excluded < best)], dim=1).sum(dim=1)
    return (blocks.not_below(s, best) - not_wrong + 1).long()


def _summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    out = {f"{prefix}_r{k}": float(100.0 * np.mean(ranks <= k)) for k in KS}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)))  # VSE++'s convention: an integer rank
    out[f"{prefix}_meanr"] = float(np.mean(ranks))
    return out


def i2t_ranks(img: Tensor, txt: Tensor, txt_img: Tensor, *, chunk: int = 1024,
              score_fn: Optional[ScoreFn] = None) -> np.ndarray:
    """Rank of each captioned image's best caption among all captions."""
    queries = torch.unique(txt_img)
    cols, valid = group_columns(queries, txt_img)
    rows = _block_rows(chunk, len(txt), img.dtype)
    blocks, ranks = _Blocks(rows, len(txt), img), []
    for start in range(0, len(queries), rows):
        every = len(queries) == len(img)  # then queries[i] == i: a slice, not a copy of rows
        q = img[start:start + rows] if every else img.index_select(0, queries[start:start + rows])
        s = blocks.scores_of(q, txt, score_fn, chunk)
        c, v = cols[start:start + rows], valid[start:start + rows]
        ranks.append(_ranks(blocks, s, s.gather(1, c), v, s[:, :0]))
    return torch.cat(ranks).cpu().numpy()


def t2i_ranks(img: Tensor, txt: Tensor, txt_img: Tensor, *, chunk: int = 1024,
              score_fn: Optional[ScoreFn] = None) -> np.ndarray:
    """Rank of each caption's own image among all images."""
    rows = _block_rows(chunk, len(img), img.dtype)
    blocks, ranks = _Blocks(rows, len(img), img), []
    for start in range(0, len(txt), rows):
        own = txt_img[start:start + rows, None]
        if score_fn is None:
            s = blocks.scores_of(txt[start:start + rows], img, None, chunk)
        else:  # score_fn takes (images, texts): score blocks of images against this caption block
            s = torch.cat([score_fn(img[j:j + chunk], txt[start:start + rows]).T for j in range(0, len(img), chunk)],
                          dim=1)
        ranks.append(_ranks(blocks, s, s.gather(1, own), torch.ones_like(own, dtype=torch.bool), s[:, :0]))
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
    """001 Table 4: a caption retrieves the other captions of its image (itself excluded). {} where
    no image has two captions: nothing to retrieve, and NaN recalls would be invalid JSON."""
    txt_gid = txt_gid.long()
    itself = torch.arange(len(txt), device=txt.device)
    cols, valid = group_columns(txt_gid, txt_gid, exclude=itself)
    if not bool(valid.any()):
        return {}
    rows = _block_rows(chunk, len(txt), txt.dtype)
    blocks, ranks = _Blocks(rows, len(txt), txt), []
    for start in range(0, len(txt), rows):
        q = itself[start:start + rows, None]
        s = blocks.scores_of(txt[start:start + rows], txt, None, chunk)
        v = valid[start:start + rows]
        r = _ranks(blocks, s, s.gather(1, cols[start:start + rows]), v, s.gather(1, q))  # never retrieves itself
        ranks.append(r[v.any(dim=1)])  # a caption alone in its group has nothing to retrieve
    return _summary(torch.cat(ranks).cpu().numpy(), "s2s")


def pair_cosines(img: Tensor, txt: Tensor, txt_img: Tensor, *, max_pairs: int = 2_000_000,
                 seed: int = 0) -> tuple[Tensor, Tensor]:
    """(every positive pair's cosine, a seeded sample of up to `max_pairs` negative pairs' cosines)."""
    txt_img = txt_img.long()
    pos = (img[txt_img] * txt).sum(dim=1)
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same sample on any device
    n = min(max_pairs, len(img) * len(txt))
    i = torch.randint(len(img), (n,), generator=g).to(img.device)
    j = torch.randint(len(txt), (n,), generator=g).to(img.device)
    neg_mask = txt_img[j] != i
    return pos, _sampled_cosines(img, txt, i[neg_mask], j[neg_mask])


def _sampled_cosines(img: Tensor, txt: Tensor, i: Tensor, j: Tensor, *, block_scores: int = 1 << 24,
                     dense_ratio: int = 256) -> Tensor:
    """(img[i] * txt[j]).sum(1), read off image-block x all-caption score matrices, one matmul per
    block (blocks hold <= block_scores): gathering two d-wide rows per pair reads n x d x 8 bytes
    (16 GB for 2M pairs at d = 1024), which the matmul beats even where it computes every score of
    a 5,000 x 25,000 split to use 2M of them (bench/run_end.py: 5.8 s against 32 s for chunked
    gathers). Only where the pairs are very few among all (> dense_ratio x n in all, about where
    the two cost the same here) are they gathered, in chunks."""
    if len(img) * len(txt) > dense_ratio * max(1, len(i)):
        step = max(1, block_scores // max(1, img.shape[1]))
        return torch.cat([(img[i[k:k + step]] * txt[j[k:k + step]]).sum(dim=1) for k in range(0, len(i), step)]) \
            if len(i) else img.new_zeros(0)
    out = torch.empty(len(i), dtype=torch.result_type(img, txt), device=img.device)
    rows = max(1, block_scores // max(1, len(txt)))
    for start in range(0, len(img), rows):
        sel = (i >= start) & (i < start + rows)
        if sel.any():
            scores = img[start:start + rows] @ txt.T
            out[sel] = scores[i[sel] - start, j[sel]]
    return out


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
    """One line for progress logs (phrase localization's, for its metrics)."""
    if "phrase_r1" in m:
        from itmatch.eval.phrases import format_phrase_metrics

        return format_phrase_metrics(m)
    line = (f"i2t {m['i2t_r1']:.1f}/{m['i2t_r5']:.1f}/{m['i2t_r10']:.1f} "
            f"t2i {m['t2i_r1']:.1f}/{m['t2i_r5']:.1f}/{m['t2i_r10']:.1f} rsum {m['rsum']:.1f} "
            f"medr {m['i2t_medr']:g}/{m['t2i_medr']:g}")
    if "eq8_rsum" in m:  # 001 Eq. 8's combination with a region-phrase model (itmatch/eval/eq8.py)
        line += (f" | Eq. 8: i2t {m['eq8_i2t_r1']:.1f}/{m['eq8_i2t_r5']:.1f}/{m['eq8_i2t_r10']:.1f} "
                 f"t2i {m['eq8_t2i_r1']:.1f}/{m['eq8_t2i_r5']:.1f}/{m['eq8_t2i_r10']:.1f} rsum {m['eq8_rsum']:.1f}")
    return line
