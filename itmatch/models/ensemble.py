"""An ensemble of trained embedding models, e.g. one configuration trained with several seeds.

Each member's unit embeddings are laid side by side and scaled by 1/sqrt(n), so the cosine of an
image and a caption under the ensemble is the mean of the members' cosines: retrieval by the
ensemble ranks by the averaged similarity, and the result is again one unit embedding per input,
which the evaluator, the registered MLflow model and serving use unchanged. Measured on the
Flickr8k-1k features: three seeds of the frozen-feature preset average 400.3 test rsum alone and
reach 419.4 together (BENCHMARKS.md).

Members may carry weights (summing to 1; equal by default): the ensemble's cosine is then the
weighted mean of the members' cosines, e.g. closed-form CCA as a minor member beside trained runs.

An ensemble may carry a hubness correction (itmatch.models.hubness: CSLS against a bank of
training embeddings), applied to the joined embeddings; its bank is `hubness.pt` in the folder.

On disk an ensemble is a folder holding each member's checkpoint folder (`member_<i>/`) and
`ensemble.json` (the member list and weights, written last, so a folder with it is complete).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itmatch.files import replace_folder, staging_folder
from itmatch.models.hubness import HubnessCorrection

ENSEMBLE_FILE = "ensemble.json"
HUBNESS_FILE = "hubness.pt"


class Ensemble(nn.Module):
    """Members that take the same inputs (one configuration, other seeds): their towers prepare
    inputs identically, so the first member's preparation serves all of them."""

    def __init__(self, members: Sequence[nn.Module], weights: Optional[Sequence[float]] = None,
                 hubness: Optional[HubnessCorrection] = None) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.weights = member_weights(len(members), weights)
        refused = [type(m).__name__ for m in members if hasattr(m, "score_matrix")]
        if refused:  # a learned pair score is not a cosine: averaging embeddings would not average it
            raise ValueError(f"members with a learned pair score ({refused[0]}) cannot be ensembled by embedding")
        self.members = nn.ModuleList(members)
        self.dims = tuple(getattr(members[0], "dims", ()))
        self.hubness = hubness

    @property
    def core_dim(self) -> Optional[int]:
        """Width of the unit embedding before the hubness columns (None: no correction)."""
        return None if self.hubness is None else self.hubness.core_dim

    @property
    def image_tower(self) -> nn.Module:
        return self.members[0].image_tower

    @property
    def text_tower(self) -> nn.Module:
        return self.members[0].text_tower

    def _joined(self, parts: list[Tensor]) -> Tensor:
        # sqrt(w_i) on each unit part: the joined vectors are unit, their dot product sum_i w_i cos_i
        return torch.cat([math.sqrt(w) * F.normalize(p.float(), dim=-1) for p, w in zip(parts, self.weights)], dim=-1)

    @torch.no_grad()
    def embed_images(self, x) -> Tensor:
        e = self._joined([m.embed_images(x) for m in self.members])
        return e if self.hubness is None else self.hubness.images(e)

    @torch.no_grad()
    def embed_texts(self, x) -> Tensor:
        t = self._joined([m.embed_texts(x) for m in self.members])
        return t if self.hubness is None else self.hubness.texts(t)


def member_weights(n: int, weights: Optional[Sequence[float]] = None) -> list[float]:
    """Equal weights by default; given ones must be n finite, non-negative numbers with a positive
    sum, and are scaled to sum to 1."""
    if weights is None:
        return [1.0 / n] * n
    values = [float(w) for w in weights]
    if len(values) != n or not all(math.isfinite(w) and w >= 0 for w in values) or sum(values) <= 0:
        raise ValueError(f"ensemble weights must be {n} non-negative numbers with a positive sum, got {list(weights)}")
    return [w / sum(values) for w in values]


def is_ensemble(folder: str | Path) -> bool:
    return (Path(folder) / ENSEMBLE_FILE).is_file()


def save_ensemble(folder: str | Path, members: Sequence[str | Path], sources: Sequence[str] = (),
                  weights: Optional[Sequence[float]] = None) -> Path:
    """Copy each member checkpoint folder into `folder` and write the member list (and weights) last:
    written beside it (`stage_ensemble`) and swapped in complete (`itmatch.files.replace_folder`), so
    a failure midway leaves an ensemble already in `folder` as it was."""
    return replace_folder(stage_ensemble(folder, members, sources, weights), folder)


def stage_ensemble(folder: str | Path, members: Sequence[str | Path], sources: Sequence[str] = (),
                   weights: Optional[Sequence[float]] = None) -> Path:
    """The ensemble `save_ensemble` writes, in a staging sibling of `folder` (removed on failure):
    returns it, for `itmatch.files.replace_folder` once whatever else belongs in it (a hubness bank) is there too."""
    weights = member_weights(len(members), weights)
    staged = staging_folder(folder)
    staged.parent.mkdir(parents=True, exist_ok=True)
    try:
        staged.mkdir()
        names = []
        for i, member in enumerate(members):
            shutil.copytree(member, staged / f"member_{i}")
            names.append(f"member_{i}")
        record = {"members": names, "sources": [str(s) for s in (sources or members)], "weights": weights}
        (staged / ENSEMBLE_FILE).write_text(json.dumps(record, indent=2))  # last: a folder with it is complete
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def save_hubness(folder: str | Path, correction: HubnessCorrection, reference: str) -> None:
    """Attach a hubness correction to a saved ensemble: its bank first, then the record in
    ensemble.json (replaced atomically: a crash between leaves the ensemble without it)."""
    folder = Path(folder)
    tmp = folder / (HUBNESS_FILE + ".tmp")
    # float16 on disk: half the size, and a penalty is a mean of cosines (|error| < 1e-3)
    torch.save({"ref_images": correction.ref_images.half().cpu(), "ref_texts": correction.ref_texts.half().cpu()}, tmp)
    tmp.replace(folder / HUBNESS_FILE)
    record = json.loads((folder / ENSEMBLE_FILE).read_text())
    record["hubness"] = {"k": correction.k, "weight": correction.weight, "file": HUBNESS_FILE, "reference": reference}
    tmp = folder / (ENSEMBLE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(folder / ENSEMBLE_FILE)


def saved_hubness(folder: str | Path) -> Optional[HubnessCorrection]:
    """The hubness correction recorded in an ensemble folder, if any (ValueError/OSError when its
    record or bank is unusable)."""
    folder = Path(folder)
    record = json.loads((folder / ENSEMBLE_FILE).read_text()).get("hubness")
    if record is None:
        return None
    if not isinstance(record, dict) or not {"k", "weight", "file"} <= set(record):
        raise ValueError(f"field 'hubness' must hold k, weight and file, got {record!r}")
    path = folder / str(record["file"])
    try:
        bank = torch.load(path, map_location="cpu", weights_only=True)
        return HubnessCorrection(bank["ref_images"], bank["ref_texts"], int(record["k"]), float(record["weight"]))
    except Exception as exc:  # noqa: BLE001 - any unreadable bank is one clear error naming the file
        raise ValueError(f"hubness bank {path}: {type(exc).__name__}: {exc}") from exc


def member_folders(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return [folder / name for name in json.loads((folder / ENSEMBLE_FILE).read_text())["members"]]


def saved_weights(folder: str | Path) -> Optional[list[float]]:
    """The members' weights in an ensemble folder (None: equal, as folders written before weights)."""
    return json.loads((Path(folder) / ENSEMBLE_FILE).read_text()).get("weights")


__all__ = ["ENSEMBLE_FILE", "HUBNESS_FILE", "Ensemble", "is_ensemble", "member_folders", "member_weights",
           "save_ensemble", "save_hubness", "saved_hubness", "saved_weights", "stage_ensemble"]
