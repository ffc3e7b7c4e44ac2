"""The named batch every model and objective takes: the same structure for cached features,
pixels or token ids.

A batch holds one worker's share of a global batch: its unique images and its captions, each
with their tower inputs, group ids (positives share one) and instance classes (the image's row in
the training split, 004's one class per training image). `Batch.images` / `Batch.texts` are what
the towers consume: a [N, D] feature tensor for the identity tower over cached features, a
[N, 3, H, W] pixel tensor for an image CNN, or a dict of token tensors for a text encoder; a
batch cut from Stage I's tower cache (`TowerCache`) holds the frozen towers' outputs instead.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Protocol, Union

import numpy as np
import torch
from torch import Tensor

from itmatch.config import DataConfig

Inputs = Union[Tensor, dict[str, Tensor]]


def move(x: Inputs, device: torch.device, dtype: Optional[torch.dtype] = None) -> Inputs:
    if isinstance(x, dict):
        return {k: move(v, device, dtype) for k, v in x.items()}  # type: ignore[misc]
    x = x.to(device)
    return x.to(dtype) if dtype is not None and x.is_floating_point() else x


@dataclass
class Boxes:
    """Where the rows of a region-phrase batch lie (001 Algorithm 1): every image row is a region of
    a picture, every text row a phrase with its ground-truth box (0-based exclusive pixels). The
    objective derives a phrase's negative regions from them: same picture, IoU < 0.3."""

    image_picture: Tensor
    """[Ni] the picture (a row of the split's pictures) each region lies in."""
    image_box: Tensor
    """[Ni, 4] each region's box."""
    text_picture: Tensor
    """[Nt] the picture each phrase describes."""
    text_box: Tensor
    """[Nt, 4] each phrase's ground-truth box."""

    def to(self, device: torch.device) -> "Boxes":
        return Boxes(*(t.to(device) for t in (self.image_picture, self.image_box, self.text_picture, self.text_box)))


@dataclass
class Batch:
    images: Inputs
    """Image tower inputs, one row per unique image of the batch."""
    texts: Inputs
    """Text tower inputs, one row per caption."""
    image_gid: Tensor
    text_gid: Tensor
    image_cls: Tensor
    """Instance class of each image (its row in the training split)."""
    text_cls: Tensor
    """Instance class of each caption (its image's row)."""
    pairs: Optional[tuple[Tensor, Tensor, Tensor]] = None
    """(image rows, text rows, labels) of sampled pairs, for objectives that score pairs."""
    boxes: Optional[Boxes] = None
    """Region-phrase batches only: the rows' pictures and boxes (None for image-caption batches)."""
    tower_outputs: bool = False
    """`images` / `texts` are already the (frozen) towers' outputs, cut from Stage I's tower cache
    (`TowerCache`): the model skips its towers and feeds them to the branches as they are."""

    @classmethod
    def of(cls, images: Inputs, texts: Inputs, *, image_gid: Optional[Tensor] = None,
           text_gid: Optional[Tensor] = None, image_cls: Optional[Tensor] = None, text_cls: Optional[Tensor] = None,
           pairs: Optional[tuple[Tensor, Tensor, Tensor]] = None) -> "Batch":
        """A batch from tower inputs; ids not given default to the row numbers (enough for a forward
        pass that no objective reads them from, e.g. embedding a gallery)."""
        rows = lambda x: torch.arange(len(next(iter(x.values())) if isinstance(x, dict) else x))  # noqa: E731
        image_gid = rows(images) if image_gid is None else image_gid
        text_gid = rows(texts) if text_gid is None else text_gid
        return cls(images, texts, image_gid, text_gid, image_gid if image_cls is None else image_cls,
                   text_gid if text_cls is None else text_cls, pairs)

    def __len__(self) -> int:
        return len(self.text_gid)

    def to(self, device: torch.device) -> "Batch":
        moved = {f: move(getattr(self, f), device) for f in ("images", "texts", "image_gid", "text_gid",
                                                             "image_cls", "text_cls")}
        pairs = tuple(t.to(device) for t in self.pairs) if self.pairs is not None else None
        boxes = self.boxes.to(device) if self.boxes is not None else None
        return replace(self, **moved, pairs=pairs, boxes=boxes)

    def cast_inputs(self, dtype: torch.dtype) -> "Batch":
        """Floating tower inputs in `dtype` (DeepSpeed bf16 weights take bf16 inputs); ids untouched.
        Cached tower outputs stay as the towers gave them (already in the training precision)."""
        if self.tower_outputs:
            return self
        device = self.image_gid.device
        return replace(self, images=move(self.images, device, dtype), texts=move(self.texts, device, dtype))


class Prepare(Protocol):
    """A tower's input preparation: raw items (feature rows, PIL images, strings) -> tower inputs."""

    def __call__(self, items: Any, *, train: bool = False, rng: Optional[np.random.Generator] = None) -> Inputs: ...


def caption_items(split, prepare: Prepare, rows: np.ndarray) -> Any:
    """What a text tower reads for these caption rows: the caption strings for a tower that
    tokenises (`prepare.reads == "texts"`, e.g. a text encoder beside cached image features), else
    the split's own items (feature rows, or the raw store's strings)."""
    if getattr(prepare, "reads", None) == "texts":
        return [split.texts[int(r)] for r in np.asarray(rows)]
    return split.captions_at(rows)


def make_batch(split, captions: np.ndarray, prepare_image: Prepare, prepare_text: Prepare, *,
               train: bool = False, rng: Optional[np.random.Generator] = None,
               data: Optional[DataConfig] = None) -> Batch:
    """The batch for these caption rows of a split (FeatureSplit or RawSplit): its unique images
    and the captions, each prepared by its tower (`rng` draws the augmentation, seeded by the caller
    per step so a resumed run replays it). A split that builds its own batches (region-phrase data:
    regions and proposals around the phrases, 001 Algorithm 1) has a `make_batch` method, which
    takes the run's `data` settings."""
    if hasattr(split, "make_batch"):
        return split.make_batch(captions, prepare_image, prepare_text, train=train, rng=rng, data=data)
    rows = np.unique(split.caption_image[captions])
    return Batch(images=prepare_image(split.images_at(rows), train=train, rng=rng),
                 texts=prepare_text(caption_items(split, prepare_text, captions), train=train, rng=rng),
                 **_ids(split, captions, rows))


def _ids(split, captions: np.ndarray, rows: np.ndarray) -> dict[str, Tensor]:
    """A batch's group ids and instance classes (`rows`: its unique image rows, sorted)."""
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return dict(image_gid=as_tensor(split.image_ids[rows]), text_gid=as_tensor(split.caption_gid[captions]),
                image_cls=as_tensor(rows), text_cls=as_tensor(split.caption_image[captions]))


@dataclass
class TowerCache:
    """Stage I on cached tower features (model.tower_cache_stage_one): the frozen towers' outputs
    for every image and caption of the training split, computed once (trainers/loop.py), from which
    Stage I's batches are cut instead of running the towers on every step."""

    images: list[Tensor]
    """[Ni, D] per view: the un-augmented image, then (where training flips) its horizontal flip."""
    texts: Tensor
    """[Nc, D] the un-augmented captions."""

    def batch(self, split, captions: np.ndarray, rng: np.random.Generator) -> Batch:
        """The batch `make_batch` would give for these caption rows, as tower outputs; with two views
        each image's is drawn from `rng` (seeded per step by the caller, so a resumed run replays it)."""
        rows = np.unique(split.caption_image[captions])
        index = torch.from_numpy(rows).to(self.texts.device)
        images = self.images[0][index]
        if len(self.images) > 1:  # a fair coin per image, as the pixel augmentation's flip
            flip = torch.from_numpy(rng.random(len(rows)) < 0.5).to(images.device)
            images = torch.where(flip[:, None], self.images[1][index], images)
        texts = self.texts[torch.from_numpy(np.asarray(captions, dtype=np.int64)).to(self.texts.device)]
        return Batch(images=images, texts=texts, **_ids(split, captions, rows), tower_outputs=True)


def _features(items: Any, *, train: bool = False, rng: Optional[np.random.Generator] = None) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(items))


def feature_batch(split, captions: np.ndarray, device: torch.device | str = "cpu") -> Batch:
    """The batch of cached features for these caption rows of a `FeatureSplit`."""
    return make_batch(split, captions, _features, _features).to(torch.device(device))


__all__ = ["Batch", "Boxes", "Inputs", "Prepare", "TowerCache", "caption_items", "make_batch", "feature_batch",
           "move"]
