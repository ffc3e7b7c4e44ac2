"""2-Way Net (Eisenschtat & Wolf, "Linking Image and Text with 2-Way Nets", CVPR 2017; 002 in
papers/, SPEC §2): two tied channels, X→Y (image features to text features) and Y→X, trained with
Euclidean losses (itmatch/losses/twoway.py) so that mirrored hidden layers meet in a common,
maximally correlated space.

With hidden widths s_1..s_n (here n = 3: model.hidden_dim, model.embed_dim, model.hidden_dim) the
weights W_0..W_n are shared: W_i maps s_i → s_{i+1} (s_0 = image width, s_{n+1} = text width).

    X→Y:  x ──W_0──> h_1 ──W_1──> h_2 ──W_2──> h_3 ──W_3──> ŷ
    Y→X:  x̂ <──W_0ᵀ── g_1 <──W_1ᵀ── g_2 <──W_2ᵀ── g_3 <──W_3ᵀ── y

Every hidden layer is Linear → BatchNorm → leaky ReLU → tied dropout; h_i and g_i (the mirrored
layers) have the same width s_i and are the pairs the hidden loss compares. The retrieval
embedding is the middle layer: h_2 of an image, g_2 of a caption (see `TwoWayNet.embed`).

What is the paper's (and its authors' released code, aviveise/2WayNet) and what is ours:

- paper: two channels over the two views, X→Y with W_i and Y→X with the transposes in reverse
  order (one tensor per pair of mirrored layers, so both channels' gradients reach it), separate
  biases and separate batch normalisation per channel; Glorot-uniform initialisation; leaky ReLU
  (slope 0.3 in the authors' code); the output layers are linear.
- paper, batch normalisation for regression: a Euclidean loss can be lowered by shrinking the
  representation, which BN's learned scale γ makes easy. The paper keeps BN but adds a penalty
  Σ 1/γ² on every BN scale (weighted by loss.twoway_gamma) so γ cannot shrink towards zero. The
  model returns that penalty as "gamma_penalty" (computed inside forward, so every backend sees
  the parameters used). A brief summarised this as "mean-only / no variance normalisation"; the
  authors' code (Layers/BNLayer.py + the loss_gamma term) normalises mean and variance and
  regularises 1/γ, which is what is implemented.
- paper, tied dropout: the mirrored layers h_i and g_i of one (image, caption) pair drop the same
  units (one Bernoulli mask per layer pair), and kept units are scaled by 1/√(1−p) rather than
  1/(1−p), which keeps the second moment (what the next BN and the Euclidean losses see) instead
  of the mean. Rate p = model.dropout (0.5 in the paper).
- ours, widths: (hidden_dim, embed_dim, hidden_dim), the embedding in the middle; the paper's
  Flickr8k net used (2000, 3000, 4000) and read layer 1 (3000-d) — here the embedding width is
  model.embed_dim like every other model. Plain dense layers (the authors' "locally dense"
  layers, a parameter-saving block structure, are left out).
- ours, no bias before BN: a bias followed by BatchNorm is removed again by it (BN's β is the
  bias); only the two output layers carry a bias.
- ours, pairing: a batch holds unique images and their captions (≥ 2 per image). The X→Y channel
  runs once per unique image and each caption is paired with its image's rows (the dropout mask
  of the Y→X rows is that image's mask), so the channels see the batch the other models see; the
  paper's batches were shuffled (image, caption) pairs. A caption whose image is not in the batch
  (a gallery forward) gets its own mask and takes no part in the pair losses.
- ours, retrieval score: the embedding is the centred, L2-normalised middle layer, so the dot
  product the evaluator computes is the Pearson correlation of the two vectors — the authors'
  test metric (scipy `cdist(..., "correlation")`) — and every other piece of the system
  (evaluation, serving, test-time flip) sees unit vectors as from the other models.
- ours, the reconstruction targets are detached (stop-gradient): with end-to-end towers the
  towers cannot lower the loss by shrinking their own features, only by what feeds the channels.

Works on frozen features and on end-to-end towers through the TwoTower plumbing (towers, frozen
stage, gradient caching via `from_features`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itmatch.config import ModelConfig
from itmatch.data.batch import Batch, Inputs
from itmatch.models.two_branch import TwoTower

LEAK = 0.3
"""Negative slope of the leaky ReLU (the authors' code: LEAKINESS = 0.3)."""


def tied_mask(rows: int, width: int, p: float, like: Tensor) -> Tensor:
    """A dropout mask for one pair of mirrored layers: keep with probability 1 − p, kept units
    scaled by 1/√(1 − p) (the paper's variance-preserving scaling)."""
    keep = torch.full((rows, width), 1.0 - p, device=like.device, dtype=like.dtype)
    return torch.bernoulli(keep) / math.sqrt(1.0 - p)


def correlation_embedding(h: Tensor) -> Tensor:
    """Centre each row over its dimensions and L2-normalise: dot products are Pearson correlations."""
    return F.normalize(h - h.mean(dim=-1, keepdim=True), dim=-1)


class TwoWayNet(TwoTower):
    """forward(batch) -> named outputs:

    - "img" [n_img, e], "txt" [n_txt, e]: unit embeddings (the correlation embedding of the middle
      layer, as during retrieval, here with the training dropout);
    - per (caption, its image) pair, rows in caption order over the captions whose image is in
      the batch: "recon_txt" (ŷ of the image, X→Y) and "target_txt" (the caption's features),
      "recon_img" (x̂ of the caption, Y→X) and "target_img" (the image's features), targets
      detached; "hidden_img_i" / "hidden_txt_i" (h_i and g_i, i = 1..n, after tied dropout) and
      "hidden_img" / "hidden_txt" (the embedding layer's pair);
    - "gamma_penalty": Σ over every BN scale of 1/γ² (the paper's BN regulariser).
    """

    def __init__(self, image_dim: int, text_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        d_img, d_txt = self._towers(image_dim, text_dim, cfg)
        self.sizes = (cfg.hidden_dim, cfg.embed_dim, cfg.hidden_dim)
        self.embed_layer = 1  # 0-based index into `sizes`: the middle layer
        self.p = cfg.dropout
        widths = (d_img, *self.sizes, d_txt)
        # Direct parameters of this module (not a ParameterList): both channels use them inside
        # this module's forward, which is where DeepSpeed ZeRO-3 gathers a module's own weights.
        for i in range(len(widths) - 1):
            w = nn.Parameter(torch.empty(widths[i + 1], widths[i]))
            nn.init.xavier_uniform_(w)  # symmetric in fan-in / fan-out: right for W and Wᵀ alike
            self.register_parameter(f"weight_{i}", w)
        self.bias_txt = nn.Parameter(torch.zeros(d_txt))  # X→Y output layer
        self.bias_img = nn.Parameter(torch.zeros(d_img))  # Y→X output layer
        self.bn_img = nn.ModuleList(nn.BatchNorm1d(s) for s in self.sizes)  # X→Y channel, h_1..h_n
        self.bn_txt = nn.ModuleList(nn.BatchNorm1d(s) for s in self.sizes)  # Y→X channel, g_1..g_n

    @property
    def weights(self) -> list[Tensor]:
        """The tied weights W_0..W_n (the X→Y channel's orientation)."""
        return [getattr(self, f"weight_{i}") for i in range(len(self.sizes) + 1)]

    def _layer(self, h: Tensor, weight: Tensor, bn: nn.Module, mask: Tensor | None) -> Tensor:
        h = F.leaky_relu(bn(F.linear(h, weight)), LEAK)
        return h if mask is None else h * mask

    def image_channel(self, x: Tensor, masks: list[Tensor | None],
                      depth: int | None = None) -> tuple[list[Tensor], Tensor | None]:
        """X→Y: hidden layers h_1..h_depth (all by default) and, for the full depth, ŷ."""
        w, n = self.weights, len(self.sizes)
        depth = n if depth is None else depth
        hs, h = [], x
        for i in range(depth):
            h = self._layer(h, w[i], self.bn_img[i], masks[i])
            hs.append(h)
        return hs, (F.linear(h, w[n], self.bias_txt) if depth == n else None)

    def text_channel(self, y: Tensor, masks: list[Tensor | None],
                     depth: int | None = None) -> tuple[list[Tensor | None], Tensor | None]:
        """Y→X: hidden layers g_n down to g_{n-depth+1} (listed by their mirrored index i, None
        above what was computed) and, for the full depth, x̂."""
        w, n = self.weights, len(self.sizes)
        depth = n if depth is None else depth
        gs: list[Tensor | None] = [None] * n
        g = y
        for i in range(n - 1, n - 1 - depth, -1):
            g = self._layer(g, w[i + 1].t(), self.bn_txt[i], masks[i])
            gs[i] = g
        return gs, (F.linear(g, w[0].t(), self.bias_img) if depth == n else None)

    def from_features(self, x_img: Tensor, x_txt: Tensor, batch: Batch) -> dict[str, Tensor]:
        match = batch.text_gid[:, None].to(x_img.device) == batch.image_gid[None, :].to(x_img.device)
        paired = match.any(dim=1)
        image_of = match.float().argmax(dim=1)  # each caption's image row (0 where none)
        train_masks = self.training and self.p > 0
        masks_img = [tied_mask(len(x_img), s, self.p, x_img) if train_masks else None for s in self.sizes]
        masks_txt = [None if m is None else torch.where(paired[:, None], m[image_of],
                                                        tied_mask(len(x_txt), m.shape[1], self.p, m))
                     for m in masks_img]
        hs, y_hat = self.image_channel(x_img, masks_img)
        gs, x_hat = self.text_channel(x_txt, masks_txt)
        k = self.embed_layer
        out = {"img": correlation_embedding(hs[k]), "txt": correlation_embedding(gs[k])}
        txt_rows = paired.nonzero().squeeze(1)
        img_rows = image_of[txt_rows]
        out.update(recon_txt=y_hat[img_rows], target_txt=x_txt[txt_rows].detach(),
                   recon_img=x_hat[txt_rows], target_img=x_img[img_rows].detach())
        for i, (h, g) in enumerate(zip(hs, gs), start=1):
            out[f"hidden_img_{i}"], out[f"hidden_txt_{i}"] = h[img_rows], g[txt_rows]
        out["hidden_img"], out["hidden_txt"] = out[f"hidden_img_{k + 1}"], out[f"hidden_txt_{k + 1}"]
        out["gamma_penalty"] = sum((bn.weight.float() ** -2).sum() for bn in [*self.bn_img, *self.bn_txt])
        return out

    @torch.no_grad()
    def embed_images(self, x: Inputs) -> Tensor:
        """The image's middle layer h_k through the X→Y channel (no dropout in eval mode)."""
        hs, _ = self.image_channel(self.image_tower(x), [None] * len(self.sizes), depth=self.embed_layer + 1)
        return correlation_embedding(hs[-1])

    @torch.no_grad()
    def embed_texts(self, x: Inputs) -> Tensor:
        """The caption's mirrored middle layer g_k through the Y→X channel."""
        n = len(self.sizes)
        gs, _ = self.text_channel(self.text_tower(x), [None] * n, depth=n - self.embed_layer)
        return correlation_embedding(gs[self.embed_layer])


def build_twoway(image_dim: int, text_dim: int, cfg: ModelConfig, n_classes: int = 0,
                 heads: tuple[str, ...] = ()) -> TwoWayNet:
    return TwoWayNet(image_dim, text_dim, cfg)


__all__ = ["TwoWayNet", "build_twoway", "tied_mask", "correlation_embedding", "LEAK"]
