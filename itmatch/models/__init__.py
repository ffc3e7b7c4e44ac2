"""Models by name: `model.name` in the config picks one."""

from __future__ import annotations

from typing import Callable

from torch import nn

from itmatch.config import ModelConfig
from itmatch.models.cca import CCAModel
from itmatch.models.two_branch import Branch, EmbeddingNet, build_embedding

MODELS: dict[str, Callable[[int, int, ModelConfig], nn.Module]] = {
    "embedding": build_embedding,
    "cca": lambda image_dim, text_dim, cfg: CCAModel(image_dim, text_dim, cfg.embed_dim),
}


def is_closed_form(model: nn.Module) -> bool:
    """Fitted in one step (`model.fit(images, texts, ...)`) rather than trained by gradients."""
    return isinstance(model, CCAModel)


def build_model(image_dim: int, text_dim: int, cfg: ModelConfig) -> nn.Module:
    if cfg.name not in MODELS:
        raise KeyError(f"model.name={cfg.name!r} unknown; choices: {sorted(MODELS)}")
    return MODELS[cfg.name](image_dim, text_dim, cfg)


__all__ = ["MODELS", "build_model", "is_closed_form", "Branch", "EmbeddingNet", "CCAModel"]
