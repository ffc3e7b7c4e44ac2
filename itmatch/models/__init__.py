"""Models by name: `model.name` in the config picks one."""

from __future__ import annotations

from typing import Callable

from torch import nn

from itmatch.config import ModelConfig
from itmatch.models.cca import CCAModel
from itmatch.models.similarity import SimilarityNet
from itmatch.models.single import SingleNet, build_single
from itmatch.models.two_branch import Branch, EmbeddingNet, build_embedding
from itmatch.models.twoway import TwoWayNet, build_twoway

# name -> (image_dim, text_dim, cfg, n_classes, heads) -> model; n_classes > 0 adds the training
# heads named in `heads` ("instance", "center"), which the embedding network has (the single network
# always has both: its loss is softmax + center loss)
MODELS: dict[str, Callable[..., nn.Module]] = {
    "embedding": build_embedding,
    "similarity": lambda image_dim, text_dim, cfg, n_classes=0, heads=(): SimilarityNet(image_dim, text_dim, cfg),
    "cca": lambda image_dim, text_dim, cfg, n_classes=0, heads=(): CCAModel(image_dim, text_dim, cfg.embed_dim),
    "twoway": build_twoway,
    "single": build_single,
}


def is_closed_form(model: nn.Module) -> bool:
    """Fitted in one step (`model.fit(images, texts, ...)`) rather than trained by gradients."""
    return isinstance(model, CCAModel)


def build_model(image_dim: int, text_dim: int, cfg: ModelConfig, n_classes: int = 0,
                heads: tuple[str, ...] = ("instance",)) -> nn.Module:
    if cfg.name not in MODELS:
        raise KeyError(f"model.name={cfg.name!r} unknown; choices: {sorted(MODELS)}")
    return MODELS[cfg.name](image_dim, text_dim, cfg, n_classes=n_classes, heads=heads)


def heads_in(state: dict) -> tuple[int, tuple[str, ...]]:
    """(n_classes, heads) of a saved embedding network's state dict."""
    found = {"instance": state.get("classifier.weight"), "center": state.get("centers.weight")}
    present = {k: v for k, v in found.items() if v is not None}
    return (next(iter(present.values())).shape[0] if present else 0), tuple(present)


__all__ = ["MODELS", "build_model", "is_closed_form", "heads_in", "Branch", "EmbeddingNet",
           "CCAModel", "SimilarityNet", "TwoWayNet", "SingleNet"]
