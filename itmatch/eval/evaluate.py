"""Evaluate a model on a featurised split: embed everything once, then chunked retrieval."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from itmatch.data.store import FeatureSplit
from itmatch.eval.retrieval import coco_protocols, retrieval_metrics, sentence_retrieval


@torch.no_grad()
def _embed(embed, feats: np.ndarray, batch: int, device: torch.device) -> torch.Tensor:
    out = [embed(torch.tensor(feats[i:i + batch], device=device)).float().cpu()  # copy: store arrays are read-only
           for i in range(0, len(feats), batch)]
    return torch.cat(out)


def embed_split(model: nn.Module, split: FeatureSplit, *, batch: int = 4096,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Image and caption embeddings of a split, with the model in eval mode (restored after)."""
    was_training = model.training
    model.eval()
    try:
        device = torch.device(device)
        return (_embed(model.embed_images, split.image_feats, batch, device),
                _embed(model.embed_texts, split.caption_feats, batch, device))
    finally:
        model.train(was_training)


def _pair_scorer(model: nn.Module):
    """The model's learned pair score (similarity network), run in eval mode on CPU embeddings."""
    if not hasattr(model, "score_matrix"):
        return None
    head = model.head

    def score(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        was_training = head.training
        head.eval()
        try:
            device = next(head.parameters()).device
            return model.score_matrix(images.to(device), texts.to(device)).float().cpu()
        finally:
            head.train(was_training)

    return score


def evaluate_split(model: nn.Module, split: FeatureSplit, *, chunk: int = 1024, protocol: str = "full",
                   sentences: bool = True, device: torch.device | str = "cpu") -> dict[str, float]:
    """R@K both ways, ranks, rsum; `protocol="coco"` adds COCO 1K (5-fold mean) and 5K keys. A
    model with a learned pair score (the similarity network) is ranked by it, not by cosine."""
    img, txt = embed_split(model, split, device=device)
    return evaluate_embeddings(model, img, txt, split, chunk=chunk, protocol=protocol, sentences=sentences)


def evaluate_embeddings(model: nn.Module, img: torch.Tensor, txt: torch.Tensor, split: FeatureSplit, *,
                        chunk: int = 1024, protocol: str = "full", sentences: bool = True) -> dict[str, float]:
    """`evaluate_split` on embeddings already computed by `embed_split` (callers that also plot them)."""
    txt_img = torch.from_numpy(split.caption_image)
    score_fn = _pair_scorer(model)
    metrics = retrieval_metrics(img, txt, txt_img, chunk=chunk, score_fn=score_fn)
    if protocol == "coco":
        metrics.update(coco_protocols(img, txt, txt_img, chunk=chunk, score_fn=score_fn))
    if sentences:
        metrics.update(sentence_retrieval(txt, torch.from_numpy(split.caption_gid), chunk=chunk))
    return metrics
