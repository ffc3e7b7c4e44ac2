"""Region-phrase data as a feature store: the phrase localization task's counterpart of store.py.

`prepare_phrases(source)` reads an `entities:` or `shapes-phrases:` source (itmatch.phrases), crops
every region of every picture (the ground-truth region of each coreference chain and every region
proposal) and encodes the crops with the image encoder (`data.image_encoder`), encodes the phrases
with the text encoder (`data.text_encoder`), and caches per split, in a folder keyed by the source's
files and the encoders like the image-caption features:

    {split}_regions.parquet   region_gid, image_id, proposal_index (-1: ground truth), box, feature;
                              per picture (ascending image_id) its ground-truth regions, then its proposals
    {split}_phrases.parquet   phrase_id, caption_id, image_id, region_gid (its chain's region), text, box, feature
    manifest.json             kind "phrases", source, encoders, dims, per-split digests and counts

For an image tower trained on the crops (`model.image_tower` an encoder, frozen or fine-tuned) the
store is raw instead (`prepare_phrases(..., raw_images=True)`, manifest "raw": true, no encoder
runs): the same two tables without their feature columns, and `{split}_pictures.parquet`
(image_id, image: the picture's encoded bytes); its split (`RawPhraseSplit`) hands the image
tower the crops of a batch's regions (each picture decoded once per batch) and the text tower the
phrases' text.

`PhraseStore.split(name)` is a `PhraseSplit`: a `FeatureSplit` whose "images" are regions and whose
"captions" are phrases, so everything that takes a FeatureSplit (the sampler, embedding a split,
the closed-form CCA fit, MLflow's dataset record) takes it too. A region's group id (`image_ids`) is
its chain's region id for a ground-truth region and a unique negative number for a proposal, so
a phrase's positive "image" is its ground-truth region. What differs is batch construction
(`make_batch`: 001 Algorithm 1, phrase_batch.py) and evaluation (itmatch.eval.phrases).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from itmatch.config import DataConfig
from itmatch.data.batch import Batch, Prepare
from itmatch.data.images import to_rgb
from itmatch.data.phrase_batch import phrase_batch
from itmatch.data.readers import Corpus, column_to_numpy, features_column
from itmatch.data.sources import DataError, parse_source, typed_options
from itmatch.data.store import (FeatureSplit, FeatureStore, atomic_write_table, cache_key, _check_finite, _digest,
                                drop_bad_images, check_encoder_names, decode_images, image_bytes, make_cache_folder,
                                read_cached_manifest, write_manifest)
from itmatch.phrases.entities import PhraseCorpus, boxes_column, boxes_of, check_image_sizes, read_entities

SCHEMA_VERSION = 1
KIND = "phrases"
_SHAPES_OPTIONS = {"n_images": int, "seed": int, "image_size": int, "n_captions": int, "jitter_per_region": int,
                   "random_proposals": int, "val_fraction": float, "test_fraction": float}
_ENTITIES_OPTIONS = ("proposals", "images")
RAW_ENCODERS = ("pixels (raw crops)", "words (raw)")
"""What a raw store's manifest names as its encoders (and what keys its cache folder)."""


# --------------------------------------------------------------------------- sources


def read_phrase_source(text: str) -> PhraseCorpus:
    """`entities:ROOT[?proposals=FILE&images=DIR]` or `shapes-phrases:DIR[?n_images=N&seed=S&...]`
    (written there once by `write_shapes_entities`) -> the corpus, with proposals and image paths."""
    source = parse_source(text)
    if source.scheme == "shapes-phrases":
        from itmatch.phrases.synthetic import write_shapes_entities

        options = typed_options(source, _SHAPES_OPTIONS)
        try:
            root = write_shapes_entities(source.location, **options)
        except ValueError as exc:  # the writer's own checks: option ranges (named), a file where the folder goes
            raise DataError(f"data.source {text!r}: {exc}") from None
        except OSError as exc:  # its region files (the scenes' own errors are ValueErrors above): not a traceback
            raise DataError(f"data.source {text!r}: {source.location}: cannot write the region-phrase data there "
                            f"({exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''})") from None
        corpus = read_entities(root, check_sizes=False)  # as below
    elif source.scheme == "entities":
        typed_options(source, dict.fromkeys(_ENTITIES_OPTIONS, str))
        corpus = read_entities(source.location, image_dir=source.options.get("images"),
                               proposals=source.options.get("proposals"), check_sizes=False)  # prepare_phrases
    else:
        raise DataError(f"data.source {text!r}: {source.scheme}: is image-caption data, not region-phrase data")
    _check_usable(corpus)
    return corpus


def _check_usable(corpus: PhraseCorpus) -> None:
    if corpus.proposals is None:
        raise DataError(f"{corpus.name}: no region proposals ({corpus.name.split(':', 1)[-1]}/proposals.parquet or "
                        "?proposals=FILE): phrase localization ranks proposals, and training draws its negative "
                        "regions from them")
    if corpus.images.column("path").null_count:
        raise DataError(f"{corpus.name}: no image folder (images/ beside Sentences/, or ?images=DIR): region "
                        "features are computed from crops of the images")
    if corpus.phrases.num_rows == 0:
        raise DataError(f"{corpus.name}: no phrase with a box (dropped: {corpus.dropped})")
    if corpus.proposals.num_rows == 0:  # an empty file, or one of another image set
        raise DataError(f"{corpus.proposals_file}: no proposal for any of the {corpus.images.num_rows} images of "
                        f"{corpus.name}: phrase localization ranks each phrase over its picture's proposals")


def _check_proposals_cover(corpus: PhraseCorpus, splits: list[str]) -> None:
    """Refuse pictures of the run's splits that have phrases but no proposal: their phrases could
    never be localized (a miss in every metric, the upper bound included) and training would find
    no negative region in them; a split whose pictures all lack them gives a model scoring 0."""
    image_ids = corpus.images.column("image_id").to_numpy()
    split_of = np.asarray(corpus.images.column("split").to_pylist())
    has_phrases = np.isin(image_ids, corpus.phrases.column("image_id").to_numpy())
    lacking = has_phrases & ~np.isin(image_ids, corpus.proposals.column("image_id").to_numpy())
    for split in splits:
        ids = image_ids[lacking & (split_of == split)]
        if ids.size:
            total = int((has_phrases & (split_of == split)).sum())
            raise DataError(f"{corpus.proposals_file}: no proposals for {ids.size} of {total} images with phrases "
                            f"of split {split!r}, e.g. image ids {ids[:5].tolist()}: their phrases could never be "
                            "localized")


def caption_view(corpus: PhraseCorpus) -> Corpus:
    """The corpus as pictures and phrases in the image-caption reader's schema (encoder checks)."""
    images = corpus.images.select(["image_id", "split", "path"])
    phrases = corpus.phrases.select(["phrase_id", "image_id", "split", "text"]).rename_columns(
        ["caption_id", "image_id", "split", "text"])
    return Corpus(images, phrases, corpus.name, corpus.files)


# --------------------------------------------------------------------------- featurising crops


def region_rows(corpus: PhraseCorpus) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image_id, region_gid, proposal_index, box) of every region of the corpus (one split), per
    picture its ground-truth regions (by region id) then its proposals (by index). A proposal's
    group id is -(1 + its row): unique, and never a chain's."""
    gt, props = corpus.regions, corpus.proposals
    image_id = np.concatenate([gt.column("image_id").to_numpy(), props.column("image_id").to_numpy()])
    region_id = gt.column("region_id").to_numpy()
    index = props.column("proposal_index").to_numpy().astype(np.int64)
    is_proposal = np.r_[np.zeros(len(region_id), bool), np.ones(len(index), bool)]
    within = np.concatenate([region_id, index])  # order inside a picture's ground truths / proposals
    order = np.lexsort((within, is_proposal, image_id))
    boxes = np.concatenate([boxes_of(gt.column("box")), boxes_of(props.column("box"))])[order]
    gid = np.where(is_proposal[order], -1 - np.arange(len(order)), within[order])
    proposal_index = np.where(is_proposal, within, -1)[order].astype(np.int32)
    return image_id[order].astype(np.int64), gid.astype(np.int64), proposal_index, boxes.astype(np.float32)


def pixel_box(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """A box as whole pixels inside the image, at least one pixel wide and high (what PIL crops)."""
    x1 = min(max(math.floor(float(box[0])), 0), width - 1)
    y1 = min(max(math.floor(float(box[1])), 0), height - 1)
    x2 = max(min(math.ceil(float(box[2])), width), x1 + 1)
    y2 = max(min(math.ceil(float(box[3])), height), y1 + 1)
    return x1, y1, x2, y2


def _crops(paths: dict[int, str], image_ids: np.ndarray, boxes: np.ndarray) -> Iterator:
    """The crop of every row, rows grouped by picture: each picture is decoded once."""
    from PIL import Image

    starts = np.flatnonzero(np.r_[True, image_ids[1:] != image_ids[:-1]])
    for lo, hi in zip(starts, np.r_[starts[1:], len(image_ids)]):
        path = paths[int(image_ids[lo])]
        try:
            with Image.open(path) as opened:
                image = to_rgb(opened)
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{path}: cannot decode image ({exc})") from exc
        for box in boxes[lo:hi]:
            yield image.crop(pixel_box(box, *image.size))


def crop_features(paths: dict[int, str], image_ids: np.ndarray, boxes: np.ndarray, encoder_name: str,
                  progress: bool = False) -> np.ndarray:
    """[rows, dim] features of the crops (boxes of pictures `image_ids`, rows grouped by picture) from
    the named frozen image encoder, the one that featurises whole images for retrieval."""
    from itmatch.data.encoders import build_image_encoder

    return build_image_encoder(encoder_name).encode(_crops(paths, image_ids, boxes), progress=progress)


def _write_tables(part: PhraseCorpus, split: str, root: Path, rows: tuple, region_feats: Optional[np.ndarray],
                  phrase_feats: Optional[np.ndarray]) -> None:
    """The split's region and phrase tables (with their feature columns where features are given)."""
    image_id, gid, proposal_index, boxes = rows
    feature = lambda x: {} if x is None else {"feature": features_column(x)}  # noqa: E731
    atomic_write_table(pa.table({"region_gid": gid, "image_id": image_id, "proposal_index": proposal_index,
                                  "box": boxes_column(boxes), **feature(region_feats)}),
                        root / f"{split}_regions.parquet")
    phrases = part.phrases
    atomic_write_table(pa.table({
        "phrase_id": phrases.column("phrase_id"), "caption_id": phrases.column("caption_id"),
        "image_id": phrases.column("image_id"), "region_gid": phrases.column("region_id"),
        "text": phrases.column("text"), "box": phrases.column("box"), **feature(phrase_feats),
    }), root / f"{split}_phrases.parquet")


def _counts(part: PhraseCorpus, rows: tuple) -> dict[str, int]:
    return {"images": part.images.num_rows, "phrases": part.phrases.num_rows, "regions": len(rows[1]),
            "proposals": int((rows[2] >= 0).sum())}


def _ingest_split(corpus: PhraseCorpus, split: str, root: Path, image_encoder: str, text_encoder: str,
                  progress: bool) -> dict[str, Any]:
    from itmatch.data.encoders import build_text_encoder

    part = corpus.split(split)
    rows = image_id, gid, _, boxes = region_rows(part)
    paths = dict(zip(part.images.column("image_id").to_pylist(), part.images.column("path").to_pylist()))
    region_feats = crop_features(paths, image_id, boxes, image_encoder, progress)
    phrase_feats = build_text_encoder(text_encoder).encode(part.phrases.column("text").to_pylist(), progress=progress)
    where = f"{corpus.name}: split {split!r}"
    _check_finite(region_feats, f"{where}: region features")
    _check_finite(phrase_feats, f"{where}: phrase features")
    _write_tables(part, split, root, rows, region_feats, phrase_feats)
    return {"digest": _digest(image_id, gid, boxes, region_feats, phrase_feats), **_counts(part, rows),
            "dims": [int(region_feats.shape[1]), int(phrase_feats.shape[1])]}


def _write_raw_split(corpus: PhraseCorpus, split: str, root: Path) -> dict[str, Any]:
    """The raw split: every picture checked to decode (a DataError naming the first that does
    not), stored as its encoded bytes, beside the region and phrase tables without features."""
    part = corpus.split(split)
    pictures = part.images.select(["image_id", "path"]).sort_by("image_id")
    drop_bad_images(pictures, part.phrases, "fail", f"{corpus.name}: split {split!r}")
    atomic_write_table(pa.table({"image_id": pictures.column("image_id"), "image": image_bytes(pictures)}),
                        root / f"{split}_pictures.parquet")
    rows = image_id, gid, _, boxes = region_rows(part)
    _write_tables(part, split, root, rows, None, None)
    texts = np.frombuffer("\n".join(part.phrases.column("text").to_pylist()).encode("utf-8"), np.uint8)
    return {"digest": _digest(image_id, gid, boxes, texts, pictures.column("image_id").to_numpy()),
            **_counts(part, rows), "dims": [0, 0]}


def cache_name(corpus: PhraseCorpus, image_encoder: str, text_encoder: str) -> str:
    """The store folder's name: the source's files (sizes, times) and the encoders, as for captions,
    and what was read from them: an Annotations or Sentences file edited in place leaves its
    folder's time as it was, and would be served the boxes and phrases it had before."""
    digest = hashlib.sha256(cache_key(corpus, image_encoder, text_encoder).encode())
    for table in (corpus.images, corpus.captions, corpus.phrases, corpus.regions):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.combine_chunks())
        digest.update(sink.getvalue())
    return f"{KIND}-{digest.hexdigest()[:16]}"


def prepare_phrases(source: str, *, cache_dir: str | Path, image_encoder: str, text_encoder: str,
                    splits: Optional[list[str]] = None, progress: bool = True,
                    raw_images: bool = False) -> "PhraseStore":
    """Read a region-phrase source, featurise what is not yet cached (`raw_images`: store the
    pictures and texts for encoder towers instead; no encoder runs), and return the store."""
    corpus = read_phrase_source(source)
    if raw_images:
        image_encoder, text_encoder = RAW_ENCODERS
    else:
        check_encoder_names(caption_view(corpus), image_encoder, text_encoder)
    wanted = splits or corpus.splits
    missing = [s for s in wanted if s not in corpus.splits]
    if missing:
        raise DataError(f"{source}: split(s) {missing} not found; available: {corpus.splits}")
    _check_proposals_cover(corpus, wanted)
    root = Path(cache_dir) / cache_name(corpus, image_encoder, text_encoder)
    manifest_path = root / "manifest.json"
    manifest = read_cached_manifest(manifest_path, ())  # a damaged one: the store is written again
    if manifest and all(s in manifest["splits"] for s in wanted):
        return PhraseStore(root, manifest)
    have = manifest["splits"] if manifest else []  # kept: a worker may be reading them
    # once per build, not per read (a header per picture, ~31k on Flickr30K): the name changes with the files
    check_image_sizes(corpus, [s for s in wanted if s not in have])
    make_cache_folder(root)
    write = (lambda s: _write_raw_split(corpus, s, root)) if raw_images else \
        (lambda s: _ingest_split(corpus, s, root, image_encoder, text_encoder, progress))
    stats = {s: write(s) for s in wanted if s not in have}
    dims = {tuple(v["dims"]) for v in stats.values()} | ({tuple(manifest["dims"])} if manifest else set())
    if len(dims) != 1:
        raise DataError(f"{source}: splits have different feature widths {sorted(dims)}")
    old = manifest or {"digests": {}, "counts": {}}
    manifest = {
        "schema_version": SCHEMA_VERSION, "kind": KIND, "raw": raw_images, "source": source,
        "image_encoder": image_encoder,
        "text_encoder": text_encoder, "splits": have + list(stats), "dims": list(dims.pop()),
        "digests": {**old["digests"], **{s: v["digest"] for s, v in stats.items()}},
        "counts": {**old["counts"], **{s: {k: v[k] for k in ("images", "phrases", "regions", "proposals")}
                                       for s, v in stats.items()}},
        "dropped_phrases": corpus.dropped,
    }
    write_manifest(manifest_path, manifest)
    return PhraseStore(root, manifest)


# --------------------------------------------------------------------------- reading the store


@dataclass
class PhraseSplit(FeatureSplit):
    """One split of region-phrase features. As a FeatureSplit: images = regions (ground truths and
    proposals), captions = phrases, `caption_image` = each phrase's ground-truth region row. Beyond
    it, the geometry Algorithm 1 and the evaluation need."""

    picture_ids: np.ndarray  # [I] the split's pictures (image ids of the source)
    region_picture: np.ndarray  # [R] row into picture_ids
    region_box: np.ndarray  # [R, 4] float32, 0-based exclusive pixels
    proposal_rows: np.ndarray  # [I, P_max] region rows of each picture's proposals, -1 = padding
    phrase_picture: np.ndarray  # [N] row into picture_ids
    phrase_box: np.ndarray  # [N, 4] the phrase's ground-truth box
    phrase_caption: np.ndarray  # [N] caption id (of the source) of the sentence the phrase is in: 001 Eq. 8

    @property
    def caption_shard(self) -> np.ndarray:
        """What keeps a phrase's batch rows on one worker: its picture (see batching.py)."""
        return self.phrase_picture

    def make_batch(self, phrases: np.ndarray, prepare_image: Prepare, prepare_text: Prepare, *, train: bool = False,
                   rng: Optional[np.random.Generator] = None, data: Optional[DataConfig] = None) -> Batch:
        """001 Algorithm 1's batch for these phrase rows (phrase_batch.py); `data.augment_positives`
        positives drawn per phrase (default 1)."""
        augment = 1 if data is None else data.augment_positives
        return phrase_batch(self, phrases, prepare_image, prepare_text, augment=augment, train=train, rng=rng)


def _padded_rows(picture: np.ndarray, is_proposal: np.ndarray, n_pictures: int) -> np.ndarray:
    """[I, P_max] region rows of each picture's proposals (rows grouped by picture), -1 padded."""
    rows = np.flatnonzero(is_proposal)
    counts = np.bincount(picture[rows], minlength=n_pictures)
    out = np.full((n_pictures, int(counts.max(initial=0))), -1, np.int64)
    slot = np.arange(len(rows)) - np.r_[0, np.cumsum(counts)][picture[rows]]
    out[picture[rows], slot] = rows
    return out


class PhraseStore(FeatureStore):
    """The feature store's manifest and identity with region and phrase tables (module docstring)."""

    def _check(self, name: str) -> None:
        if "+" in name:
            raise DataError(f"{self.manifest['source']}: split {name!r}: unions of splits are for image-caption "
                            "data; region-phrase data trains on one stored split")
        if name not in self.manifest["splits"]:
            raise DataError(f"{self.manifest['source']}: split {name!r} not found; available: "
                            f"{self.manifest['splits']}")

    def _read(self, name: str) -> tuple[pa.Table, pa.Table]:
        self._check(name)
        return (pq.read_table(self.root / f"{name}_regions.parquet", memory_map=True),
                pq.read_table(self.root / f"{name}_phrases.parquet", memory_map=True))

    def caption_groups(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(chain, picture) of every phrase: what the sampler groups and shards by (no features read)."""
        self._check(name)
        phrases = pq.read_table(self.root / f"{name}_phrases.parquet", columns=["region_gid", "image_id"])
        return phrases.column("region_gid").to_numpy(), phrases.column("image_id").to_numpy()

    @property
    def raw(self) -> bool:
        """Pictures and texts for encoder towers rather than features (module docstring)."""
        return bool(self.manifest.get("raw"))

    def split(self, name: str) -> PhraseSplit:  # type: ignore[override]
        regions, phrases = self._read(name)
        region_image = regions.column("image_id").to_numpy()
        pictures, region_picture = np.unique(region_image, return_inverse=True)
        gid = regions.column("region_gid").to_numpy()
        truth = np.flatnonzero(gid >= 0)
        row_of = dict(zip(gid[truth].tolist(), truth.tolist()))
        chains = phrases.column("region_gid").to_numpy()
        common = dict(
            image_ids=gid, caption_ids=phrases.column("phrase_id").to_numpy(),
            caption_image=np.fromiter((row_of[int(c)] for c in chains), np.int64, len(chains)),
            texts=phrases.column("text").to_pylist(), picture_ids=pictures,
            region_picture=region_picture.astype(np.int64), region_box=boxes_of(regions.column("box")),
            proposal_rows=_padded_rows(region_picture, regions.column("proposal_index").to_numpy() >= 0,
                                       len(pictures)),
            phrase_picture=np.searchsorted(pictures, phrases.column("image_id").to_numpy()).astype(np.int64),
            phrase_box=boxes_of(phrases.column("box")),
            phrase_caption=phrases.column("caption_id").to_numpy().astype(np.int64))
        if not self.raw:
            return PhraseSplit(image_feats=column_to_numpy(regions.column("feature")),
                               caption_feats=column_to_numpy(phrases.column("feature")), **common)
        stored = pq.read_table(self.root / f"{name}_pictures.parquet", memory_map=True)
        row = np.searchsorted(stored.column("image_id").to_numpy(), pictures)  # written sorted by image_id
        return RawPhraseSplit(image_feats=np.zeros((len(gid), 0), np.float32),
                              caption_feats=np.zeros((len(chains), 0), np.float32),
                              picture_bytes=stored.column("image").take(pa.array(row)), **common)


@dataclass
class RawPhraseSplit(PhraseSplit):
    """A PhraseSplit of the raw store: the image tower's items are the regions' crops (RGB PIL
    images, as `crop_features` encodes them for the feature store), the text tower's the phrases."""

    picture_bytes: pa.ChunkedArray  # [I] encoded pictures, in picture_ids' order

    def images_at(self, rows: np.ndarray) -> list[Any]:
        """The crops of these region rows; each picture they lie in decoded once."""
        rows = np.asarray(rows, np.int64)
        wanted = np.unique(self.region_picture[rows]).tolist()
        pictures = dict(zip(wanted, decode_images((self.picture_bytes[p].as_py() for p in wanted), "image")))
        out = []
        for r in rows:
            image = pictures[int(self.region_picture[r])]
            out.append(image.crop(pixel_box(self.region_box[r], *image.size)))
        return out

    def captions_at(self, rows: np.ndarray) -> list[str]:
        return [self.texts[int(r)] for r in np.asarray(rows)]


__all__ = ["KIND", "RAW_ENCODERS", "cache_name", "read_phrase_source", "region_rows", "pixel_box", "crop_features",
           "prepare_phrases", "PhraseSplit", "RawPhraseSplit", "PhraseStore"]
