"""2-Way Net's objective (002, SPEC §2; the model is itmatch/models/twoway.py):

    L = a·L_img + b·L_txt + c·Σ_pairs L_h + d·(D(h_k) + D(g_k)) + e·Σ_BN Σ 1/γ²

- L_img = mean over (image, caption) pairs of ||x − x̂||² (the text→image channel's
  reconstruction of the image features), L_txt = mean ||y − ŷ||² (image→text); squared error
  summed over dimensions, averaged over pairs (the authors' code).
- L_h = mean ||h_i − g_i||² between mirrored hidden layers of the two channels: the embedding
  layer only (the authors' code), or every mirrored pair (loss.twoway_all_hidden).
- D(H) = ||C||_F − ||diag C||_2 with C = HᵀH / N over the batch's N rows of one channel's embedding
  layer: the decorrelation regulariser as the authors' code writes it (uncentred second moments,
  norms not squared; Cogswell et al.'s DeCov squares them and centres C).
- Σ 1/γ² over every BN scale (the model's "gamma_penalty"): the paper's batch-norm modification.
Weights a..e are loss.twoway_recon_img, twoway_recon_txt, twoway_hidden, twoway_decorr,
twoway_gamma. Every term is computed whatever its weight, so every parameter is used (DDP).

Across workers: per-pair terms are global means (itmatch.losses.gather.global_mean). C is a
statistic of the global batch: every worker gathers all rows (`gather.cat`, whose backward sums
every worker's gradient into the owner's rows) and computes the same D, so DDP's gradient average
equals one process on the whole batch without rescaling. The BN penalty depends on parameters
only: the same on every worker.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from itmatch.config import LossConfig
from itmatch.losses.gather import LOCAL, Gather, global_mean

_EPS = 1e-12  # under the square roots: a finite gradient for an all-zero layer


def _norm(t: Tensor) -> Tensor:
    return (t.square().sum() + _EPS).sqrt()


def decorrelation(h: Tensor, gather: Gather = LOCAL) -> Tensor:
    """||C||_F − ||diag C||_2, C = HᵀH / N over the global batch's rows of H."""
    h = gather.cat(h.float())
    c = h.T @ h / max(h.shape[0], 1)
    return _norm(c) - _norm(c.diagonal())


def twoway_loss(recon_img: Tensor, target_img: Tensor, recon_txt: Tensor, target_txt: Tensor,
                hidden: list[tuple[Tensor, Tensor]], embed_img: Tensor, embed_txt: Tensor, gamma_penalty: Tensor, *,
                weights: tuple[float, float, float, float, float] = (1.0, 1.0, 0.25, 0.5, 0.05),
                gather: Gather = LOCAL) -> dict[str, Tensor]:
    """{"loss", "recon_img", "recon_txt", "hidden", "decorr", "gamma"}; `hidden`: (h_i, g_i) pairs
    of mirrored layers, row r of each side from the same (image, caption) pair; `embed_*`: the
    embedding layer of each channel (decorrelated); weights = (a, b, c, d, e) above."""
    sq = lambda a, b: global_mean(((a.float() - b.float()) ** 2).sum(dim=1), gather)  # noqa: E731
    parts = {"recon_img": sq(recon_img, target_img), "recon_txt": sq(recon_txt, target_txt),
             "hidden": torch.stack([sq(h, g) for h, g in hidden]).sum(),
             "decorr": decorrelation(embed_img, gather) + decorrelation(embed_txt, gather),
             "gamma": gamma_penalty.float()}
    a, b, c, d, e = weights
    loss = (a * parts["recon_img"] + b * parts["recon_txt"] + c * parts["hidden"] + d * parts["decorr"]
            + e * parts["gamma"])
    return {**parts, "loss": loss}


def twoway_term(cfg: LossConfig) -> Callable[[dict[str, Tensor], object, Gather], dict[str, Tensor]]:
    """The objective's term (TERMS["twoway"]): binds the weights, picks the mirrored pairs."""
    weights = (cfg.twoway_recon_img, cfg.twoway_recon_txt, cfg.twoway_hidden, cfg.twoway_decorr, cfg.twoway_gamma)

    def term(out: dict[str, Tensor], batch: object, gather: Gather) -> dict[str, Tensor]:
        if cfg.twoway_all_hidden:
            layers = sorted(int(k.rsplit("_", 1)[1]) for k in out if k.startswith("hidden_img_"))
            hidden = [(out[f"hidden_img_{i}"], out[f"hidden_txt_{i}"]) for i in layers]
        else:
            hidden = [(out["hidden_img"], out["hidden_txt"])]
        return twoway_loss(out["recon_img"], out["target_img"], out["recon_txt"], out["target_txt"], hidden,
                           out["hidden_img"], out["hidden_txt"], out["gamma_penalty"], weights=weights, gather=gather)

    return term


__all__ = ["twoway_loss", "twoway_term", "decorrelation"]
