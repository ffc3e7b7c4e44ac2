"""The two-branch embedding network (001 §3.2).

Branch: [input Dropout] → Linear(d_in→h) → ReLU → Dropout → Linear(h→d) → BatchNorm1d(d) → L2-normalise.
The linear variant is Linear(d_in→d) → L2. Similarity is the dot product of unit vectors.
With model.residual=cca the branch adds its input's fitted CCA projection before the L2 norm.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itmatch.config import ModelConfig
from itmatch.data.batch import Batch, Inputs
from itmatch.models.towers import build_towers


class Branch(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int, *, dropout: float = 0.5, linear: bool = False,
                 input_dropout: float = 0.0, residual: bool = False) -> None:
        super().__init__()
        # outside `net`, so checkpoints keep their parameter names with or without it
        self.input_dropout = nn.Dropout(input_dropout) if input_dropout > 0 else nn.Identity()
        if linear:
            self.net: nn.Module = nn.Linear(d_in, d_out)
        else:
            self.net = nn.Sequential(
                nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                # No bias before BatchNorm: BN subtracts it again, so its gradient is zero up to
                # rounding, and Adam would turn that rounding noise into full-size random steps.
                nn.Linear(hidden, d_out, bias=False), nn.BatchNorm1d(d_out),
            )
        self.residual = residual
        if residual:  # a fixed linear map, fitted by `EmbeddingNet.fit_residual` before training
            self.register_buffer("cca_mean", torch.zeros(d_in))
            self.register_buffer("cca_weight", torch.zeros(d_in, d_out))
            # the learned part starts at zero, so the first step starts from CCA's embedding
            last = self.net if linear else self.net[-1]
            nn.init.zeros_(last.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)[1]

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(f, normalize(f)): the feature before L2 normalisation, and the embedding."""
        f = self.net(self.input_dropout(x))
        if self.residual:  # on the clean input: input dropout regularises the learned part only
            f = f + (x.to(self.cca_weight.dtype) - self.cca_mean) @ self.cca_weight
        return f, F.normalize(f, dim=-1)


class TwoTower(nn.Module):
    """Image tower → image branch and text tower → text branch into one unit-sphere space: the
    embedding interface every model shares (`embed_images`, `embed_texts`, `dims`). Subclasses set
    `self.image` / `self.text` (the branches) and define `forward(batch) -> dict` of named outputs;
    they run the towers through `tower_features`, which honours a frozen stage."""

    image: nn.Module
    text: nn.Module

    def _towers(self, image_dim: int, text_dim: int, cfg: Optional[ModelConfig] = None) -> tuple[int, int]:
        """Build the towers (cached features of these widths unless `cfg` names encoders); returns
        the branches' input widths."""
        self.image_tower, self.text_tower = build_towers(cfg or ModelConfig(), image_dim, text_dim)
        self.dims = (image_dim, text_dim)
        self.towers_frozen = False
        return self.image_tower.out_dim, self.text_tower.out_dim

    def freeze_towers(self, frozen: bool) -> None:
        """004's Stage I: towers run without gradients (and in eval mode, set by the caller after
        `train()`) while the branches and heads train."""
        self.towers_frozen = frozen

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return self.from_features(*self.tower_features(batch), batch)

    def from_features(self, x_img: Tensor, x_txt: Tensor, batch: Batch) -> dict[str, Tensor]:
        """The named outputs from the towers' features (what gradient caching re-enters at)."""
        raise NotImplementedError

    def tower_features(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The towers' outputs for the batch's inputs; a batch cut from Stage I's tower cache
        (`batch.tower_outputs`) already holds them: the towers do not run."""
        if batch.tower_outputs:
            return batch.images, batch.texts
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.towers_frozen):
            return self.image_tower(batch.images), self.text_tower(batch.texts)

    @torch.no_grad()
    def embed_images(self, x: Inputs) -> Tensor:
        return self.image(self.image_tower(x))

    @torch.no_grad()
    def embed_texts(self, x: Inputs) -> Tensor:
        return self.text(self.text_tower(x))


class EmbeddingNet(TwoTower):
    """The two-branch embedding network; `forward(batch)` returns named outputs:
    "img", "txt" (unit embeddings of the batch's images and captions), and with heads:

    - "img_logits", "txt_logits": the instance loss's classifier W_share (004 §4.2), one bias-free
      linear map applied to both modalities' features f before L2 normalisation (P =
      softmax(W_shareᵀ f); on the unit sphere the logits would be bounded by |W| and a 1-of-N
      softmax would barely move), over `n_classes` classes (one per training image);
    - "img_center", "txt_center": each sample's class center, one learned center per class in the
      embedding space shared by both modalities (the center loss of 003).
    The heads live in the model so every backend (DDP, DeepSpeed ZeRO-3 included) sees their
    parameters used inside forward.
    """

    def __init__(self, image_dim: int, text_dim: int, cfg: ModelConfig, n_classes: int = 0,
                 heads: tuple[str, ...] = ("instance",)) -> None:
        super().__init__()
        d_img, d_txt = self._towers(image_dim, text_dim, cfg)
        linear, residual = cfg.branch == "linear", cfg.residual == "cca"
        self.image = Branch(d_img, cfg.hidden_dim, cfg.embed_dim, dropout=cfg.dropout, linear=linear,
                            input_dropout=cfg.input_dropout, residual=residual)
        self.text = Branch(d_txt, cfg.hidden_dim, cfg.embed_dim, dropout=cfg.dropout, linear=linear,
                            input_dropout=cfg.input_dropout, residual=residual)
        with_heads = n_classes > 0
        self.classifier = nn.Linear(cfg.embed_dim, n_classes, bias=False) if with_heads and "instance" in heads else None
        self.centers = nn.Embedding(n_classes, cfg.embed_dim) if with_heads and "center" in heads else None

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return self.from_features(*self.tower_features(batch), batch)

    @torch.no_grad()
    def fit_residual(self, images: Tensor, texts: Tensor, *, ridge: float) -> "EmbeddingNet":
        """model.residual=cca: fit both branches' CCA projections on paired rows (images[i]
        describes texts[i]): min(embed_dim, input widths) canonical dimensions, the rest zero."""
        from itmatch.models.cca import fit_cca

        dim = min(self.image.cca_weight.shape[1], images.shape[1], texts.shape[1])
        for branch, (mean, weight) in zip((self.image, self.text), fit_cca(images, texts, dim, ridge)[:2]):
            branch.cca_mean.copy_(mean)
            branch.cca_weight.zero_()[:, :dim].copy_(weight)
        return self

    def from_features(self, x_img: Tensor, x_txt: Tensor, batch: Batch) -> dict[str, Tensor]:
        """The named outputs from the towers' features (what gradient caching re-enters at)."""
        (f_img, img), (f_txt, txt) = self.image.features(x_img), self.text.features(x_txt)
        out = {"img": img, "txt": txt}
        if self.classifier is not None:
            out.update(img_logits=self.classifier(f_img), txt_logits=self.classifier(f_txt))
        if self.centers is not None:
            out.update(img_center=self.centers(batch.image_cls), txt_center=self.centers(batch.text_cls))
        return out


def build_embedding(image_dim: int, text_dim: int, cfg: ModelConfig, n_classes: int = 0,
                    heads: tuple[str, ...] = ("instance",)) -> EmbeddingNet:
    return EmbeddingNet(image_dim, text_dim, cfg, n_classes, heads)
