"""Phrase localization evaluation (001 §4.4, SPEC §5): every test phrase ranks the proposals of its
own picture by the trained network's score — cosine of the embeddings for the embedding network
(and CCA), the learned pair score for the similarity network — and a proposal with IoU >= 0.5 to the
phrase's ground-truth box is a hit. Metrics: phrase_r1/r5/r10, phrase_upper (any hit among the
proposals: 001 Table 1's R@200 bound) and phrase_random_r1 (a random ranking's exact R@1), all
percentages, from `itmatch.phrases.metrics`."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from itmatch.data.phrase_store import PhraseSplit
from itmatch.phrases.metrics import phrase_localization_metrics

PHRASE_METRICS = ("phrase_r1", "phrase_r5", "phrase_r10", "phrase_upper", "phrase_random_r1")
_BUDGET = 2**24  # region-embedding floats gathered per block of phrases


@torch.no_grad()
def proposal_scores(model: nn.Module, region_emb: Tensor, phrase_emb: Tensor, proposal_rows: np.ndarray,
                    phrase_picture: np.ndarray) -> Tensor:
    """[N, P_max] score of every phrase against each proposal of its picture (padding scores 0;
    the metrics ignore it), a block of phrases at a time."""
    rows = torch.from_numpy(np.maximum(proposal_rows, 0))
    width, dim = rows.shape[1], region_emb.shape[1]
    step = max(1, _BUDGET // max(1, width * dim))
    pair_scores = getattr(model, "pair_scores", None)  # the similarity network's learned score
    out = []
    for lo in range(0, len(phrase_emb), step):
        regions = region_emb[rows[torch.from_numpy(phrase_picture[lo:lo + step])]]  # [n, P, d]
        phrases = phrase_emb[lo:lo + step, None, :].to(regions.dtype)
        if pair_scores is None:
            out.append((regions * phrases).sum(-1))
        else:
            device = next(model.parameters()).device
            out.append(pair_scores(regions.to(device), phrases.expand_as(regions).to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, width)


def phrase_metrics(model: nn.Module, region_emb: Tensor, phrase_emb: Tensor, split: PhraseSplit) -> dict[str, float]:
    """The localization metrics of a PhraseSplit from its region and phrase embeddings (embed_split's
    output: images = regions, captions = phrases); the model in eval mode while it scores pairs."""
    was_training = model.training
    model.eval()
    try:
        scores = proposal_scores(model, region_emb, phrase_emb, split.proposal_rows, split.phrase_picture)
    finally:
        model.train(was_training)
    valid = split.proposal_rows >= 0
    boxes = split.region_box[np.maximum(split.proposal_rows, 0)]  # [I, P_max, 4]
    return phrase_localization_metrics(scores.numpy(), split.phrase_box, boxes, phrase_image=split.phrase_picture,
                                       valid=valid)


def format_phrase_metrics(m: dict[str, float]) -> str:
    """One line for progress logs."""
    return (f"phrase R@1/5/10 {m['phrase_r1']:.1f}/{m['phrase_r5']:.1f}/{m['phrase_r10']:.1f} "
            f"(upper {m['phrase_upper']:.1f}, random R@1 {m['phrase_random_r1']:.1f})")


__all__ = ["PHRASE_METRICS", "proposal_scores", "phrase_metrics", "format_phrase_metrics"]
