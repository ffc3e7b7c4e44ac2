"""An ensemble of trained embedding models, e.g. one configuration trained with several seeds.

Each member's unit embeddings are laid side by side and scaled by 1/sqrt(n), so the cosine of an
image and a caption under the ensemble is the mean of the members' cosines: retrieval by the
ensemble ranks by the averaged similarity, and the result is again one unit embedding per input,
which the evaluator, the registered MLflow model and serving use unchanged. Measured on the
Flickr8k-1k features: three seeds of the frozen-feature preset average 400.3 test rsum alone and
reach 419.4 together (BENCHMARKS.md).

On disk an ensemble is a folder holding each member's checkpoint folder (`member_<i>/`) and
`ensemble.json` (the member list, written last, so a folder with it is complete).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ENSEMBLE_FILE = "ensemble.json"


class Ensemble(nn.Module):
    """Members that take the same inputs (one configuration, other seeds): their towers prepare
    inputs identically, so the first member's preparation serves all of them."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        refused = [type(m).__name__ for m in members if hasattr(m, "score_matrix")]
        if refused:  # a learned pair score is not a cosine: averaging embeddings would not average it
            raise ValueError(f"members with a learned pair score ({refused[0]}) cannot be ensembled by embedding")
        self.members = nn.ModuleList(members)
        self.dims = tuple(getattr(members[0], "dims", ()))

    @property
    def image_tower(self) -> nn.Module:
        return self.members[0].image_tower

    @property
    def text_tower(self) -> nn.Module:
        return self.members[0].text_tower

    def _joined(self, parts: list[Tensor]) -> Tensor:
        return torch.cat([F.normalize(p.float(), dim=-1) for p in parts], dim=-1) / math.sqrt(len(parts))

    @torch.no_grad()
    def embed_images(self, x) -> Tensor:
        return self._joined([m.embed_images(x) for m in self.members])

    @torch.no_grad()
    def embed_texts(self, x) -> Tensor:
        return self._joined([m.embed_texts(x) for m in self.members])


def is_ensemble(folder: str | Path) -> bool:
    return (Path(folder) / ENSEMBLE_FILE).is_file()


def save_ensemble(folder: str | Path, members: Sequence[str | Path], sources: Sequence[str] = ()) -> Path:
    """Copy each member checkpoint folder into `folder` and write the member list last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, member in enumerate(members):
        target = folder / f"member_{i}"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(member, target)
        names.append(target.name)
    record = {"members": names, "sources": [str(s) for s in (sources or members)]}
    tmp = folder / (ENSEMBLE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(folder / ENSEMBLE_FILE)
    return folder


def member_folders(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return [folder / name for name in json.loads((folder / ENSEMBLE_FILE).read_text())["members"]]


__all__ = ["ENSEMBLE_FILE", "Ensemble", "is_ensemble", "member_folders", "save_ensemble"]
