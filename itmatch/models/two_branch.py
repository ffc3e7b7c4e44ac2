"""The two-branch embedding network (001 §3.2).

Branch: Linear(d_in→h) → ReLU → Dropout → Linear(h→d) → BatchNorm1d(d) → L2-normalise.
The linear variant is Linear(d_in→d) → L2. Similarity is the dot product of unit vectors.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itmatch.config import ModelConfig


class Branch(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int, *, dropout: float = 0.5, linear: bool = False) -> None:
        super().__init__()
        if linear:
            self.net: nn.Module = nn.Linear(d_in, d_out)
        else:
            self.net = nn.Sequential(
                nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                # No bias before BatchNorm: BN subtracts it again, so its gradient is zero up to
                # rounding, and Adam would turn that rounding noise into full-size random steps.
                nn.Linear(hidden, d_out, bias=False), nn.BatchNorm1d(d_out),
            )

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=-1)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(f, normalize(f)): the feature before L2 normalisation, and the embedding."""
        f = self.net(x)
        return f, F.normalize(f, dim=-1)


class EmbeddingNet(nn.Module):
    """Image and text branches into one unit-sphere space.

    Optional training heads, over `n_classes` classes (one per training image):
    - "instance": the instance loss's classifier W_share (004 §4.2), one bias-free linear map
      applied to both modalities' features f before L2 normalisation (P = softmax(W_shareᵀ f); on
      the unit sphere the logits would be bounded by |W| and a 1-of-N softmax would barely move);
    - "center": one learned center per class in the embedding space, shared by both modalities
      (the center loss of 003).
    With heads, forward takes the samples' classes and also returns a dict of what the heads
    produce; they live in the model so every backend (DDP, DeepSpeed ZeRO-3 included) sees their
    parameters used inside forward.
    """

    def __init__(self, image_dim: int, text_dim: int, cfg: ModelConfig, n_classes: int = 0,
                 heads: tuple[str, ...] = ("instance",)) -> None:
        super().__init__()
        linear = cfg.branch == "linear"
        self.image = Branch(image_dim, cfg.hidden_dim, cfg.embed_dim, dropout=cfg.dropout, linear=linear)
        self.text = Branch(text_dim, cfg.hidden_dim, cfg.embed_dim, dropout=cfg.dropout, linear=linear)
        with_heads = n_classes > 0
        self.classifier = nn.Linear(cfg.embed_dim, n_classes, bias=False) if with_heads and "instance" in heads else None
        self.centers = nn.Embedding(n_classes, cfg.embed_dim) if with_heads and "center" in heads else None
        self.dims = (image_dim, text_dim)

    def forward(self, images: Tensor, texts: Tensor, img_cls: Optional[Tensor] = None,
                txt_cls: Optional[Tensor] = None) -> tuple:
        if self.classifier is None and self.centers is None:
            return self.image(images), self.text(texts)
        (f_img, img), (f_txt, txt) = self.image.features(images), self.text.features(texts)
        extras: dict[str, Tensor] = {}
        if self.classifier is not None:
            extras.update(img_logits=self.classifier(f_img), txt_logits=self.classifier(f_txt))
        if self.centers is not None and img_cls is not None:
            extras.update(img_center=self.centers(img_cls), txt_center=self.centers(txt_cls))
        return img, txt, extras

    @torch.no_grad()
    def embed_images(self, x: Tensor) -> Tensor:
        return self.image(x)

    @torch.no_grad()
    def embed_texts(self, x: Tensor) -> Tensor:
        return self.text(x)


def build_embedding(image_dim: int, text_dim: int, cfg: ModelConfig, n_classes: int = 0,
                    heads: tuple[str, ...] = ("instance",)) -> EmbeddingNet:
    return EmbeddingNet(image_dim, text_dim, cfg, n_classes, heads)
