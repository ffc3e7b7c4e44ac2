"""The training objective: one weighted sum of terms, each a registered loss taking the model's
named outputs and the batch. The train step calls `objective.prepare(batch)`, the model, then
`objective(outputs, batch, gather=..., epoch=...)`, and nothing else; a new loss is one entry in
`TERMS` (and its pure function beside it in this package).

    total = w_main(epoch) · main + instance_weight · (visual + textual) + center_weight · (center_img + center_txt)

`main` is `loss.name` (ranking: 001 Eq. 6; infonce; logistic: 001 Eq. 7; twoway: 002's Euclidean
losses, twoway.py; softmax_center: softmax + center_weight · center loss, 003's single network,
center.py);
w_main is 0 during 004's Stage I (`loss.instance_stage1_epochs`) and 1 after.
The heads' terms are on when their weight is > 0 (with `softmax_center`, they are the main term).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

from torch import Tensor

from itmatch.config import LossConfig
from itmatch.data.batch import Batch
from itmatch.losses.center import center_loss, softmax_center_loss
from itmatch.losses.gather import LOCAL, Gather
from itmatch.losses.infonce import infonce_loss
from itmatch.losses.instance import instance_loss
from itmatch.losses.logistic import logistic_loss, sample_pairs
from itmatch.losses.phrases import pair_negatives, ranking_negatives
from itmatch.losses.ranking import ranking_loss
from itmatch.losses.twoway import twoway_term

Outputs = dict[str, Tensor]
Term = Callable[[Outputs, Batch, Gather], dict[str, Tensor]]
"""(outputs, batch, gather) -> {"loss": the term's value, its parts by name}."""


def _ranking(cfg: LossConfig) -> Term:
    fn = partial(ranking_loss, lambdas=cfg.lambdas, margin=cfg.margin, top_k=cfg.top_k, metric=cfg.metric,
                 reduction=cfg.reduction)
    # Region-phrase batches narrow a phrase's negatives to its picture (001 Algorithm 1, phrases.py).
    return lambda out, batch, gather: fn(out["img"].float(), batch.image_gid, out["txt"].float(), batch.text_gid,
                                         gather=gather, negatives=ranking_negatives(batch, gather))


def _infonce(cfg: LossConfig) -> Term:
    fn = partial(infonce_loss, temperature=cfg.temperature, weights=(cfg.lambda1, cfg.lambda2), reduction=cfg.reduction)
    return lambda out, batch, gather: fn(out["img"].float(), batch.image_gid, out["txt"].float(), batch.text_gid,
                                         gather=gather)


def _logistic(cfg: LossConfig) -> Term:
    return lambda out, batch, gather: logistic_loss(out["pair_scores"].float(), batch.pairs[2], gather=gather)


def _instance(cfg: LossConfig) -> Term:
    def term(out: Outputs, batch: Batch, gather: Gather) -> dict[str, Tensor]:
        parts = instance_loss(out["img_logits"], batch.image_cls, out["txt_logits"], batch.text_cls, gather=gather)
        return {**parts, "loss": parts["visual"] + parts["textual"]}
    return term


def _center(cfg: LossConfig) -> Term:
    def term(out: Outputs, batch: Batch, gather: Gather) -> dict[str, Tensor]:
        parts = center_loss(out["img"], out["img_center"], out["txt"], out["txt_center"], gather=gather)
        return {**parts, "loss": parts["center_img"] + parts["center_txt"]}
    return term


def _softmax_center(cfg: LossConfig) -> Term:
    """The rows' classes come with the outputs (the single network's config2 adds augmented rows)."""
    def term(out: Outputs, batch: Batch, gather: Gather) -> dict[str, Tensor]:
        img_cls, txt_cls = out.get("img_cls", batch.image_cls), out.get("txt_cls", batch.text_cls)
        return softmax_center_loss(out["img"], out["img_logits"], out["img_center"], img_cls, out["txt"],
                                   out["txt_logits"], out["txt_center"], txt_cls, center_weight=cfg.center_weight,
                                   gather=gather)
    return term


# name -> builder binding the term's hyper-parameters from the config. The first three are
# `loss.name` choices (the main term); the heads' terms are added by weight.
TERMS: dict[str, Callable[[LossConfig], Term]] = {
    "ranking": _ranking, "infonce": _infonce, "logistic": _logistic, "instance": _instance, "center": _center,
    "twoway": twoway_term, "softmax_center": _softmax_center}
MAIN = ("ranking", "infonce", "logistic", "twoway", "softmax_center")
PAIRWISE = ("logistic",)
"""Main terms that score sampled (image, text) pairs: the batch carries the pairs into forward."""


@dataclass
class Objective:
    cfg: LossConfig

    def __post_init__(self) -> None:
        if self.cfg.name not in MAIN:
            raise KeyError(f"loss.name={self.cfg.name!r} unknown; choices: {list(MAIN)}")
        self.main = TERMS[self.cfg.name](self.cfg)
        # softmax_center is the heads' two terms (softmax + center loss) as the main term
        weights = {} if self.cfg.name == "softmax_center" else {"instance": self.cfg.instance_weight,
                                                                "center": self.cfg.center_weight}
        self.heads = [(name, w, TERMS[name](self.cfg)) for name, w in weights.items() if w > 0]

    def prepare(self, batch: Batch) -> Batch:
        """What the model's forward needs beyond the inputs: sampled pairs for a pairwise term, drawn
        from the global (epoch-seeded) stream so a resumed run draws the same pairs."""
        if self.cfg.name not in PAIRWISE:
            return batch
        return replace(batch, pairs=sample_pairs(batch.image_gid, batch.text_gid, negatives=pair_negatives(batch)))

    def main_weight(self, epoch: int) -> float:
        """004's Stage I trains the heads alone."""
        return 0.0 if epoch < self.cfg.instance_stage1_epochs else 1.0

    def __call__(self, outputs: Outputs, batch: Batch, *, gather: Gather = LOCAL, epoch: int = 0) -> dict[str, Tensor]:
        out = self.main(outputs, batch, gather)
        if not self.heads:
            return out
        total, parts = self.main_weight(epoch) * out["loss"], {}
        for _, weight, term in self.heads:
            values = term(outputs, batch, gather)
            total = total + weight * values.pop("loss")
            parts.update(values)
        return {**out, **parts, "loss": total}


def build_objective(cfg: LossConfig) -> Objective:
    return Objective(cfg)


__all__ = ["TERMS", "MAIN", "Objective", "build_objective", "Outputs", "Term"]
