"""Read Flickr30K Entities (phrases, coreference chains, boxes) and region proposals into Arrow tables.

The layout (Plummer et al.; github.com/BryanPlummer/flickr30k_entities), under one root folder:

    Sentences/<image id>.txt   one caption per line, phrases marked
                               `[/EN#<chain id>/<type 1>/.../<type n> <word 1> ... <word n>]`;
                               phrases sharing a chain id (in one image) form a coreference chain;
                               type "notvisual" phrases carry the null chain id 0 and have no box
    Annotations/<image id>.xml PASCAL-VOC-like: <filename>, <size><width><height>, then <object>s, each
                               with one or more <name> (the chain ids it belongs to) and either a
                               <bndbox> (xmin ymin xmax ymax: 1-based inclusive pixels) or the flags
                               <nobndbox> / <scene>
    train.txt val.txt test.txt optional split lists, one image id a line (without them every
                               Sentences file is read, into split `default_split`)
    proposals.parquet          optional region proposals (this project's format, below)
    images/                    optional image folder (or pass `image_dir`): `<filename>` from the XML,
                               else `<image id>.jpg`

Proposals (the format chosen here): one Parquet file, one row per proposal, columns `image_id`
(int64, the image's numeric id), `x1 y1 x2 y2` (float, 0-based exclusive pixels: see `boxes`),
optionally `score`; a proposal's index is its position among its image's rows. Images of the file
that the corpus does not hold are ignored; an image with no rows has no proposals (phrase_store.py
refuses a run whose splits hold such images with phrases). A box may overrun its image's border
(crops clip it) but not lie wholly outside it; an XML <size> must be the image file's own size.

What 001 keeps (footnote 2, after Plummer et al.): phrases of type notvisual, and phrases whose
chain has no box (scene / nobndbox / unannotated chains), are dropped; a plural chain's boxes are
merged into one enclosing box. Boxes come out in `boxes`' convention (x1 = xmin - 1, x2 = xmax).

`read_entities(root)` returns a `PhraseCorpus` of Arrow tables (ids are dense int64, assigned in
image-id order, then line, then position in the line):

    images     image_id, name (file stem), split, width, height, path (null without an image folder)
    captions   caption_id, image_id, split, text (markup removed): the readers' captions schema
    phrases    phrase_id, caption_id, image_id, split, chain_id, region_id, entity_id, text, types,
               first_word (index of its first word in the caption), box (list<float32>[4], merged)
    regions    region_id, image_id, entity_id, split, box, n_boxes: one merged ground-truth region
               per chain that has a box (so a phrase's region_id equals its chain_id)
    proposals  image_id, proposal_index, box (or None without a proposals file)

Bad input is a `DataError` naming the file, the line or field, and the value.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from itmatch.data.readers import column_to_numpy, features_column, read_utf8, text_lines
from itmatch.data.sources import DataError
from itmatch.data.store import atomic_write_table
from itmatch.phrases.boxes import from_inclusive, merge_boxes

SENTENCES_DIR = "Sentences"
ANNOTATIONS_DIR = "Annotations"
IMAGES_DIR = "images"
PROPOSALS_FILE = "proposals.parquet"
SPLITS = ("train", "val", "test")
NOTVISUAL = "notvisual"
ENTITY_TYPES = ("people", "clothing", "bodyparts", "animals", "vehicles", "instruments", "scene", "other",
                NOTVISUAL)  # Flickr30K Entities' coarse types (others are read too)

_MARKUP = re.compile(r"\[/EN#(?P<id>[^/\s\]\[]*)(?P<types>(?:/[^/\s\]\[]*)*)\s+(?P<words>[^\[\]]*)\]")


# --------------------------------------------------------------------------- Sentences/<id>.txt


@dataclass(frozen=True)
class Mention:
    """One marked phrase of a caption."""

    text: str
    entity_id: int  # the chain id (0: notvisual)
    types: tuple[str, ...]
    first_word: int  # index of its first word among the caption's words


@dataclass(frozen=True)
class Caption:
    text: str  # the caption without markup, words joined by one space
    mentions: tuple[Mention, ...]


def _markup_error(line: str, at: int, where: str) -> DataError:
    close = line.find("]", at)
    if close < 0:
        return DataError(f"{where}: '[' at column {at + 1} is never closed: {line[at:at + 60]!r}")
    return DataError(f"{where}: bad phrase markup {line[at:close + 1]!r} at column {at + 1}; expected "
                     "[/EN#<chain id>/<type>... <words>]")


def _mention(match: re.Match, n_words: int, where: str) -> Mention:
    markup = match.group(0)
    raw_id, words = match.group("id"), match.group("words").split()
    if not raw_id.isdigit():
        raise DataError(f"{where}: chain id {raw_id!r} in {markup!r} is not a non-negative integer")
    types = tuple(match.group("types").split("/")[1:])
    if not types or any(not t for t in types):
        raise DataError(f"{where}: phrase {markup!r} has an empty type (types = {list(types)})")
    if not words:
        raise DataError(f"{where}: phrase {markup!r} has no words")
    return Mention(" ".join(words), int(raw_id), types, n_words)


def parse_caption(line: str, where: str = "<caption>") -> Caption:
    """One line of a Sentences file -> its plain text and its marked phrases."""
    words: list[str] = []
    mentions: list[Mention] = []
    pos = 0
    while True:
        opening, closing = line.find("[", pos), line.find("]", pos)
        if closing >= 0 and (opening < 0 or closing < opening):
            context = line[max(0, closing - 40):closing + 1]
            raise DataError(f"{where}: unmatched ']' at column {closing + 1}: {context!r}")
        if opening < 0:
            words += line[pos:].split()
            break
        words += line[pos:opening].split()
        match = _MARKUP.match(line, opening)
        if match is None:
            raise _markup_error(line, opening, where)
        mention = _mention(match, len(words), where)
        mentions.append(mention)
        words += mention.text.split()
        pos = match.end()
    if not words:
        raise DataError(f"{where}: empty caption")
    return Caption(" ".join(words), tuple(mentions))


def read_captions(path: Path) -> list[Caption]:
    """A Sentences file: one caption per non-blank line."""
    lines = text_lines(read_utf8(path))
    out = [parse_caption(line, f"{path}: line {n}") for n, line in enumerate(lines, 1) if line.strip()]
    if not out:
        raise DataError(f"{path}: no captions")
    return out


# --------------------------------------------------------------------------- Annotations/<id>.xml


@dataclass
class ImageBoxes:
    """One Annotations file: image size, and per chain id its boxes (0-based exclusive, [k, 4])."""

    width: int
    height: int
    filename: str | None
    boxes: dict[int, np.ndarray] = field(default_factory=dict)
    scene: set[int] = field(default_factory=set)
    nobox: set[int] = field(default_factory=set)


def _text(node: ET.Element, tag: str, where: str, *, required: bool = True) -> str | None:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise DataError(f"{where}: missing field <{tag}>")
        return None
    return child.text.strip()


def _number(node: ET.Element, tag: str, where: str, kind=float):
    text = _text(node, tag, where)
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not np.isfinite(value):
        raise DataError(f"{where}: field <{tag}> = {text!r} is not a{'n integer' if kind is int else ' number'}")
    return value


def _object(obj: ET.Element, where: str, size: tuple[int, int]) -> tuple[list[int], list[float] | None, bool, bool]:
    names = [n.text.strip() if n.text else "" for n in obj.findall("name")]
    if not names:
        raise DataError(f"{where}: missing field <name>")
    bad = next((n for n in names if not n.isdigit()), None)
    if bad is not None:
        raise DataError(f"{where}: field <name> = {bad!r} is not a chain id (a non-negative integer)")
    where = f"{where} (<name> {', '.join(names)})"
    bndbox = obj.find("bndbox")
    if bndbox is None:
        flags = [_text(obj, tag, where, required=False) for tag in ("scene", "nobndbox")]
        bad_flag = next((f for f in flags if f is not None and not f.lstrip("-").isdigit()), None)
        if bad_flag is not None:
            raise DataError(f"{where}: flag <scene>/<nobndbox> = {bad_flag!r} is not an integer")
        scene, nobox = (bool(f is not None and int(f) > 0) for f in flags)
        return [int(n) for n in names], None, scene, nobox
    box = [_number(bndbox, tag, f"{where}/bndbox") for tag in ("xmin", "ymin", "xmax", "ymax")]
    if box[2] < box[0] or box[3] < box[1]:
        raise DataError(f"{where}/bndbox: (xmin, ymin, xmax, ymax) = {tuple(box)} has max < min")
    # real boxes overrun the border by a pixel or so (crops clip them); one with no pixel in the
    # image belongs to another picture, and its crop would be a 1-pixel strip of the border
    if outside_image(from_inclusive(np.array([box]))[0], *size):
        raise DataError(f"{where}/bndbox: (xmin, ymin, xmax, ymax) = {tuple(box)} lies entirely outside the "
                        f"{size[0]}x{size[1]} image")
    return [int(n) for n in names], box, False, False


def outside_image(box: np.ndarray, width: float, height: float) -> np.ndarray:
    """Whether 0-based exclusive boxes ([..., 4]) have no pixel inside a width x height image."""
    box = np.asarray(box)
    return (box[..., 2] <= 0) | (box[..., 3] <= 0) | (box[..., 0] >= width) | (box[..., 1] >= height)


def _size(root: ET.Element, path: Path) -> tuple[int, int]:
    size = root.find("size")
    if size is None:
        raise DataError(f"{path}: missing field <size>")
    out = _number(size, "width", f"{path}: <size>", int), _number(size, "height", f"{path}: <size>", int)
    for tag, value in zip(("width", "height"), out):
        if value <= 0:
            raise DataError(f"{path}: <size>: field <{tag}> = {_text(size, tag, str(path))!r} is not positive")
    return out


def _filename(root: ET.Element, path: Path) -> str | None:
    name = _text(root, "filename", str(path), required=False)
    # the name is looked up inside the images folder: an absolute one, or one whose ".." climbs out,
    # names some other file on the machine (the failure would then name that file, not this field)
    norm = os.path.normpath(name) if name is not None else None
    if norm is not None and (os.path.isabs(norm) or norm in (".", "..") or norm.startswith(".." + os.sep)):
        raise DataError(f"{path}: field <filename> = {name!r} is not a file inside the images folder")
    return name


def read_boxes(path: Path) -> ImageBoxes:
    """An Annotations file; boxes converted to 0-based exclusive pixels (x1 = xmin - 1, x2 = xmax)."""
    try:
        root = ET.fromstring(read_utf8(path))
    except ET.ParseError as exc:
        raise DataError(f"{path}: not well-formed XML ({exc})") from exc
    if root.tag != "annotation":
        raise DataError(f"{path}: root element <{root.tag}>, expected <annotation>")
    size = _size(root, path)
    out = ImageBoxes(*size, _filename(root, path))
    pairs: list[tuple[int, list[float]]] = []
    for index, obj in enumerate(root.findall("object")):
        names, box, scene, nobox = _object(obj, f"{path}: <object> #{index + 1}", size)
        if box is None:
            out.scene.update(names if scene else [])
            out.nobox.update(names if nobox else [])
        else:
            pairs += [(name, box) for name in names]
    if pairs:
        ids = np.array([p[0] for p in pairs], dtype=np.int64)
        for key, idx in zip(*_group_rows(ids)):
            out.boxes[int(key)] = from_inclusive(np.array([pairs[i][1] for i in idx]))
    return out


def _group_rows(keys: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    order = np.argsort(keys, kind="stable")
    unique, starts = np.unique(keys[order], return_index=True)
    return unique, np.split(order, starts[1:])


# --------------------------------------------------------------------------- the corpus


@dataclass
class PhraseCorpus:
    images: pa.Table
    captions: pa.Table
    phrases: pa.Table
    regions: pa.Table
    proposals: pa.Table | None
    name: str
    files: list[Path]
    """The split lists, the proposals file and the two folders read (for cache keys)."""
    dropped: dict[str, int]
    """Phrases left out: {"notvisual": n, "no_box": n}."""
    proposals_file: Path | None = None
    """The proposals file read (None without one): what an error about the proposals names."""
    annotations: Path | None = None
    """The Annotations folder read: what an error about an image's <size> names."""

    @property
    def splits(self) -> list[str]:
        return sorted(set(self.images.column("split").to_pylist()))

    def split(self, name: str) -> PhraseCorpus:
        """The corpus restricted to one split (proposals of its images only)."""
        if name not in self.splits:
            raise DataError(f"{self.name}: split {name!r} not found; available: {self.splits}")

        def keep(table: pa.Table | None) -> pa.Table | None:
            if table is None:
                return None
            if "split" in table.column_names:
                return table.filter(pc.equal(table.column("split"), name))
            ids = self.images.filter(pc.equal(self.images.column("split"), name)).column("image_id")
            return table.filter(pc.is_in(table.column("image_id"), value_set=ids))

        return PhraseCorpus(keep(self.images), keep(self.captions), keep(self.phrases), keep(self.regions),
                            keep(self.proposals), f"{self.name}[{name}]", self.files, dict(self.dropped),
                            self.proposals_file, self.annotations)


def _image_list(root: Path, splits: list[str] | None,
                default_split: str) -> tuple[list[tuple[str, str]], list[Path]]:
    """[(name, split)] from the split lists (or every Sentences file), and the lists read."""
    lists = [root / f"{s}.txt" for s in SPLITS if (root / f"{s}.txt").is_file()]
    if not lists:
        names = [p.stem for p in (root / SENTENCES_DIR).glob("*.txt")]
        if not names:
            raise DataError(f"{root / SENTENCES_DIR}: no <image id>.txt files")
        bad = next((n for n in names if not n.isdigit()), None)
        if bad is not None:
            raise DataError(f"{root / SENTENCES_DIR / (bad + '.txt')}: file name {bad!r} is not a numeric image id")
        return [(n, default_split) for n in sorted(names, key=int)], []
    seen: dict[str, str] = {}
    for path in lists:
        split = path.stem
        for n, line in enumerate(text_lines(read_utf8(path)), 1):
            name = line.strip()
            if not name:
                continue
            if not name.isdigit():
                raise DataError(f"{path}: line {n}: image id {name!r} is not a number")
            if name in seen:
                raise DataError(f"{path}: line {n}: image id {name!r} is already in split {seen[name]!r}")
            seen[name] = split
    wanted = [(n, s) for n, s in seen.items() if splits is None or s in splits]
    return sorted(wanted, key=lambda p: int(p[0])), lists


def _image_paths(names: list[str], filenames: list[str | None], image_dir: Path | None) -> pa.Array:
    if image_dir is None:
        return pa.nulls(len(names), pa.string())
    paths = [image_dir / (f or f"{n}.jpg") for n, f in zip(names, filenames)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{image_dir}: {len(missing)} image file(s) named by the Annotations' <filename> (or "
                        f"<image id>.jpg) are missing, e.g. {missing[:3]}")
    return pa.array([str(p.resolve()) for p in paths], pa.string())


def check_image_sizes(corpus: PhraseCorpus, splits: list[str] | None = None) -> None:
    """Each Annotations file's <size> against its image file's (read from the header only), of the
    pictures of `splits` (all by default).
    Flickr30K Entities' sizes are their JPEGs', so a mismatch means Annotations and images of
    different sets: every box would be cropped from the wrong place. Without an image folder
    there is nothing to compare."""
    from PIL import Image

    images = corpus.images
    if splits is not None:
        images = images.filter(pc.is_in(images.column("split"), value_set=pa.array(splits, pa.string())))
    columns = (images.column(k).to_pylist() for k in ("name", "width", "height", "path"))
    for name, width, height, path in zip(*columns):
        if path is None:
            continue
        try:
            with Image.open(path) as image:
                real = image.size
        except (OSError, ValueError, SyntaxError):
            continue  # an undecodable picture is named where pictures are decoded (store.py, phrase_store.py)
        if tuple(real) != (width, height):
            raise DataError(f"{corpus.annotations / f'{name}.xml'}: <size> (<width>x<height>) = {width}x{height}, "
                            f"but its image {path} is {real[0]}x{real[1]}")


class _Tables:
    """Row builders for the four tables, filled one image at a time."""

    def __init__(self) -> None:
        self.images: dict[str, list] = {k: [] for k in ("image_id", "name", "split", "width", "height")}
        self.captions: dict[str, list] = {k: [] for k in ("caption_id", "image_id", "split", "text")}
        self.phrases: dict[str, list] = {k: [] for k in ("phrase_id", "caption_id", "image_id", "split", "chain_id",
                                                         "region_id", "entity_id", "text", "types", "first_word")}
        self.phrase_boxes: list[np.ndarray] = []
        self.regions: dict[str, list] = {k: [] for k in ("region_id", "image_id", "entity_id", "split", "n_boxes")}
        self.region_boxes: list[np.ndarray] = []
        self.dropped = {NOTVISUAL: 0, "no_box": 0}

    def add_image(self, name: str, split: str, captions: list[Caption], boxes: ImageBoxes) -> None:
        image_id = int(name)
        for key, value in zip(self.images, (image_id, name, split, boxes.width, boxes.height)):
            self.images[key].append(value)
        entity_ids = np.array(sorted(boxes.boxes), dtype=np.int64)
        counts = {e: len(b) for e, b in boxes.boxes.items()}
        if len(entity_ids):
            keys, merged = merge_boxes(np.concatenate([boxes.boxes[e] for e in entity_ids]),
                                       np.repeat(entity_ids, [counts[e] for e in entity_ids]))
        else:
            keys, merged = entity_ids, np.zeros((0, 4))
        region_of = {}
        for entity, box in zip(keys.tolist(), merged):
            region_of[entity] = len(self.regions["region_id"])
            for key, value in zip(self.regions, (region_of[entity], image_id, entity, split, counts[entity])):
                self.regions[key].append(value)
            self.region_boxes.append(box)
        for caption in captions:
            caption_id = len(self.captions["caption_id"])
            for key, value in zip(self.captions, (caption_id, image_id, split, caption.text)):
                self.captions[key].append(value)
            for m in caption.mentions:
                self._add_phrase(m, caption_id, image_id, split, region_of, merged, keys)

    def _add_phrase(self, m: Mention, caption_id: int, image_id: int, split: str, region_of: dict[int, int],
                    merged: np.ndarray, keys: np.ndarray) -> None:
        if NOTVISUAL in m.types:
            self.dropped[NOTVISUAL] += 1
            return
        if m.entity_id not in region_of:
            self.dropped["no_box"] += 1
            return
        region = region_of[m.entity_id]
        row = (len(self.phrases["phrase_id"]), caption_id, image_id, split, region, region, m.entity_id, m.text,
               list(m.types), m.first_word)
        for key, value in zip(self.phrases, row):
            self.phrases[key].append(value)
        self.phrase_boxes.append(merged[int(np.searchsorted(keys, m.entity_id))])

    def tables(self, paths: pa.Array) -> tuple[pa.Table, pa.Table, pa.Table, pa.Table]:
        i64, i32, s = pa.int64(), pa.int32(), pa.string()
        images = pa.table({**{k: pa.array(v, t) for (k, v), t in zip(self.images.items(), (i64, s, s, i32, i32))},
                           "path": paths})
        captions = pa.table({k: pa.array(v, t) for (k, v), t in zip(self.captions.items(), (i64, i64, s, s))})
        p_types = (i64, i64, i64, s, i64, i64, i64, s, pa.list_(s), i32)
        phrases = pa.table({**{k: pa.array(v, t) for (k, v), t in zip(self.phrases.items(), p_types)},
                            "box": boxes_column(self.phrase_boxes)})
        regions = pa.table({**{k: pa.array(v, t) for (k, v), t in zip(self.regions.items(), (i64, i64, i64, s, i32))},
                            "box": boxes_column(self.region_boxes)})
        return images, captions, phrases, regions


def boxes_column(boxes) -> pa.Array:
    """[N, 4] boxes -> a list<float32>[4] column (`column_to_numpy` reads it back)."""
    rows = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return features_column(rows)


def boxes_of(column) -> np.ndarray:
    """A box column -> [N, 4] float32."""
    if len(column) == 0:
        return np.zeros((0, 4), np.float32)
    return column_to_numpy(column)


def read_entities(root: str | Path, *, image_dir: str | Path | None = None, proposals: str | Path | None = None,
                  splits: list[str] | None = None, default_split: str = "train",
                  check_sizes: bool = True) -> PhraseCorpus:
    """Read a Flickr30K Entities folder (see the module docstring). `image_dir` defaults to
    `root/images` when that folder exists; `proposals` to `root/proposals.parquet` when it exists;
    `splits` restricts to those split lists. `check_sizes=False` leaves `check_image_sizes` (an
    image header opened per picture) to the caller: the feature cache runs it when it is built."""
    root = Path(root)
    for sub in (SENTENCES_DIR, ANNOTATIONS_DIR):
        if not (root / sub).is_dir():
            raise DataError(f"{root}: missing folder {sub}/ (expected the Flickr30K Entities layout)")
    listed, lists = _image_list(root, splits, default_split)
    if not listed:
        raise DataError(f"{root}: no images in split(s) {splits}")
    clash = next((n for n, m in zip(listed, listed[1:]) if int(n[0]) == int(m[0])), None)
    if clash is not None:
        raise DataError(f"{root}: two images have the numeric id {int(clash[0])} (file names differ only in zeros)")
    tables, filenames, sizes = _Tables(), [], []
    for name, split in listed:
        sentences, annotations = root / SENTENCES_DIR / f"{name}.txt", root / ANNOTATIONS_DIR / f"{name}.xml"
        for path in (sentences, annotations):
            if not path.is_file():
                raise DataError(f"{path}: missing (image id {name!r} is listed in split {split!r})")
        boxes = read_boxes(annotations)
        tables.add_image(name, split, read_captions(sentences), boxes)
        filenames.append(boxes.filename)
        sizes.append((boxes.width, boxes.height))
    if image_dir is None and (root / IMAGES_DIR).is_dir():
        image_dir = root / IMAGES_DIR
    paths = _image_paths([n for n, _ in listed], filenames, Path(image_dir) if image_dir is not None else None)
    images, captions, phrases, regions = tables.tables(paths)
    proposal_path = Path(proposals) if proposals is not None else root / PROPOSALS_FILE
    proposal_table = None
    if proposals is not None or proposal_path.is_file():
        proposal_table = read_proposals(proposal_path, images.column("image_id"), sizes)
    files = lists + ([proposal_path] if proposal_table is not None else []) + [root / SENTENCES_DIR,
                                                                               root / ANNOTATIONS_DIR]
    corpus = PhraseCorpus(images, captions, phrases, regions, proposal_table, f"entities:{root}", files, tables.dropped,
                          proposal_path if proposal_table is not None else None, root / ANNOTATIONS_DIR)
    if check_sizes:
        check_image_sizes(corpus)
    return corpus


# --------------------------------------------------------------------------- proposals


PROPOSAL_COLUMNS = ("image_id", "x1", "y1", "x2", "y2")


def write_proposals(path: str | Path, image_ids, boxes: list) -> Path:
    """Write proposals: `boxes[i]` ([P_i, 4], 0-based exclusive pixels) belongs to `image_ids[i]`."""
    ids = np.concatenate([np.full(len(b), int(i), np.int64) for i, b in zip(image_ids, boxes)]) if boxes else \
        np.zeros(0, np.int64)
    rows = np.concatenate([np.asarray(b, np.float32).reshape(-1, 4) for b in boxes]) if boxes else \
        np.zeros((0, 4), np.float32)
    table = pa.table({"image_id": ids, **{c: rows[:, k] for k, c in enumerate(PROPOSAL_COLUMNS[1:])}})
    path = Path(path)
    atomic_write_table(table, path)
    return path


def _proposal_ids(column: pa.ChunkedArray, path: Path) -> np.ndarray:
    """The image_id column as int64: integers, integral floats (3.0) or decimal texts ("3"). A
    null, a fraction or a word is named with its row: a cast would drop or truncate it silently."""
    if column.null_count:
        r = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{path}: row {r}: image_id is null ({column.null_count} null rows)")
    if pa.types.is_integer(column.type):
        return column.to_numpy().astype(np.int64)
    if pa.types.is_floating(column.type):
        values = column.to_numpy().astype(np.float64)
        ok = np.isfinite(values) & (values == np.round(values))
        ids = np.where(ok, values, 0).astype(np.int64)
    elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        values = column.to_pylist()  # a text column is rare: one Python pass is fine
        parsed = [_int_text(v) for v in values]
        ok = np.array([p is not None for p in parsed], bool)
        ids = np.array([p or 0 for p in parsed], np.int64)
    else:
        raise DataError(f"{path}: column image_id has type {column.type}; expected integer image ids")
    bad = np.flatnonzero(~ok)
    if bad.size:
        r = int(bad[0])
        value = values[r] if isinstance(values, list) else float(values[r])
        raise DataError(f"{path}: row {r}: image_id = {value!r} is not an integer image id ({bad.size} bad rows)")
    return ids


def _int_text(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _check_inside(path: Path, rows: np.ndarray, ids: np.ndarray, boxes: np.ndarray, image_ids, sizes) -> None:
    """Refuse a proposal with no pixel in its image (`sizes`: (width, height) per `image_ids`)."""
    size = np.asarray(sizes, np.float64).reshape(-1, 2)
    ordered = np.argsort(np.asarray(image_ids, np.int64), kind="stable")
    where = ordered[np.searchsorted(np.asarray(image_ids, np.int64)[ordered], ids)]
    bad = np.flatnonzero(outside_image(boxes, size[where, 0], size[where, 1]))
    if bad.size:
        r, (w, h) = int(bad[0]), size[where[bad[0]]].astype(int)
        raise DataError(f"{path}: row {rows[r]} (image_id {ids[r]}): box (x1, y1, x2, y2) = "
                        f"{tuple(boxes[r].tolist())} lies entirely outside its {w}x{h} image ({bad.size} such rows)")


def read_proposals(path: str | Path, image_ids=None, sizes: list[tuple[int, int]] | None = None) -> pa.Table:
    """A proposals file -> (image_id, proposal_index, box) sorted by image then index, kept to
    `image_ids` when given. A missing column, an image_id that is not an integer, a non-finite
    value, x2 < x1, or (given `sizes`, (width, height) per `image_ids`) a box with no pixel in its
    image is a DataError naming the row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: proposals file does not exist")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from exc
    missing = [c for c in PROPOSAL_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns are {table.column_names}")
    ids = _proposal_ids(table.column("image_id"), path)
    boxes = np.stack([table.column(c).to_numpy().astype(np.float64) for c in PROPOSAL_COLUMNS[1:]], axis=1)
    bad = np.flatnonzero(~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))
    if bad.size:
        r = int(bad[0])
        raise DataError(f"{path}: row {r} (image_id {ids[r]}): box (x1, y1, x2, y2) = {tuple(boxes[r].tolist())} "
                        f"is not finite or has x2 < x1 / y2 < y1 ({bad.size} bad rows)")
    rows = np.arange(len(ids))
    if image_ids is not None:
        keep = np.isin(ids, np.asarray(image_ids, dtype=np.int64))
        ids, boxes, rows = ids[keep], boxes[keep], rows[keep]
        if sizes is not None:
            _check_inside(path, rows, ids, boxes, image_ids, sizes)
    order = np.argsort(ids, kind="stable")
    ids, boxes = ids[order], boxes[order]
    starts = np.searchsorted(ids, ids, side="left")
    index = (np.arange(len(ids)) - starts).astype(np.int32)
    return pa.table({"image_id": pa.array(ids, pa.int64()), "proposal_index": pa.array(index, pa.int32()),
                     "box": boxes_column(boxes)})


def padded_proposals(proposals: pa.Table, image_ids) -> tuple[np.ndarray, np.ndarray]:
    """Proposals laid out per image: ([I, P_max, 4] float32 boxes, [I, P_max] validity), rows in the
    order of `image_ids`; padding is zeros marked invalid. What the metrics and a scorer take."""
    ids = np.asarray(image_ids, dtype=np.int64)
    prop_ids = proposals.column("image_id").to_numpy()
    index = proposals.column("proposal_index").to_numpy().astype(np.int64)
    boxes = boxes_of(proposals.column("box"))
    width = int(index.max()) + 1 if len(index) else 0
    row_of = {int(i): r for r, i in enumerate(ids)}
    rows = np.array([row_of.get(int(i), -1) for i in prop_ids], dtype=np.int64)
    keep = rows >= 0
    out = np.zeros((len(ids), width, 4), np.float32)
    valid = np.zeros((len(ids), width), bool)
    out[rows[keep], index[keep]] = boxes[keep]
    valid[rows[keep], index[keep]] = True
    return out, valid


__all__ = ["SENTENCES_DIR", "ANNOTATIONS_DIR", "IMAGES_DIR", "PROPOSALS_FILE", "SPLITS", "NOTVISUAL", "ENTITY_TYPES",
           "Mention", "Caption", "parse_caption", "read_captions", "ImageBoxes", "read_boxes", "outside_image",
           "check_image_sizes",
           "PhraseCorpus", "read_entities", "boxes_column", "boxes_of", "write_proposals", "read_proposals",
           "padded_proposals"]
