"""Batch-level losses by name: `loss.name` in the config picks one.

Every loss is a pure function of embeddings and group ids that takes a `gather` (see gather.py)
and returns a dict with the total under "loss" and its terms beside it.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from itmatch.config import LossConfig
from itmatch.losses.gather import LOCAL, Gather, LocalGather
from itmatch.losses.center import center_loss
from itmatch.losses.infonce import infonce_loss
from itmatch.losses.instance import instance_loss
from itmatch.losses.logistic import logistic_loss, sample_pairs
from itmatch.losses.ranking import ranking_loss


def _ranking(cfg: LossConfig) -> Callable[..., dict]:
    return partial(ranking_loss, lambdas=cfg.lambdas, margin=cfg.margin, top_k=cfg.top_k,
                   metric=cfg.metric, reduction=cfg.reduction)


def _infonce(cfg: LossConfig) -> Callable[..., dict]:
    return partial(infonce_loss, temperature=cfg.temperature, weights=(cfg.lambda1, cfg.lambda2),
                   reduction=cfg.reduction)


# name -> builder binding that loss's hyper-parameters from the config
LOSSES: dict[str, Callable[[LossConfig], Callable[..., dict]]] = {"ranking": _ranking, "infonce": _infonce}


def build_loss(cfg: LossConfig) -> Callable[..., dict]:
    """`loss(img, img_gid, txt, txt_gid, gather=...)` with the config's hyper-parameters bound."""
    if cfg.name not in LOSSES:
        raise KeyError(f"loss.name={cfg.name!r} unknown; choices: {sorted(LOSSES)}")
    return LOSSES[cfg.name](cfg)


__all__ = ["LOSSES", "build_loss", "Gather", "LocalGather", "LOCAL", "ranking_loss", "infonce_loss", "instance_loss",
           "logistic_loss", "sample_pairs", "center_loss"]
