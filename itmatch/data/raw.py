"""The raw store: images as encoded bytes and captions as text, for towers trained end to end.

`prepare_raw` reads any pixel source (karpathy, parquet, hf, synthetic), checks that every image
decodes (data.source `?bad_images=skip|fail`, as for featurisation), and writes per split
`{split}_images.parquet` (image_id, image: encoded bytes) and `{split}_captions.parquet`
(caption_id, image_id, text) into a cache folder keyed by the source's files, with a manifest.
Workers memory-map those files and decode only the rows of their batches; the same files are
what a Ray Data pipeline reads. `RawSplit` has the row layout of `FeatureSplit` (image_ids,
caption_image, caption_gid, texts), so the sampler, batching and evaluation take either.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from itmatch.data.images import to_rgb
from itmatch.data.phrase_store import KIND as PHRASES_KIND
from itmatch.data.phrase_store import PhraseStore, prepare_phrases
from itmatch.data.readers import Corpus, read_source
from itmatch.data.sources import PHRASE_SCHEMES, DataError, parse_source
from itmatch.data.store import (BAD_IMAGE_POLICIES, FeatureStore, SplitRows, atomic_write_table, cache_key,
                                drop_bad_images, parse_manifest, image_bytes, make_cache_folder, read_cached_manifest,
                                split_tables, write_manifest)

SCHEMA_VERSION = 1
KIND = "raw"


@dataclass
class RawSplit(SplitRows):
    image_bytes: pa.ChunkedArray  # [Ni] encoded images (memory-mapped)

    def images_at(self, rows: np.ndarray) -> list[Any]:
        """Decoded RGB PIL images of these image rows."""
        from PIL import Image

        out = []
        for r in np.asarray(rows):
            with Image.open(io.BytesIO(self.image_bytes[int(r)].as_py())) as image:
                out.append(to_rgb(image))
        return out

    def captions_at(self, rows: np.ndarray) -> list[str]:
        return [self.texts[int(r)] for r in np.asarray(rows)]


class RawStore(FeatureStore):
    """The feature store's layout and manifest with encoded images and texts instead of features."""

    @property
    def dims(self) -> tuple[int, int]:
        return (0, 0)  # the towers define their widths

    def split(self, name: str) -> RawSplit:  # type: ignore[override]
        images, caps, caption_image = self.tables(name)
        return RawSplit(image_ids=images.column("image_id").to_numpy(), image_bytes=images.column("image"),
                        caption_ids=caps.column("caption_id").to_numpy(), caption_image=caption_image,
                        texts=caps.column("text").to_pylist())


def _write_split(corpus: Corpus, split: str, root: Path, bad_images: str) -> dict:
    images, caps, skipped = drop_bad_images(*split_tables(corpus, split), bad_images, f"{corpus.name}: split {split!r}")
    payload = image_bytes(images)
    atomic_write_table(pa.table({"image_id": images.column("image_id"), "image": payload}),
                        root / f"{split}_images.parquet")
    atomic_write_table(pa.table({"caption_id": caps.column("caption_id"), "image_id": caps.column("image_id"),
                                  "text": caps.column("text")}), root / f"{split}_captions.parquet")
    h = hashlib.sha256()
    for value in (images.column("image_id").to_numpy(), caps.column("image_id").to_numpy()):
        h.update(np.ascontiguousarray(value).tobytes())
    for text in caps.column("text").to_pylist():
        h.update(text.encode("utf-8"))
    return {"digest": h.hexdigest()[:16], "images": len(images), "captions": len(caps), "skipped_images": skipped}


def prepare_raw(source: str, *, cache_dir: str | Path, splits: Optional[list[str]] = None) -> RawStore:
    """Read a pixel source once into the raw store (cached; re-used while its files are unchanged)."""
    corpus = read_source(source)
    if corpus.payload() == "feature":
        raise DataError(f"data.source {source!r} holds precomputed image features, not pixels: encoder towers "
                        "need images (karpathy:, parquet:, hf:, synthetic:)")
    bad_images = parse_source(source).options.get("bad_images", "fail")
    if bad_images not in BAD_IMAGE_POLICIES:
        raise DataError(f"data.source {source!r}: bad_images={bad_images!r}; choices: {', '.join(BAD_IMAGE_POLICIES)}")
    wanted = splits or corpus.splits
    missing = [s for s in wanted if s not in corpus.splits]
    if missing:
        raise DataError(f"{source}: split(s) {missing} not found; available: {corpus.splits}")
    root = Path(cache_dir) / ("raw-" + cache_key(corpus, KIND, KIND))  # the files' sizes and times key it
    manifest_path = root / "manifest.json"
    manifest = read_cached_manifest(manifest_path, ("images", "captions"))  # damaged parts: written again
    if manifest and all(s in manifest["splits"] for s in wanted):
        return RawStore(root, manifest)
    make_cache_folder(root)
    have = manifest["splits"] if manifest else []
    stats = {s: _write_split(corpus, s, root, bad_images) for s in wanted if s not in have}
    manifest = {
        "schema_version": SCHEMA_VERSION, "kind": KIND, "source": source, "image_encoder": "pixels (raw)",
        "text_encoder": "words (raw)", "splits": have + list(stats), "dims": [0, 0],
        "digests": {**(manifest["digests"] if manifest else {}), **{s: v["digest"] for s, v in stats.items()}},
        "counts": {**(manifest["counts"] if manifest else {}),
                   **{s: {"images": v["images"], "captions": v["captions"]} for s, v in stats.items()}},
        # as the feature store's: what ?bad_images=skip left out (README), else unseen once the warning scrolled by
        "skipped_images": {**(manifest.get("skipped_images", {}) if manifest else {}),
                           **{s: v["skipped_images"] for s, v in stats.items()}},
    }
    write_manifest(manifest_path, manifest)
    return RawStore(root, manifest)


def prepare_inputs(source: str, *, cache_dir: str | Path, raw_images: bool, image_encoder: str, text_encoder: str,
                   splits: list[str], image_featurizer=None) -> FeatureStore:
    """What a model needs from a source, cached: raw images and texts for an image encoder tower
    (`raw_images`), else features from the named frozen encoders (their captions' text included,
    for a text encoder tower); region-phrase sources likewise: the pictures (cropped per batch) and
    phrases, or region and phrase features (phrase_store.py)."""
    if parse_source(source).scheme in PHRASE_SCHEMES:
        if image_featurizer is not None:
            raise DataError(f"data.source {source!r}: region-phrase data is featurised in this process from crops "
                            "of its regions: it takes data.featurize=local")
        return prepare_phrases(source, cache_dir=cache_dir, image_encoder=image_encoder, text_encoder=text_encoder,
                               splits=splits, raw_images=raw_images)
    if raw_images:
        return prepare_raw(source, cache_dir=cache_dir, splits=splits)
    from itmatch.data.store import prepare

    return prepare(source, cache_dir=cache_dir, image_encoder=image_encoder, text_encoder=text_encoder,
                   splits=splits, image_featurizer=image_featurizer)


def open_store(root: str | Path) -> FeatureStore:
    """The feature store, the raw store or the region-phrase store written at `root` (its manifest
    says which)."""
    path = Path(root) / "manifest.json"
    # a damaged one (cut short, hand-edited) goes to FeatureStore.open, which names it in one line
    manifest = (parse_manifest(path)[0] if path.is_file() else None) or {}
    if manifest.get("kind") == PHRASES_KIND:
        return PhraseStore.open(root)
    return RawStore.open(root) if manifest.get("kind") == KIND else FeatureStore.open(root)


__all__ = ["RawSplit", "RawStore", "prepare_raw", "prepare_inputs", "open_store"]
