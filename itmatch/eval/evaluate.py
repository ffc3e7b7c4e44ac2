"""Evaluate a model on a featurised split: embed everything once, then chunked retrieval."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from itmatch.data.batch import caption_items, move
from itmatch.data.phrase_store import PhraseSplit
from itmatch.data.store import FeatureSplit
from itmatch.eval.phrases import phrase_metrics
from itmatch.eval.retrieval import coco_protocols, retrieval_metrics, sentence_retrieval


@torch.no_grad()
def _embed(embed, tower: nn.Module, items_at, rows: np.ndarray, device: torch.device, flip: bool = False) -> torch.Tensor:
    """Embeddings of these rows through a tower's own preparation, `tower.eval_batch` rows at a
    time; `flip`: the mean of each image's and its mirror image's embedding (004's test-time flip)."""
    step = getattr(tower, "eval_batch", 4096)
    out = []
    for start in range(0, len(rows), step):
        x = move(tower.prepare(items_at(rows[start:start + step])), device)
        e = embed(x)
        if flip:
            e = F.normalize(e + embed(x.flip(-1)), dim=-1)
        out.append(e.float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def embed_split(model: nn.Module, split, *, device: torch.device | str = "cpu", image_rows: Optional[np.ndarray] = None,
                caption_rows: Optional[np.ndarray] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and caption embeddings of a split (FeatureSplit or RawSplit), with the model in eval
    mode (restored after); `image_rows` / `caption_rows`: only those rows (default: all)."""
    was_training = model.training
    model.eval()
    try:
        device = torch.device(device)
        flip = bool(getattr(model.image_tower, "tta_flip", False))
        captions = lambda rows: caption_items(split, model.text_tower.prepare, rows)  # noqa: E731
        image_rows = np.arange(len(split.image_ids)) if image_rows is None else np.asarray(image_rows)
        caption_rows = np.arange(len(split)) if caption_rows is None else np.asarray(caption_rows)
        return (_embed(model.embed_images, model.image_tower, split.images_at, image_rows, device, flip),
                _embed(model.embed_texts, model.text_tower, captions, caption_rows, device))
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
    """`evaluate_split` on embeddings already computed by `embed_split` (callers that also plot them).
    On a region-phrase split (images = regions, captions = phrases) the metrics are phrase
    localization's (itmatch.eval.phrases)."""
    if isinstance(split, PhraseSplit):
        return phrase_metrics(model, img, txt, split)
    txt_img = torch.from_numpy(split.caption_image)
    score_fn = _pair_scorer(model)
    metrics = retrieval_metrics(img, txt, txt_img, chunk=chunk, score_fn=score_fn)
    if protocol == "coco":
        metrics.update(coco_protocols(img, txt, txt_img, chunk=chunk, score_fn=score_fn))
    if sentences:  # captions against captions by cosine: the unit part of a hubness-corrected embedding
        core = getattr(model, "core_dim", None) or txt.shape[1]
        metrics.update(sentence_retrieval(txt[:, :core], torch.from_numpy(split.caption_gid), chunk=chunk))
    return metrics
