"""The two-branch embedding network (001 §3.2).

Branch: Linear(d_in→h) → ReLU → Dropout → Linear(h→d) → BatchNorm1d(d) → L2-normalise.
The linear variant is Linear(d_in→d) → L2. Similarity is the dot product of unit vectors.
"""

from __future__ import annotations

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

    With `n_classes` > 0 it also holds the instance loss's classifier W_share (004 §4.2): one
    bias-free linear map from the shared space to one class per training image, applied to both
    modalities' features f before L2 normalisation (P = softmax(W_shareᵀ f); on the unit sphere
    the logits would be bounded by |W| and 1-of-N softmax would barely move); forward then also
    returns both sides' class logits. It lives in the model so every backend (DDP, DeepSpeed
    ZeRO-3 included) sees it used inside forward.
    """

    def __init__(self, image_dim: int, text_dim: int, cfg: ModelConfig, n_classes: int = 0) -> None:
        super().__init__()
        linear = cfg.branch == "linear"
        self.image = Branch(image_dim, cfg.hidden_dim, cfg.embed_dim, dropout=cfg.dropout, linear=linear)
        self.text = Branch(text_dim, cfg.hidden_dim, cfg.embed_dim, dropout=cfg.dropout, linear=linear)
        self.classifier = nn.Linear(cfg.embed_dim, n_classes, bias=False) if n_classes else None
        self.dims = (image_dim, text_dim)

    def forward(self, images: Tensor, texts: Tensor) -> tuple[Tensor, ...]:
        if self.classifier is None:
            return self.image(images), self.text(texts)
        (f_img, img), (f_txt, txt) = self.image.features(images), self.text.features(texts)
        return img, txt, self.classifier(f_img), self.classifier(f_txt)

    @torch.no_grad()
    def embed_images(self, x: Tensor) -> Tensor:
        return self.image(x)

    @torch.no_grad()
    def embed_texts(self, x: Tensor) -> Tensor:
        return self.text(x)


def build_embedding(image_dim: int, text_dim: int, cfg: ModelConfig, n_classes: int = 0) -> EmbeddingNet:
    return EmbeddingNet(image_dim, text_dim, cfg, n_classes)
