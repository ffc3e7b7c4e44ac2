"""Batch-level losses, and the objective that combines them (objective.py).

Every loss is a pure function of embeddings (or scores, logits) and group ids that takes a `gather`
(see gather.py) and returns a dict of its terms. `build_objective(cfg.loss)` is what training
uses: `loss.name` picks the main term from `TERMS`, the heads' weights add theirs.
"""

from __future__ import annotations

from itmatch.losses.gather import LOCAL, Gather, LocalGather
from itmatch.losses.center import center_loss
from itmatch.losses.infonce import infonce_loss
from itmatch.losses.instance import instance_loss
from itmatch.losses.logistic import logistic_loss, sample_pairs
from itmatch.losses.objective import MAIN, TERMS, Objective, build_objective
from itmatch.losses.ranking import ranking_loss


__all__ = ["TERMS", "MAIN", "Objective", "build_objective", "Gather", "LocalGather", "LOCAL", "ranking_loss",
           "infonce_loss", "instance_loss", "logistic_loss", "sample_pairs", "center_loss"]
