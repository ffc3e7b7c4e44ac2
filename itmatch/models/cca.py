"""Regularised CCA (the papers' linear baseline, SPEC §6): closed form, no training loop.

Each image feature is paired with each of its captions' features. With centred data,
C_xx + rI, C_yy + rI and C_xy, the projections are W_x = (C_xx + rI)^(-1/2) U and
W_y = (C_yy + rI)^(-1/2) V from the SVD U S Vᵀ of (C_xx + rI)^(-1/2) C_xy (C_yy + rI)^(-1/2);
S are the canonical correlations. Embeddings are the L2-normalised projections of the centred
features, compared by cosine, so the same retrieval code evaluates CCA and the trained networks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itmatch.data.batch import Batch
from itmatch.models.two_branch import TwoTower


class Projection(nn.Module):
    """x ↦ normalize((x − mean) W): a fixed (fitted, not trained) linear map."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(d_in))
        self.register_buffer("weight", torch.zeros(d_in, d_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize((x.to(self.weight.dtype) - self.mean) @ self.weight, dim=-1)


class CCAModel(TwoTower):
    """Two fitted projections (the branches) on the towers' features into one space; the same
    embedding interface as EmbeddingNet."""

    def __init__(self, image_dim: int, text_dim: int, dim: int) -> None:
        super().__init__()
        d_img, d_txt = self._towers(image_dim, text_dim)
        self.image, self.text = Projection(d_img, dim), Projection(d_txt, dim)
        self.register_buffer("correlations", torch.zeros(dim))

    def from_features(self, x_img: Tensor, x_txt: Tensor, batch: Batch) -> dict[str, Tensor]:
        return {"img": self.image(x_img), "txt": self.text(x_txt)}

    @torch.no_grad()
    def fit(self, images: Tensor, texts: Tensor, *, ridge: float) -> "CCAModel":
        """Fit on paired rows (images[i] describes texts[i]); float64 throughout."""
        (mx, wx), (my, wy), corr = fit_cca(images, texts, self.correlations.numel(), ridge)
        self.image.mean.copy_(mx), self.image.weight.copy_(wx)
        self.text.mean.copy_(my), self.text.weight.copy_(wy)
        self.correlations.copy_(corr)
        return self


def training_pairs(split) -> tuple[Tensor, Tensor]:
    """Every (image, caption) pair of a feature split as rows: what CCA is fitted on."""
    images = torch.from_numpy(split.image_feats[split.caption_image])  # fancy indexing copies
    return images, torch.tensor(split.caption_feats)  # a copy: the store's arrays are read-only


def _inv_sqrt(c: Tensor) -> Tensor:
    w, v = torch.linalg.eigh(c)
    return (v * w.rsqrt()) @ v.T


def fit_cca(x: Tensor, y: Tensor, dim: int, ridge: float) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], Tensor]:
    """((mean_x, W_x), (mean_y, W_y), correlations) of regularised CCA on paired rows."""
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"CCA needs paired rows: got {x.shape[0]} images and {y.shape[0]} texts")
    if not 1 <= dim <= min(x.shape[1], y.shape[1]):
        raise ValueError(f"CCA dim must be in [1, {min(x.shape[1], y.shape[1])}], got {dim}")
    if ridge <= 0:
        raise ValueError(f"CCA ridge must be > 0 (it keeps the covariances invertible), got {ridge}")
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    n = x.shape[0] - 1
    ax = _inv_sqrt(xc.T @ xc / n + ridge * torch.eye(x.shape[1], dtype=x.dtype))
    ay = _inv_sqrt(yc.T @ yc / n + ridge * torch.eye(y.shape[1], dtype=y.dtype))
    u, s, vh = torch.linalg.svd(ax @ (xc.T @ yc / n) @ ay)
    return (mx, ax @ u[:, :dim]), (my, ay @ vh.T[:, :dim]), s[:dim]


__all__ = ["CCAModel", "Projection", "fit_cca", "training_pairs"]
