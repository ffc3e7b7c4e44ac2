"""Towers: what turns a batch's raw inputs (cached features, pixels, token ids) into the feature
vectors the branches take. A model is image tower + text tower + the two branches + heads.

On cached features a tower is the identity; encoder towers (an image CNN, a text encoder) plug in
here through `TOWERS` and everything after them (branches, heads, objective, evaluation) is
unchanged.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn


class FeatureTower(nn.Module):
    """Cached features in, the same features out: the frozen-feature path. No parameters, so a
    checkpoint's keys are those of the branches alone."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x


# name -> (input dim of cached features, or None for encoders that define their own) -> tower
TOWERS: dict[str, Callable[[int], nn.Module]] = {"features": FeatureTower}


def build_tower(name: str, dim: int) -> nn.Module:
    if name not in TOWERS:
        raise KeyError(f"tower {name!r} unknown; choices: {sorted(TOWERS)}")
    return TOWERS[name](dim)


__all__ = ["TOWERS", "FeatureTower", "build_tower"]
