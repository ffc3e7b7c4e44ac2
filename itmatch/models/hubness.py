"""Hubness correction of a cross-modal similarity: CSLS (Conneau et al., 2018) with a fixed
reference bank of training embeddings (as QB-Norm's query bank, Bogolin et al., 2022).

In a high-dimensional joint space a few items ("hubs") are near many queries and crowd the top
ranks of unrelated ones. CSLS scores a pair by its cosine minus how close each side sits to the
other modality in general:

    score(i, t) = cos(i, t) - w * (r_I(i) + r_T(t)),
    r_I(i) = mean of the k largest cos(i, t') over the reference captions t',
    r_T(t) = mean of the k largest cos(t, i') over the reference images i'.

The reference is the training split's embeddings, fixed when the correction is fitted, so each
item's penalty depends on the item alone, not on the other test items (inductive: a gallery can
grow without changing anyone's score). The score is a dot product of augmented embeddings,

    image -> [e_i, 1, -w r_I(i)],   caption -> [e_t, -w r_T(t), 1],

so the evaluator, the registered MLflow model and serving rank by it unchanged (a user's own dot
product of the served embeddings is the corrected score). The first `core_dim` columns stay the
unit embedding (sentence-to-sentence retrieval uses them). Measured on five held-out folds of the
Flickr8k-1k features, chosen on validation (BENCHMARKS.md): CCA gains 0.6-2.5 % test rsum, the
search's registered ensemble 1.0-3.9 %.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: k (reference neighbours) x w (penalty weight) tried on validation; w = 0 is "off".
DEFAULT_GRID: tuple[tuple[int, float], ...] = tuple((k, w) for k in (10, 20, 50) for w in (0.25, 0.5))


class HubnessCorrection(nn.Module):
    """The CSLS penalty columns for embeddings of one model, from its reference bank."""

    def __init__(self, ref_images: Tensor, ref_texts: Tensor, k: int, weight: float) -> None:
        super().__init__()
        if ref_images.ndim != 2 or ref_texts.ndim != 2 or ref_images.shape[1] != ref_texts.shape[1]:
            raise ValueError(f"reference banks must be [n, d] of one width, got {tuple(ref_images.shape)} "
                             f"and {tuple(ref_texts.shape)}")
        if not (len(ref_images) and len(ref_texts)) or int(k) < 1 or not float(weight) >= 0:
            raise ValueError(f"hubness correction needs non-empty banks, k >= 1 and weight >= 0; got "
                             f"{len(ref_images)} / {len(ref_texts)} rows, k={k}, weight={weight}")
        self.register_buffer("ref_images", F.normalize(ref_images.float(), dim=-1))
        self.register_buffer("ref_texts", F.normalize(ref_texts.float(), dim=-1))
        self.k, self.weight = int(k), float(weight)

    @property
    def core_dim(self) -> int:
        return self.ref_images.shape[1]

    def _unit(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.core_dim:
            raise ValueError(f"the hubness bank is {self.core_dim} wide, the model's embeddings {x.shape[-1]}: "
                             "the correction belongs to another model")
        return F.normalize(x.float(), dim=-1)

    def images(self, e: Tensor) -> Tensor:
        e = self._unit(e)
        r = penalty(e, self.ref_texts, self.k)
        return torch.cat([e, torch.ones_like(r)[:, None], -self.weight * r[:, None]], dim=-1)

    def texts(self, t: Tensor) -> Tensor:
        t = self._unit(t)
        r = penalty(t, self.ref_images, self.k)
        return torch.cat([t, -self.weight * r[:, None], torch.ones_like(r)[:, None]], dim=-1)


def penalty(x: Tensor, bank: Tensor, k: int, block: int = 4096) -> Tensor:
    """Mean of each row's k largest cosines to the bank (k capped at the bank's size), in row
    blocks so a large batch never holds its whole score matrix."""
    k = min(k, len(bank))
    return torch.cat([(x[s:s + block] @ bank.T).topk(k, dim=1).values.mean(1) for s in range(0, len(x), block)]) \
        if len(x) else x.new_zeros(0)


@dataclass
class Choice:
    k: int
    weight: float
    score: float
    plain: float
    tried: list[tuple[int, float, float]]


def choose(img: Tensor, txt: Tensor, ref_images: Tensor, ref_texts: Tensor,
           score: Callable[[Tensor, Tensor], float], grid: Sequence[tuple[int, float]] = DEFAULT_GRID) -> Choice:
    """The (k, w) of `grid` with the best `score` (higher is better, e.g. validation rsum) of the
    corrected embeddings of a validation split `img`, `txt`; w = 0 (no correction) when none beats
    the plain embeddings."""
    plain = score(F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1))
    best = Choice(k=0, weight=0.0, score=plain, plain=plain, tried=[])
    for k, w in grid:
        corr = HubnessCorrection(ref_images, ref_texts, k, w)
        value = score(corr.images(img), corr.texts(txt))
        best.tried.append((k, w, value))
        if value > best.score:
            best.k, best.weight, best.score = k, w, value
    return best


def parse_setting(text: str) -> Optional[tuple[int, float]]:
    """A correction setting: 'off' -> None, 'auto' -> (0, 0.0) (chosen on validation), 'K,W' ->
    (K, W) fixed (K >= 1 reference neighbours, W > 0). ValueError naming the value otherwise."""
    if text in ("off", "auto"):
        return None if text == "off" else (0, 0.0)
    try:
        k, w = str(text).split(",")
        fixed = int(k), float(w)
    except ValueError:
        fixed = (0, -1.0)
    if fixed[0] < 1 or not 0 < fixed[1] < float("inf"):
        raise ValueError(f"hubness setting must be off, auto or K,W (K >= 1 reference neighbours, W > 0), got {text!r}")
    return fixed


def sample_rows(n: int, limit: int, seed: int = 0) -> Tensor:
    """Indices of at most `limit` of n rows (a seeded random subset, in order): a bounded bank for
    large training splits, chosen before anything is embedded."""
    if n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


__all__ = ["DEFAULT_GRID", "Choice", "HubnessCorrection", "choose", "parse_setting", "penalty", "sample_rows"]
