"""Ingest: source -> Corpus -> frozen features -> Parquet in a cache folder.

Both the trainer and the evaluator read features from here. A split is two Parquet files:
`{split}_images.parquet` (image_id, feature) and `{split}_captions.parquet` (caption_id, image_id,
text, feature), written atomically, plus `manifest.json` with the dataset identity (a digest of
the ingested ids and features) that MLflow records.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from itmatch.data.images import to_rgb
from itmatch.data.readers import Corpus, column_to_numpy, features_column, read_source
from itmatch.data.sources import DataError, parse_source
from itmatch.files import atomic_write, atomic_write_text, read_problem

log = logging.getLogger("itmatch.data")

SCHEMA_VERSION = 1


@dataclass
class SplitRows:
    """A split's rows: what the sampler, batching and evaluation need besides the tower inputs."""

    image_ids: np.ndarray  # [Ni] int64, the group ids
    caption_ids: np.ndarray  # [Nc] int64
    caption_image: np.ndarray  # [Nc] int64, row into image_* of the caption's image
    texts: list[str]

    @property
    def caption_gid(self) -> np.ndarray:
        return self.image_ids[self.caption_image]

    @property
    def caption_shard(self) -> np.ndarray:
        """Per caption, what must stay on one worker: its image (region-phrase splits: the picture)."""
        return self.caption_image

    def __len__(self) -> int:
        return len(self.caption_ids)


@dataclass
class FeatureSplit(SplitRows):
    """One split of cached features, ready for training or evaluation."""

    image_feats: np.ndarray  # [Ni, Di] float32
    caption_feats: np.ndarray  # [Nc, Dc] float32

    def images_at(self, rows: np.ndarray) -> np.ndarray:
        """The image tower's raw items for these rows (here: feature rows; a RawSplit decodes pixels)."""
        return self.image_feats[rows]

    def captions_at(self, rows: np.ndarray) -> np.ndarray:
        return self.caption_feats[rows]


@dataclass
class FeatureStore:
    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | Path) -> "FeatureStore":
        """A store written by `prepare` (workers open the folder the driver prepared)."""
        path = Path(root) / "manifest.json"
        if not path.is_file():
            raise DataError(f"feature store {root}: missing manifest.json (run prepare() first)")
        manifest, problem = parse_manifest(path)
        if manifest is None:  # a worker or evaluator given a damaged store: prepare() rebuilds it
            raise DataError(f"{path}: {problem}; re-running the training command rebuilds the cached store")
        return cls(Path(root), manifest)

    @property
    def identity(self) -> dict:
        """What MLflow logs as the dataset: the source, encoders and a content digest per split."""
        return {k: self.manifest[k] for k in ("source", "image_encoder", "text_encoder", "digests", "counts")}

    @property
    def dims(self) -> tuple[int, int]:
        return tuple(self.manifest["dims"])  # type: ignore[return-value]

    def parts(self, name: str) -> list[str]:
        """The stored splits a split name stands for: itself, or a union `train+val` (a refit on
        every labelled split), each checked to exist."""
        parts = stored_splits(name)
        for part in parts:
            if part not in self.manifest["splits"]:
                raise DataError(
                    f"{self.manifest['source']}: split {part!r} not found; available: {self.manifest['splits']}"
                )
        return parts

    def tables(self, name: str) -> tuple[pa.Table, pa.Table, np.ndarray]:
        """(images, captions, caption_image): a split's memory-mapped tables and each caption's image
        row; a union's tables are its parts' one after another (their image ids must not overlap)."""
        parts = self.parts(name)
        images = pa.concat_tables([pq.read_table(self.root / f"{p}_images.parquet", memory_map=True) for p in parts])
        caps = pa.concat_tables([pq.read_table(self.root / f"{p}_captions.parquet", memory_map=True) for p in parts])
        if len(parts) > 1:
            _disjoint(images.column("image_id").to_numpy(), f"{self.manifest['source']}: split {name!r}")
        row_of = {int(i): r for r, i in enumerate(images.column("image_id").to_numpy())}
        caption_image = np.fromiter((row_of[int(i)] for i in caps.column("image_id").to_numpy()), np.int64, len(caps))
        return images, caps, caption_image

    def caption_groups(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(group, shard key) of every caption of a split, the sampler's inputs, without reading
        features: for image-caption data both are the caption's image."""
        groups = np.concatenate([pq.read_table(self.root / f"{p}_captions.parquet", columns=["image_id"])
                                 .column("image_id").to_numpy() for p in self.parts(name)])
        return groups, groups

    def split(self, name: str) -> FeatureSplit:
        images, caps, caption_image = self.tables(name)
        image_ids = images.column("image_id").to_numpy()
        return FeatureSplit(
            image_ids=image_ids,
            image_feats=column_to_numpy(images.column("feature")),
            caption_ids=caps.column("caption_id").to_numpy(),
            caption_image=caption_image,
            caption_feats=column_to_numpy(caps.column("feature")),
            texts=caps.column("text").to_pylist(),
        )


def stored_splits(*names: str) -> list[str]:
    """The stored splits that split names stand for, each once: `train+val` is train and val."""
    return list(dict.fromkeys(part for name in names for part in name.split("+")))


def _disjoint(image_ids: np.ndarray, where: str) -> None:
    """A union of splits that share an image would count one image as two groups (and leak it
    between them): refused, naming one shared id."""
    values, counts = np.unique(image_ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{where}: image_id {int(values[counts > 1][0])} is in more than one of its splits")


def cache_key(corpus: Corpus, image_encoder: str, text_encoder: str) -> str:
    h = hashlib.sha256(f"v{SCHEMA_VERSION}|{corpus.name}|{image_encoder}|{text_encoder}".encode())
    for path in corpus.files:
        stat = path.stat()
        h.update(f"|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    # image files the source names (Karpathy, Parquet paths): one repaired or replaced in place
    # must be featurised again, not served its old features (nor left out as it was under bad_images=skip)
    for name in _image_files(corpus):
        try:
            stat = os.stat(name)
            h.update(f"|{stat.st_size}|{stat.st_mtime_ns}".encode())
        except (OSError, TypeError, ValueError):
            h.update(b"|-")
    return h.hexdigest()[:16]


def _image_files(corpus) -> list:
    """The image files a corpus names: its own list (a lazily read Parquet source knows them before
    it is read), else its images' `path` column (region-phrase corpora)."""
    if hasattr(corpus, "image_files"):
        return corpus.image_files()
    images = getattr(corpus, "images", None)
    return images.column("path").to_pylist() if isinstance(images, pa.Table) and "path" in images.column_names else []


def atomic_write_table(table: pa.Table, path: Path) -> None:
    _cache_io(path, lambda: atomic_write(path, lambda tmp: pq.write_table(table, tmp)))


def make_cache_folder(root: Path) -> None:
    """A store's folder under data.cache_dir."""
    _cache_io(root, lambda: root.mkdir(parents=True, exist_ok=True))


def write_manifest(path: Path, manifest: dict) -> None:
    """A store's manifest.json, written last: its presence says the splits it lists are complete."""
    _cache_io(path, lambda: atomic_write_text(path, json.dumps(manifest, indent=2)))


MANIFEST_FIELDS = {"splits": list, "dims": list, "digests": dict, "counts": dict}


def parse_manifest(path: Path) -> tuple[Optional[dict], str]:
    """(the manifest, "") or (None, what is wrong with it): a cache folder outlives the runs that
    wrote it, and a kill, a full disk or a hand edit can leave its manifest.json cut short or odd."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError: their text names no file
        return None, f"unreadable ({read_problem(exc)})"
    if not isinstance(manifest, dict):
        return None, f"not a JSON object (got {type(manifest).__name__})"
    wrong = [k for k, kind in MANIFEST_FIELDS.items() if not isinstance(manifest.get(k), kind)]
    if wrong:
        return None, f"field {wrong[0]!r} is {manifest.get(wrong[0])!r:.60}, not a {MANIFEST_FIELDS[wrong[0]].__name__}"
    return manifest, ""


def read_cached_manifest(path: Path, tables: tuple[str, ...]) -> Optional[dict]:
    """A cached store's manifest with only the splits whose `{split}_{table}.parquet` files are all
    there and whole (their footer reads and their row counts are the manifest's); None where the
    manifest itself is damaged. The cache is derived data, so what is damaged is featurised again
    (with a warning naming it) instead of failing later with a pyarrow traceback mid-run."""
    if not path.is_file():
        return None
    manifest, problem = parse_manifest(path)
    if manifest is None:
        log.warning("%s: %s; featurising the data again", path, problem)
        return None
    intact = []
    for split in manifest["splits"]:
        problem = _split_problem(path.parent, split, tables, manifest["counts"].get(split))
        if problem:
            log.warning("%s lists split %r, but %s; featurising it again", path, split, problem)
        else:
            intact.append(split)
    return {**manifest, "splits": intact}


def _split_problem(root: Path, split: str, tables: tuple[str, ...], counts: Any) -> str:
    """Why a listed split's Parquet files cannot be used as they are, or ""."""
    for table in tables:
        file = root / f"{split}_{table}.parquet"
        try:
            rows = pq.ParquetFile(file).metadata.num_rows  # the footer only: cheap on any size
        except (OSError, pa.ArrowException) as exc:
            return f"{file.name} cannot be read ({read_problem(exc)})"
        want = counts.get(table) if isinstance(counts, dict) else None
        if isinstance(want, int) and rows != want:
            return f"{file.name} holds {rows} rows, not the {want} it lists"
    return ""


def _cache_io(path: Path, action: Callable[[], object]) -> None:
    """`action()`, a write into the data cache; an OS error (a file where the cache folder goes, no
    permission, a full disk) a DataError naming the path and the setting, not a traceback from
    pathlib or pyarrow. atomic_write leaves no partial file, and no manifest lists the split."""
    try:
        action()
    except OSError as exc:
        culprit = f": {exc.filename}" if exc.filename and str(exc.filename) != str(path) else ""
        raise DataError(f"{path}: cannot write the data cache ({exc.strerror or exc}{culprit}); data.cache_dir "
                        "(trainers.evaluate: --cache-dir) says where it goes") from None


# (images table with an "image" bytes or "path" column, encoder name, progress) -> [rows, dim] features
ImageFeaturizer = Callable[[pa.Table, str, bool], np.ndarray]


def pixel_column(images: pa.Table) -> str:
    """Where a table keeps its pixels: encoded bytes ("image") or file paths ("path")."""
    return "image" if "image" in images.column_names else "path"


BAD_IMAGE_POLICIES = ("fail", "skip")


def _undecodable(value: Any, column: str) -> Optional[str]:
    """Why an image cannot be decoded (missing, unreadable, truncated, not an image), or None.
    JPEGs are decoded at 1/8 scale (draft mode): the whole stream is still read, at a fraction of the cost."""
    from PIL import Image  # lazy: only pixel sources need it

    if value is None:  # a table's path naming no file, kept under skip (the reader's warning names it)
        return "its image file is missing or unreadable"
    try:
        with Image.open(io.BytesIO(value) if column == "image" else value) as image:
            image.draft("RGB", (1, 1))
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return str(exc) or type(exc).__name__
    return None


def drop_bad_images(images: pa.Table, caps: pa.Table, policy: str, where: str) -> tuple[pa.Table, pa.Table, int]:
    """Check every image decodes before any is encoded; `policy` fail: a DataError naming the first
    bad one and the count; skip: drop the bad images and their captions, and return how many."""
    column = pixel_column(images)
    values = images.column(column).to_pylist()
    bad = [(row, why) for row, value in enumerate(values) if (why := _undecodable(value, column))]
    if not bad:
        return images, caps, 0
    row, why = bad[0]
    name = values[row] if column == "path" else f"image_id {images.column('image_id')[row].as_py()} (row {row})"
    if policy != "skip":
        raise DataError(f"{where}: {len(bad)} of {len(values)} images cannot be decoded, first {name}: {why} "
                        "(add ?bad_images=skip to data.source to train without them)")
    if len(bad) == len(values):  # skipped, the split would be empty: refused as an empty split is
        raise DataError(f"{where}: none of its {len(values)} images can be decoded (bad_images=skip would leave "
                        f"no images), first {name}: {why}")
    keep = np.ones(len(values), dtype=bool)
    keep[[r for r, _ in bad]] = False
    images = images.filter(pa.array(keep))
    caps = caps.filter(pc.is_in(caps.column("image_id"), value_set=images.column("image_id")))
    log.warning("%s: skipped %d of %d images that cannot be decoded (bad_images=skip), first %s: %s",
                where, len(bad), len(values), name, why)
    return images, caps, len(bad)


def image_bytes(images: pa.Table) -> pa.Array:
    """The encoded bytes of an image table's images: its `image` column, else its files read."""
    if "image" in images.column_names:
        return images.column("image")
    return pa.array([Path(p).read_bytes() for p in images.column("path").to_pylist()], type=pa.binary())


def decode_images(values: Iterable, column: str) -> Iterator:
    """RGB PIL images from encoded bytes or paths; a bad one is a DataError naming it."""
    from PIL import Image  # lazy: only pixel sources need it

    for value in values:
        try:
            image = Image.open(io.BytesIO(value) if column == "image" else value)
            yield to_rgb(image)
        except OSError as exc:
            raise DataError(f"cannot decode image {value if column == 'path' else '<bytes>'}: {exc}") from exc


def local_image_features(images: pa.Table, encoder_name: str, progress: bool) -> np.ndarray:
    """Featurise in this process (the default; trainers.featurize spreads it over a Ray cluster)."""
    from itmatch.data.encoders import build_image_encoder

    column = pixel_column(images)
    return build_image_encoder(encoder_name).encode(decode_images(images.column(column).to_pylist(), column),
                                                    progress=progress)


def _image_features(images: pa.Table, encoder_name: str, progress: bool, featurizer: ImageFeaturizer) -> np.ndarray:
    if "feature" in images.column_names:
        return column_to_numpy(images.column("feature"))
    return featurizer(images, encoder_name, progress)


def _caption_features(caps: pa.Table, encoder_name: str, progress: bool) -> np.ndarray:
    # All null: this split had no precomputed file while another split did (precomp concatenates
    # splits), so it is encoded like a split without features.
    if "feature" in caps.column_names and caps.column("feature").null_count < len(caps):
        return column_to_numpy(caps.column("feature"))
    from itmatch.data.encoders import build_text_encoder

    return build_text_encoder(encoder_name).encode(caps.column("text").to_pylist(), progress=progress)


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def split_tables(corpus: Corpus, split: str) -> tuple[pa.Table, pa.Table]:
    """(images, captions) of one split; a caption of an image the split lacks is a DataError."""
    images = corpus.images.filter(pc.equal(corpus.images.column("split"), split))
    caps = corpus.captions.filter(pc.equal(corpus.captions.column("split"), split))
    if len(images) == 0:  # a table without rows (a file named train-*.parquet, or the default split, holds
        # none): features of no rows failed as a shape error, and the raw store kept an empty split
        raise DataError(f"{corpus.name}: split {split!r} has no images (the source holds no rows for it)")
    known = set(images.column("image_id").to_pylist())
    orphans = [i for i in caps.column("image_id").to_pylist() if i not in known]
    if orphans:
        raise DataError(f"{corpus.name}: split {split!r}: captions refer to unknown image_id {orphans[0]!r}")
    return images, caps


def _ingest_split(corpus: Corpus, split: str, root: Path, image_encoder: str, text_encoder: str, progress: bool,
                  featurizer: ImageFeaturizer, bad_images: str = "fail"):
    images, caps = split_tables(corpus, split)
    skipped = 0
    if "feature" not in images.column_names:
        images, caps, skipped = drop_bad_images(images, caps, bad_images, f"{corpus.name}: split {split!r}")
    img_feats = _image_features(images, image_encoder, progress, featurizer)
    cap_feats = _caption_features(caps, text_encoder, progress)
    _check_finite(img_feats, f"{corpus.name}: split {split!r}: image features")
    _check_finite(cap_feats, f"{corpus.name}: split {split!r}: caption features")
    atomic_write_table(pa.table({"image_id": images.column("image_id"), "feature": features_column(img_feats)}),
                        root / f"{split}_images.parquet")
    atomic_write_table(pa.table({
        "caption_id": caps.column("caption_id"), "image_id": caps.column("image_id"),
        "text": caps.column("text"), "feature": features_column(cap_feats),
    }), root / f"{split}_captions.parquet")
    ids = (images.column("image_id").to_numpy(), caps.column("image_id").to_numpy())
    return {
        "digest": _digest(*ids, img_feats, cap_feats), "images": len(images), "captions": len(caps),
        "dims": [int(img_feats.shape[1]), int(cap_feats.shape[1])], "skipped_images": skipped,
    }


def _check_finite(array: np.ndarray, what: str) -> None:
    if array.ndim != 2 or array.shape[0] == 0:
        raise DataError(f"{what}: expected a non-empty [rows, dim] array, got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad.size:
        raise DataError(f"{what}: row {int(bad[0])} holds a non-finite value ({bad.size} bad rows)")


def prepare(
    source: str,
    *,
    cache_dir: str | Path,
    image_encoder: str,
    text_encoder: str,
    splits: Optional[list[str]] = None,
    progress: bool = True,
    image_featurizer: Optional[ImageFeaturizer] = None,
) -> FeatureStore:
    """Read the source, featurise what is not yet cached, and return the store.
    `image_featurizer` replaces the in-process image encoding (e.g. Ray Data over a cluster)."""
    corpus = read_source(source, caption_features=text_encoder)
    bad_images = parse_source(source).options.get("bad_images", "fail")
    if bad_images not in BAD_IMAGE_POLICIES:
        raise DataError(f"data.source {source!r}: bad_images={bad_images!r}; choices: {', '.join(BAD_IMAGE_POLICIES)}")
    check_encoder_names(corpus, image_encoder, text_encoder)
    available = corpus.splits
    wanted = splits or available
    missing = [s for s in wanted if s not in available]
    if missing:
        raise DataError(f"{source}: split(s) {missing} not found; available: {available}")
    root = Path(cache_dir) / cache_key(corpus, image_encoder, text_encoder)
    manifest_path = root / "manifest.json"
    manifest = read_cached_manifest(manifest_path, ("images", "captions"))
    if manifest and all(s in manifest["splits"] for s in wanted):
        return FeatureStore(root, manifest)
    make_cache_folder(root)
    # Splits already in the store stay in it (a worker or evaluator may be reading them): add the rest.
    have = manifest["splits"] if manifest else []
    todo = [s for s in wanted if s not in have]
    featurizer = image_featurizer or local_image_features
    stats = {s: _ingest_split(corpus, s, root, image_encoder, text_encoder, progress, featurizer, bad_images)
             for s in todo}
    dims = {tuple(v["dims"]) for v in stats.values()} | ({tuple(manifest["dims"])} if manifest else set())
    if len(dims) != 1:
        raise DataError(f"{source}: splits have different feature widths {sorted(dims)}")
    manifest = {
        "schema_version": SCHEMA_VERSION, "source": source, "image_encoder": _payload_encoder(corpus, image_encoder),
        "text_encoder": text_encoder, "splits": have + todo, "dims": list(dims.pop()),
        "digests": {**(manifest["digests"] if manifest else {}), **{s: v["digest"] for s, v in stats.items()}},
        "counts": {**(manifest["counts"] if manifest else {}),
                   **{s: {"images": v["images"], "captions": v["captions"]} for s, v in stats.items()}},
        "skipped_images": {**(manifest.get("skipped_images", {}) if manifest else {}),
                           **{s: v["skipped_images"] for s, v in stats.items()}},
    }
    write_manifest(manifest_path, manifest)
    return FeatureStore(root, manifest)


def _payload_encoder(corpus: Corpus, image_encoder: str) -> str:
    return "precomputed" if corpus.payload() == "feature" else image_encoder


def check_encoder_names(corpus: Corpus, image_encoder: str, text_encoder: str) -> None:
    """Refuse an unknown encoder name before anything is encoded, but only where one is needed:
    precomputed image features need no image encoder, and a precomp `text_encoder` may just name
    the `{split}_caps_<name>.npy` files."""
    from itmatch.data.encoders import ARCH_PREFIXES, IMAGE_ENCODERS, TEXT_ENCODERS, image_encoder_choices

    if corpus.payload() != "feature":
        prefix, sep, arch = image_encoder.partition(":")
        known = prefix in ARCH_PREFIXES and bool(arch) if sep else image_encoder in IMAGE_ENCODERS
        if not known or image_encoder in ARCH_PREFIXES:
            raise DataError(f"data.image_encoder = {image_encoder!r}: unknown image encoder; "
                            f"choices: {', '.join(image_encoder_choices())}")
    missing = getattr(corpus, "missing_caption_features", {})  # table sources have none to miss
    if missing and text_encoder not in TEXT_ENCODERS:  # the others have the files: this is no misspelt name
        split, path = next(iter(missing.items()))
        raise DataError(f"{path}: missing: split {split!r} has no caption features named {text_encoder!r}, though "
                        f"other splits of {corpus.name} have them, and data.text_encoder = {text_encoder!r} is no "
                        "text encoder that could encode its captions live; add the file")
    if not corpus.has_caption_features() and text_encoder not in TEXT_ENCODERS:
        raise DataError(f"data.text_encoder = {text_encoder!r}: unknown text encoder and {corpus.name} has no "
                        f"precomputed caption features of that name; choices: {', '.join(sorted(TEXT_ENCODERS))}")
