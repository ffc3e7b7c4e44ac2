"""The single network of Nawaz et al., "Revisiting Cross Modal Retrieval" (003 in papers/, SPEC §2):
ONE CNN embeds both images and captions, each caption first written as an image of its word
vectors ("encoded text", 003 §3.1, the scheme of their ref. [49], Gallo et al. ICDAR 2017), trained
with softmax + center loss (003 §3.3; itmatch/losses/center.py, `loss.name=softmax_center`).

    image ──────────────────────────────┐
    caption ─ words ─ word vectors ─ paint ┴─ one CNN ─ dropout ─ Linear → BN (f) ─┬─ L2 → embedding
                                                                                  ├─ classifier → softmax
                                                                                  └─ centers → center loss

The encoding (`CaptionLayout`, `encode_captions`): a word vector of length d = 3p is split into p
RGB triplets, i.e. p pixels; they form a `w`-wide block (w = ⌈√p⌉, rows of w pixels), each pixel
drawn as an s × s superpixel; the caption's words are written in reading order, left to right and
then the next row, a separator of g blank pixels between words, on a black square as large as the
images. A component v becomes the colour value 255·σ(v) (black, 0, is "no word").

What is the paper's (003 and its ref. [49]) and what is ours:

- paper: one network for both modalities (003 used InceptionResNet-V1; `model.image_tower` names
  ours: `convnet`, a small residual CNN from scratch, the default here and what fits a CPU; any
  image tower works, e.g. the ImageNet `efficientnet_lite0`); an image and its encoded captions
  as the input; a 128-d embedding (003 §5: the preset sets model.embed_dim=128); Adam at 1e-3;
  Euclidean nearest neighbours between L2-normalised embeddings (= cosine ranking, what the
  evaluator does); softmax with center loss (the center loss of their ref. [28], Wen et al., is
  always joint with a softmax over the classes; one class per training image here, the image and
  its captions sharing it).
- paper ([49]): word vectors split into RGB triplets drawn as superpixels, words in reading order
  with separators (model.encode_superpixel, model.encode_separator; the word's block width ⌈√p⌉ is
  ours). 12-d Word2Vec vectors in [49]'s demo: model.word_dim=12 in the preset.
- ours, word vectors: no Word2Vec model is available offline, so `model.word_vectors=minilm` (the
  preset) builds them from all-MiniLM-L6-v2's input token embeddings (a word = the mean of its word
  pieces), projected on the training vocabulary's top `word_dim` principal components
  (word_towers.minilm_word_vectors); unset: random vectors. The paper's vectors are fixed:
  model.train_text_tower=false (the preset); true lets the retrieval loss tune them.
- ours, colour mapping 255·σ(v) and the superpixel size picked as the largest that fits
  model.text_max_length words when model.encode_superpixel is unset.
- ours, one forward over the images and captions of a batch together, so the CNN's BatchNorm
  normalises the mixed batch the single network is fed (eval mode uses the running statistics of
  that mix); dropout (model.dropout) before the Linear → BN bottleneck as in FaceNet's
  InceptionResNet-V1, whose 128-d embedding 003 appears to use.
- ours, the center loss acts on the L2-normalised embedding (the space retrieval ranks in), the
  softmax on f before normalisation (as the instance loss, 004), both as the embedding network's
  heads do; the centers are learned by gradient (Wen et al. update them by a moving average).
- 003 §4.1's data configurations (`model.single_inputs`): `standard`, an image with its encoded
  captions; `config2`, in training also the image's horizontal flip and, for every caption, a
  second encoding cropped to 227/256 of the side at a random place (003: 227 × 227 crops of
  256 × 256), scaled back to the input size (nearest, so superpixels keep their colours; ours: the
  paper feeds the crop). Our batches hold 2–3 captions of each image (neighborhood sampling), so
  config2 has 4–6 encodings per image where 003 has ten.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itmatch.config import ModelConfig
from itmatch.data.batch import Batch, Inputs
from itmatch.models.towers import PixelPrep, build_image_tower
from itmatch.models.two_branch import TwoTower
from itmatch.models.word_towers import PAD, WordPrep, WordTower

CROP = 227 / 256
"""config2's crop of an encoded caption, as a fraction of its side (003 §4.1: 227 of 256)."""


@dataclass(frozen=True)
class CaptionLayout:
    """Where each word vector component goes in the encoded image (003 §3.1, [49])."""

    size: int
    """Side of the square image."""
    dim: int
    """Word vector length, 3 per pixel."""
    superpixel: int
    separator: int

    @property
    def block(self) -> tuple[int, int]:
        """(rows, columns) of pixels of one word: rows of ⌈√p⌉ pixels."""
        pixels = self.dim // 3
        width = math.ceil(math.sqrt(pixels))
        return math.ceil(pixels / width), width

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of words that fit: n blocks need n·side + (n − 1)·separator pixels."""
        (h, w), s, g = self.block, self.superpixel, self.separator
        return (self.size + g) // (h * s + g), (self.size + g) // (w * s + g)

    @property
    def capacity(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @classmethod
    def fit(cls, size: int, dim: int, words: int, superpixel: Optional[int], separator: int) -> "CaptionLayout":
        """The layout for `words` words: the given superpixel size, or the largest that fits them."""
        if dim % 3:
            raise ValueError(f"model.word_dim={dim}: the encoding splits word vectors into RGB triplets, "
                             "so it must be a multiple of 3")
        sizes = [superpixel] if superpixel else range(size, 0, -1)
        for s in sizes:
            layout = cls(size, dim, s, separator)
            if layout.capacity >= words:
                return layout
        raise ValueError(f"model.image_size={size} holds {cls(size, dim, sizes[-1], separator).capacity} words of "
                         f"model.word_dim={dim} (superpixel {sizes[-1]}, separator {separator}), fewer than "
                         f"model.text_max_length={words}")

    def source_index(self, words: int) -> Tensor:
        """[3, size, size] indices into a caption's flattened word vectors ([words·dim] values, then
        one zero at index words·dim for the background): pixel (c, y, x) shows value index[c, y, x]."""
        index = np.full((3, self.size, self.size), words * self.dim, dtype=np.int64)
        (h, w), s, g = self.block, self.superpixel, self.separator
        cols = self.grid[1]
        for k in range(min(words, self.capacity)):
            top, left = (k // cols) * (h * s + g), (k % cols) * (w * s + g)
            for j in range(self.dim // 3):
                y, x = top + (j // w) * s, left + (j % w) * s
                for c in range(3):
                    index[c, y:y + s, x:x + s] = k * self.dim + 3 * j + c
        return torch.from_numpy(index)


def encode_captions(vectors: Tensor, present: Tensor, source: Tensor) -> Tensor:
    """Encoded images [N, 3, S, S] with values in [0, 255] from word vectors [N, L, d] (`present`
    [N, L]: a word, not padding). A gather, so gradients reach the vectors when they learn."""
    values = 255.0 * torch.sigmoid(vectors) * present.unsqueeze(-1).to(vectors.dtype)
    flat = torch.cat([values.flatten(1), values.new_zeros(len(values), 1)], dim=1)
    return flat[:, source.flatten()].view(len(values), *source.shape)


def random_crops(x: Tensor, fraction: float = CROP) -> Tensor:
    """Each image cropped to a random square of `fraction` of its side and scaled back (nearest);
    offsets from torch's generator, which the trainer seeds per (seed, rank, epoch)."""
    side = x.shape[-1]
    crop = max(1, round(side * fraction))
    offsets = torch.randint(0, side - crop + 1, (len(x), 2)).tolist()
    crops = torch.stack([row[:, y:y + crop, x0:x0 + crop] for row, (y, x0) in zip(x, offsets)])
    return F.interpolate(crops, size=(side, side), mode="nearest")


class PixelTower(nn.Module):
    """The image side's input: decoded, augmented pixels (PixelPrep) passed on as they are; the
    one CNN normalises them, as it does the encoded captions."""

    trainable = False
    eval_batch = 64

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.prepare, self.tta_flip, self.out_dim = PixelPrep(cfg.image_size, cfg.augment), cfg.tta_flip, 0

    def forward(self, pixels: Tensor) -> Tensor:
        return pixels


class CaptionImageTower(WordTower):
    """Captions -> encoded images (003 §3.1): the training split's vocabulary (extra state, as the
    other word towers), a word-vector lookup and the layout. Words from the top-left corner, no
    position shift (004's augmentation is not 003's)."""

    eval_batch = 256

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.prepare = WordPrep([], cfg.text_max_length, shift=False)
        self.lookup = nn.Embedding(cfg.vocab_size + 2, cfg.word_dim, padding_idx=PAD)
        self.layout = CaptionLayout.fit(cfg.image_size, cfg.word_dim, cfg.text_max_length, cfg.encode_superpixel,
                                        cfg.encode_separator)
        self.register_buffer("source", self.layout.source_index(cfg.text_max_length), persistent=False)
        self.stages, self.out_dim = [self.lookup], 0

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.prepare = WordPrep(self.vocabulary, self.cfg.text_max_length, shift=False)

    def _lookup_weight(self) -> Tensor:
        return self.lookup.weight

    def forward(self, ids: Tensor) -> Tensor:
        return encode_captions(self.lookup(ids), ids != PAD, self.source)


class SingleNet(TwoTower):
    """forward(batch) -> named outputs over the rows the network saw (in training with config2,
    the batch's rows and then their augmented copies):

    - "img", "txt": unit embeddings; "img_cls", "txt_cls": each row's class (training image);
    - with heads (n_classes > 0): "img_logits", "txt_logits" (one classifier for both, on f) and
      "img_center", "txt_center" (each row's class center).
    """

    def __init__(self, cfg: ModelConfig, n_classes: int = 0) -> None:
        super().__init__()
        self.image_tower, self.text_tower = PixelTower(cfg), CaptionImageTower(cfg)
        self.dims, self.towers_frozen, self.inputs = (0, 0), False, cfg.single_inputs
        if not cfg.train_text_tower:  # 003's word vectors are fixed
            self.text_tower.trainable = False
            self.text_tower.requires_grad_(False)
        self.cnn = build_image_tower(cfg)  # the single network: not a tower, it is the model
        self.dropout = nn.Dropout(cfg.dropout)
        # No bias before BatchNorm (BN's shift is the bias).
        self.bottleneck = nn.Sequential(nn.Linear(self.cnn.out_dim, cfg.embed_dim, bias=False),
                                        nn.BatchNorm1d(cfg.embed_dim))
        self.classifier = nn.Linear(cfg.embed_dim, n_classes, bias=False) if n_classes else None
        self.centers = nn.Embedding(n_classes, cfg.embed_dim) if n_classes else None
        if self.centers is not None:  # start on the unit sphere's scale, where the embeddings are
            nn.init.normal_(self.centers.weight, std=cfg.embed_dim ** -0.5)

    def features(self, x: Tensor) -> Tensor:
        """f: encoded captions or pixels in [0, 255] -> the bottleneck's output, before L2."""
        return self.bottleneck(self.dropout(self.cnn(x)))

    def augmented(self, x_img: Tensor, x_txt: Tensor, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(images, captions, their classes): config2 adds flips and cropped encodings in training."""
        img_cls, txt_cls = batch.image_cls.to(x_txt.device), batch.text_cls.to(x_txt.device)
        if not (self.training and self.inputs == "config2"):
            return x_img, x_txt, img_cls, txt_cls
        return (torch.cat([x_img, x_img.flip(-1)]), torch.cat([x_txt, random_crops(x_txt)]),
                img_cls.repeat(2), txt_cls.repeat(2))

    def from_features(self, x_img: Tensor, x_txt: Tensor, batch: Batch) -> dict[str, Tensor]:
        x_img, x_txt, img_cls, txt_cls = self.augmented(x_img, x_txt, batch)
        f = self.features(torch.cat([x_img.to(x_txt.dtype), x_txt]))  # one pass: BN sees the mixed batch
        f_img, f_txt = f[:len(x_img)], f[len(x_img):]
        out = {"img": F.normalize(f_img, dim=-1), "txt": F.normalize(f_txt, dim=-1), "img_cls": img_cls,
               "txt_cls": txt_cls}
        if self.classifier is not None:
            out.update(img_logits=self.classifier(f_img), txt_logits=self.classifier(f_txt),
                       img_center=self.centers(img_cls), txt_center=self.centers(txt_cls))
        return out

    @torch.no_grad()
    def embed_images(self, x: Inputs) -> Tensor:
        return F.normalize(self.features(self.image_tower(x).float()), dim=-1)

    @torch.no_grad()
    def embed_texts(self, x: Inputs) -> Tensor:
        return F.normalize(self.features(self.text_tower(x)), dim=-1)


def build_single(image_dim: int, text_dim: int, cfg: ModelConfig, n_classes: int = 0,
                 heads: Sequence[str] = ()) -> SingleNet:
    """MODELS["single"]: the widths of cached features do not apply (it reads pixels and words)."""
    return SingleNet(cfg, n_classes)


__all__ = ["CaptionLayout", "CaptionImageTower", "PixelTower", "SingleNet", "build_single", "encode_captions",
           "random_crops", "CROP"]
