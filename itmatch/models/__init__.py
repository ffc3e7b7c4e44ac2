"""Models by name: `model.name` in the config picks one."""

from __future__ import annotations

from typing import Callable

from torch import nn

from itmatch.config import ModelConfig
from itmatch.models.cca import CCAModel
from itmatch.models.similarity import SimilarityNet
from itmatch.models.two_branch import Branch, EmbeddingNet, build_embedding

# name -> (image_dim, text_dim, cfg, n_classes) -> model; n_classes > 0 adds the instance-loss head
MODELS: dict[str, Callable[..., nn.Module]] = {
    "embedding": build_embedding,
    "similarity": lambda image_dim, text_dim, cfg, n_classes=0: SimilarityNet(image_dim, text_dim, cfg),
    "cca": lambda image_dim, text_dim, cfg, n_classes=0: CCAModel(image_dim, text_dim, cfg.embed_dim),
}


def scores_pairs(model: nn.Module) -> bool:
    """Scores (image, text) pairs with a learned head rather than by the embeddings' dot product."""
    return isinstance(model, SimilarityNet)


def is_closed_form(model: nn.Module) -> bool:
    """Fitted in one step (`model.fit(images, texts, ...)`) rather than trained by gradients."""
    return isinstance(model, CCAModel)


def build_model(image_dim: int, text_dim: int, cfg: ModelConfig, n_classes: int = 0) -> nn.Module:
    if cfg.name not in MODELS:
        raise KeyError(f"model.name={cfg.name!r} unknown; choices: {sorted(MODELS)}")
    return MODELS[cfg.name](image_dim, text_dim, cfg, n_classes=n_classes)


__all__ = ["MODELS", "build_model", "is_closed_form", "scores_pairs", "Branch", "EmbeddingNet",
           "CCAModel", "SimilarityNet"]
