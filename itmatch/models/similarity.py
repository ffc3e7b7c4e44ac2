"""The similarity network (001 §3.3, SPEC §2): the embedding network's two branches, then the
element-wise product of an (image, text) pair through FC 512→512 → ReLU → 512→256 → ReLU → 256→1,
giving the pair's score p. Trained with the logistic loss (Eq. 7) on one negative pair per
positive pair; retrieval scores every pair through the head (`score_matrix`, blocked in memory).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from itmatch.config import ModelConfig
from itmatch.data.batch import Batch
from itmatch.models.two_branch import Branch, TwoTower


class SimilarityNet(TwoTower):
    def __init__(self, image_dim: int, text_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        d_img, d_txt = self._towers(image_dim, text_dim, cfg)
        linear = cfg.branch == "linear"
        self.image = Branch(d_img, cfg.hidden_dim, cfg.embed_dim, dropout=cfg.dropout, linear=linear,
                            input_dropout=cfg.input_dropout)
        self.text = Branch(d_txt, cfg.hidden_dim, cfg.embed_dim, dropout=cfg.dropout, linear=linear,
                            input_dropout=cfg.input_dropout)
        self.head = nn.Sequential(nn.Linear(cfg.embed_dim, 512), nn.ReLU(inplace=True),
                                  nn.Linear(512, 256), nn.ReLU(inplace=True), nn.Linear(256, 1))

    def from_features(self, x_img: Tensor, x_txt: Tensor, batch: Batch) -> dict[str, Tensor]:
        """"img", "txt" embeddings; with `batch.pairs` (image rows, text rows, labels) also
        "pair_scores", computed inside forward so every backend sees the head used."""
        out = {"img": self.image(x_img), "txt": self.text(x_txt)}
        if batch.pairs is not None:
            pair_image, pair_text, _ = batch.pairs
            out["pair_scores"] = self.pair_scores(out["img"][pair_image], out["txt"][pair_text])
        return out

    def pair_scores(self, img: Tensor, txt: Tensor) -> Tensor:
        """[N] scores of aligned pairs (img[i], txt[i])."""
        return self.head(img * txt).squeeze(-1)

    @torch.no_grad()
    def score_matrix(self, img: Tensor, txt: Tensor, block: int = 32) -> Tensor:
        """[len(img), len(txt)] scores of every pair; `block` image rows at a time keep the
        [block, len(txt), d] product small."""
        rows = [self.head(img[i:i + block, None, :] * txt[None, :, :]).squeeze(-1) for i in range(0, len(img), block)]
        return torch.cat(rows)


__all__ = ["SimilarityNet"]
