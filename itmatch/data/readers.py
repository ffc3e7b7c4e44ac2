"""Readers: one per source scheme, each returning a `Corpus` of two Arrow tables.

images:   image_id int64, split string, and one payload column: `path` (string, a file),
          `image` (binary, encoded bytes) or `feature` (list<float32>, precomputed)
captions: caption_id int64, image_id int64 (the group id), split string, text string,
          and optionally `feature` (list<float32>, precomputed caption features)

Split names are normalised: VSE++'s "dev" is "val"; Karpathy's "restval" is "train" unless the
source says `?restval=keep`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import stat
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from itmatch import files
from itmatch.data.sources import DataError, Source, karpathy_paths, parse_source, typed_options

log = logging.getLogger("itmatch.data")

KNOWN_SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"dev": "val", "validation": "val", "valid": "val", "training": "train", "testing": "test"}


@dataclass
class Corpus:
    images: pa.Table
    captions: pa.Table
    name: str
    files: list[Path]
    """Files the corpus was read from (their sizes and times key the feature cache)."""
    missing_caption_features: dict[str, Path] = field(default_factory=dict)
    """precomp: split -> the caption-feature file it lacks while other splits have theirs (named
    when the text encoder cannot encode that split live)."""

    @property
    def splits(self) -> list[str]:
        return sorted(set(self.captions.column("split").to_pylist()))

    def payload(self) -> str:
        for column in ("feature", "image", "path"):
            if column in self.images.column_names:
                return column
        raise DataError(f"{self.name}: images have none of the columns feature, image, path")

    def image_files(self) -> list:
        """The image files the source names (their sizes and times key the feature cache too)."""
        return self.images.column("path").to_pylist() if "path" in self.images.column_names else []

    def has_caption_features(self) -> bool:
        """Whether every caption comes with precomputed features (precomp's caps_<encoder>.npy)."""
        caps = self.captions
        return "feature" in caps.column_names and caps.column("feature").null_count == 0


class LazyCorpus:
    """A corpus read on first use of its tables, with what the feature cache needs known up front
    (files, image files, splits): a cached Parquet source is never decoded into Python objects (a
    310 MB table took 2.5 GB on every cache hit)."""

    def __init__(self, name: str, files: list[Path], splits: list[str], load: Callable[[], Corpus],
                 image_files: list) -> None:
        self.name, self.files, self._splits, self._load, self._image_files = name, files, splits, load, image_files

    @functools.cached_property
    def _tables(self) -> Corpus:
        return self._load()

    @property
    def images(self) -> pa.Table:
        return self._tables.images

    @property
    def captions(self) -> pa.Table:
        return self._tables.captions

    @property
    def splits(self) -> list[str]:
        return self._splits

    def payload(self) -> str:
        return "image"

    def image_files(self) -> list:
        return self._image_files

    def has_caption_features(self) -> bool:
        return False  # table sources hold captions as text


def features_column(rows: np.ndarray) -> pa.Array:
    """[N, D] float32 -> a fixed-size-list Arrow column (zero-copy back to numpy)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1])


def column_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The inverse of `features_column`."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = array.type.list_size
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def _split(name: str, restval: str = "train") -> str:
    name = name.strip().lower()  # "Train" or " test" is the split users mean, not one nothing reads
    if name == "restval" and restval != "keep":
        return restval
    return SPLIT_ALIASES.get(name, name)


def split_name(text: str) -> str:
    """A split as a user may write it (`dev`, `Validation`, `train+dev`) as stored (`val`, `train+val`)."""
    return "+".join(_split(part, "keep") for part in text.split("+"))


# ---------------------------------------------------------------------------- precomp


def read_utf8(path: Path) -> str:
    """A data file's text (itmatch.files.read_utf8); unreadable or not UTF-8: a DataError naming it."""
    return files.read_utf8(path, DataError)


def text_lines(text: str) -> list[str]:
    """A text file's lines as Python's universal newlines read them (LF, CRLF or CR ends one), as VSE++
    reads its caption files; not str.splitlines, which also splits at form feeds, U+2028 and the other
    Unicode separators a caption may hold, shifting every later caption onto the wrong image."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _load_npy(path: Path, what: str) -> np.ndarray:
    """A [rows, width] real-valued array, memory-mapped; `what` (e.g. "image features of split 'val'")
    names it in the messages of the value check."""
    if path.stat().st_size == 0:  # np.load raises EOFError, which no caller expects
        raise DataError(f"{path}: empty file (0 bytes), not an .npy array")
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:  # EOFError: a header cut short
        raise DataError(f"{path}: cannot read as .npy ({exc})") from exc
    if not isinstance(array, np.ndarray):  # np.savez's archive under an .npy name
        raise DataError(f"{path}: is an .npz archive, not one .npy array (save it with np.save)")
    if array.ndim != 2:
        raise DataError(f"{path}: expected a 2-D array [rows, dim], got shape {array.shape}")
    if array.dtype.kind not in "biuf":  # complex would lose its imaginary part, strings parse or not
        raise DataError(f"{path}: expected real numbers, got dtype {array.dtype}")
    if array.shape[1] < 1:  # Arrow has no zero-size list column; a model no zero-size input
        raise DataError(f"{path}: shape {array.shape}: {what} are 0 wide (each row needs at least one value)")
    _check_values(array, path, what)
    return array


_F32_MAX = float(np.finfo(np.float32).max)


def _check_values(array: np.ndarray, path: Path, what: str, chunk_bytes: int = 1 << 26) -> None:
    """Refuse rows holding NaN/inf, or values so large that the row's squared length overflows
    float32: the features are cast to float32 and the model takes dot products and norms of them
    (3e38 passed as finite and the loss turned non-finite a few steps into training). Checked a
    chunk of rows at a time, as float64: VSE++ files reach GBs, memory-mapped."""
    step = max(1, chunk_bytes // (8 * array.shape[1]))
    first, count = -1, 0
    for start in range(0, len(array), step):
        bad = _overflowing_rows(array[start:start + step])
        if bad.size and first < 0:
            first = start + int(bad[0])
        count += bad.size
    if count:
        raise DataError(f"{path}: {what}: row {first} {_describe_row(np.asarray(array[first], np.float64))} "
                        f"({count} bad row{'s' if count > 1 else ''})")


def _overflowing_rows(rows: np.ndarray) -> np.ndarray:
    """Indices of the rows whose squared L2 norm is not a finite float32 (NaN compares false)."""
    rows = np.asarray(rows, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        squared = np.einsum("ij,ij->i", rows, rows)
    return np.flatnonzero(~(squared <= _F32_MAX))


def _describe_row(row: np.ndarray) -> str:
    """Why a row `_overflowing_rows` found is refused, with the value to look for."""
    odd = row[~np.isfinite(row)]
    if odd.size:
        return f"holds the non-finite value {odd[0]}"
    value = row[np.argmax(np.abs(row))]
    if abs(value) > _F32_MAX:  # finite in the file; the float32 cast makes it inf
        return f"holds {value:g}: finite, but beyond the range of float32 (max {_F32_MAX:.3g}), read as inf"
    return f"holds {value:g}: too large, the row's squared length overflows float32 (max {_F32_MAX:.3g})"


def _repeated_rows(ims: np.ndarray, path: Path, per: int, chunk_bytes: int = 1 << 26) -> np.ndarray:
    """The image rows of a file holding one row per caption, each image's row repeated `per` times.
    Rows that differ within a run of `per` are not that layout (one caption per image, or features
    per caption): read so, captions would be paired with other images' features. Compared a chunk of
    runs at a time: VSE++'s COCO train file is ~4.6 GB, memory-mapped; a whole-file comparison held
    a boolean per value besides."""
    runs = np.asarray(ims).reshape(-1, per, ims.shape[1])
    step = max(1, chunk_bytes // max(1, runs[0].nbytes))
    bad = [b + start for start in range(0, len(runs), step) for b in _differing_runs(runs[start:start + step])]
    if bad:
        first = int(bad[0]) * per
        raise DataError(f"{path}: {ims.shape[0]} rows for as many captions, but rows {first}..{first + per - 1} "
                        f"are not one image's row repeated caps_per_image={per} times ({len(bad)} of "
                        f"{len(runs)} runs differ); with one caption per image, add ?caps_per_image=1 to the source")
    return runs[:, 0].copy()


def _differing_runs(runs: np.ndarray) -> np.ndarray:
    """Indices of the runs (rows of `runs`, shape [n, per, dim]) whose rows are not all the first."""
    same = runs == runs[:, :1]
    if runs.dtype.kind == "f":  # NaN rows are refused later, by what they are
        same |= np.isnan(runs) & np.isnan(runs[:, :1])
    return np.flatnonzero(~same.all(axis=(1, 2)))


def _is_file(path: Path) -> bool:
    """Whether `path` is a file; something else under that name (a folder) is refused, naming it,
    rather than read as missing (a split's caption features were then encoded live, unseen)."""
    kind = _path_kind(path, f"precomp:{path.parent}")  # a link loop is named as one, not reported missing
    if kind in ("folder", "other"):
        raise DataError(f"{path}: not a file (a {KIND_NAMES[kind]})")
    return kind == "file"


def _precomp_split(root: Path, prefix: str, caps_per_image: int, caption_features: str | None):
    ims_path, caps_path = root / f"{prefix}_ims.npy", root / f"{prefix}_caps.txt"
    for path in (ims_path, caps_path):
        if not _is_file(path):
            raise DataError(f"precomp:{root}: missing file {path.name}")
    ims = _load_npy(ims_path, f"image features of split {_split(prefix)!r}")
    if ims.shape[0] == 0:  # else its split was "not found" further on, though its files are there
        raise DataError(f"{ims_path}: no rows (shape {ims.shape}): split {_split(prefix)!r} has no images")
    texts = text_lines(read_utf8(caps_path))
    empty = next((i for i, t in enumerate(texts) if is_blank(t)), None)
    if empty is not None:
        last = " (the file's last line: a blank line at its end)" if empty == len(texts) - 1 else ""
        raise DataError(f"{caps_path}: line {empty + 1} is an empty caption {texts[empty]!r}{last}")
    n_caps = len(texts)
    if ims.shape[0] * caps_per_image == n_caps:
        image_rows = np.asarray(ims)
    elif ims.shape[0] == n_caps and n_caps % caps_per_image == 0:
        image_rows = _repeated_rows(ims, ims_path, caps_per_image)  # VSE++ COCO files repeat each image per caption
    else:
        raise DataError(
            f"{caps_path}: {n_caps} captions do not match {ims_path.name} with "
            f"{ims.shape[0]} rows at caps_per_image={caps_per_image} "
            f"(expected {ims.shape[0] * caps_per_image} captions, or one image row per caption)"
        )
    cap_feats, used = None, [ims_path, caps_path]
    if caption_features:
        feat_path = root / f"{prefix}_caps_{caption_features}.npy"
        if _is_file(feat_path):
            cap_feats = _load_npy(feat_path, f"caption features of split {_split(prefix)!r}")
            if cap_feats.shape[0] != n_caps:
                raise DataError(
                    f"{feat_path}: {cap_feats.shape[0]} rows but {caps_path.name} has {n_caps} captions"
                )
            used.append(feat_path)  # the feature cache must notice when these change
    return image_rows, texts, cap_feats, used


def read_precomp(source: Source, *, caption_features: str | None = None) -> Corpus:
    root = Path(source.location)
    if not root.is_dir():
        raise DataError(f"precomp:{root}: not a directory")
    per = int(source.options.get("caps_per_image", 5))
    if per < 1:
        raise DataError(f"data.source {str(source)!r}: caps_per_image={per}: must be at least 1")
    prefixes = sorted(p.name[: -len("_ims.npy")] for p in root.glob("*_ims.npy"))
    if not prefixes:
        raise DataError(f"precomp:{root}: no {{split}}_ims.npy files found")
    if "" in prefixes:  # read as a split named "", which no run can choose: its files were read for nothing
        raise DataError(f"{root / '_ims.npy'}: no split name before _ims.npy; name it {{split}}_ims.npy "
                        "(train_ims.npy, dev_ims.npy, test_ims.npy) with its _caps.txt, or move it away")
    named: dict[str, str] = {}
    for prefix in prefixes:  # dev_* and val_* are both the validation split: merged, it would hold both
        other = named.setdefault(_split(prefix), prefix)
        if other != prefix:
            raise DataError(f"precomp:{root}: {other}_ims.npy and {prefix}_ims.npy are both split {_split(prefix)!r}; "
                            "keep one (or rename the other to a split of its own)")
    parts = [_precomp_split(root, prefix, per, caption_features) for prefix in prefixes]
    _same_width("image", [(rows.shape[1], used[0]) for rows, _, _, used in parts])
    _same_width("caption", [(feats.shape[1], used[-1]) for _, _, feats, used in parts if feats is not None])
    image_parts, caption_parts, files = [], [], []
    for prefix, (rows, texts, cap_feats, used) in zip(prefixes, parts):
        first_image = sum(len(t) for t in image_parts)
        image_parts.append(_image_table(_split(prefix), rows, first_image))
        caption_parts.append(_caption_table(image_parts[-1], texts, cap_feats, per,
                                            sum(len(t) for t in caption_parts)))
        files += used
    corpus = Corpus(_concat(image_parts, root), _concat(caption_parts, root), str(source), files)
    if any(feats is not None for _, _, feats, _ in parts):  # some splits have them: name the files the others lack
        corpus.missing_caption_features = {_split(prefix): root / f"{prefix}_caps_{caption_features}.npy"
                                           for prefix, part in zip(prefixes, parts) if part[2] is None}
    return corpus


def _image_table(split: str, rows: np.ndarray, first_id: int) -> pa.Table:
    ids = np.arange(first_id, first_id + rows.shape[0], dtype=np.int64)
    return pa.table({"image_id": ids, "split": pa.array([split] * len(ids)), "feature": features_column(rows)})


def _caption_table(images: pa.Table, texts: list[str], cap_feats: np.ndarray | None, per: int,
                   first_id: int) -> pa.Table:
    """One split's captions, `per` to each of its `images` in order."""
    split = images.column("split")[0].as_py()
    caption = {
        "caption_id": np.arange(first_id, first_id + len(texts), dtype=np.int64),
        "image_id": np.repeat(images.column("image_id").to_numpy(), per), "split": pa.array([split] * len(texts)),
        "text": pa.array(texts, pa.string()),
    }
    if cap_feats is not None:
        caption["feature"] = features_column(np.asarray(cap_feats))
    return pa.table(caption)


def _same_width(kind: str, widths: list[tuple[int, Path]]) -> None:
    """Every split's features must have one width (a model takes one input size). The odd file is
    one that differs from the most common width (on a tie, from the first file's): blaming the first
    file, right or not, named the right one when only one split was off."""
    if not widths:
        return
    usual = Counter(width for width, _ in widths).most_common(1)[0][0]  # ties: the first seen
    odd = next(((width, path) for width, path in widths if width != usual), None)
    if odd is not None:
        others = [path.name for width, path in widths if width == usual]
        raise DataError(f"{odd[1]}: {kind} features are {odd[0]} wide but {', '.join(others)} "
                        f"{'has' if len(others) == 1 else 'have'} width {usual}")


def _concat(tables: list[pa.Table], where: Path) -> pa.Table:
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"{where}: splits disagree in their columns or feature widths ({exc})") from exc


# ---------------------------------------------------------------------------- karpathy


def _karpathy_int(value: Any, where: str) -> int:
    """An id field: an integer (a JSON 3.0 counts, 1.5 or "7" does not -- ids that a float rounds or a
    string hides would merge or split images silently)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or not -2**63 <= value < 2**63:  # NaN/Infinity (Python's json writes them), int64
        raise DataError(f"{where} = {value!r}: expected an integer (a 64-bit one)")
    return int(value)


def _karpathy_str(entry: dict, key: str, where: str) -> str:
    value = entry[key]
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}.{key} = {value!r}: expected a non-empty string")
    return value


_JSON_TYPES = {str: "string", int: "number", float: "number", bool: "boolean", list: "list", type(None): "null"}


def _karpathy_caption(sentence: Any, where: str) -> str:
    if not isinstance(sentence, dict):  # a bare string was shown as "raw = None", hiding what the file holds
        kind = _JSON_TYPES.get(type(sentence), type(sentence).__name__)
        shown = json.dumps(sentence, ensure_ascii=False)[:80]
        raise DataError(f"{where}: no caption text: it is {shown} (a JSON {kind}), expected a sentence object "
                        "{\"raw\": caption, ...}")
    raw, tokens = sentence.get("raw"), sentence.get("tokens")
    if raw is None and isinstance(tokens, list) and all(isinstance(t, str) for t in tokens):
        raw = " ".join(tokens)
    if not isinstance(raw, str) or is_blank(raw):
        shown = raw if raw is not None or tokens is None else tokens
        raise DataError(f"{where}: no caption text (raw = {shown!r})")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate escape ("\\ud800"): no text encoder can take it
        raise DataError(f"{where}: caption {raw!r} is not valid Unicode ({exc.reason} at {exc.start})") from None
    return raw.strip()


def _karpathy_entry(entry: Any, index: int, json_path: Path) -> tuple[Optional[int], str, str,
                                                                      list[tuple[Optional[int], str]]]:
    where = f"{json_path}: images[{index}]"
    if not isinstance(entry, dict):
        raise DataError(f"{where} is a {type(entry).__name__}, expected an object")
    for key in ("filename", "split", "sentences"):
        if key not in entry:
            raise DataError(f"{where}: missing field {key!r}")
    sentences = entry["sentences"]
    if not isinstance(sentences, list) or not sentences:
        raise DataError(f"{where}.sentences = {sentences!r}: expected a non-empty list")
    caps = []
    for j, sentence in enumerate(sentences):
        text = _karpathy_caption(sentence, f"{where}.sentences[{j}]")
        sentid = sentence.get("sentid")  # absent or null: numbered in file order
        # None, not -1, for "absent": a sentid of -1 in the file was taken for a missing one
        caps.append((None if sentid is None else _karpathy_int(sentid, f"{where}.sentences[{j}].sentid"), text))
    folder = entry.get("filepath") or ""
    if not isinstance(folder, str):
        raise DataError(f"{where}.filepath = {folder!r}: expected a string")
    filename = str(Path(folder) / _karpathy_str(entry, "filename", where))
    if Path(filename).is_absolute() or ".." in Path(filename).parts:  # the images folder holds every image
        raise DataError(f"{where}: filepath/filename {filename!r} leads out of the images folder; "
                        "give paths relative to it, without '..'")
    image_id = entry.get("imgid")  # absent or null: numbered in file order (all or none, read_karpathy)
    image_id = None if image_id is None else _karpathy_int(image_id, f"{where}.imgid")
    return image_id, _karpathy_str(entry, "split", where), filename, caps


class _Ids:
    """The ids a Karpathy file gives in one field (imgid, sentid): each once, and all or none of its
    entries with one, else a numbered entry's id could collide with a given one."""

    def __init__(self, json_path: Path, field: str) -> None:
        self.json_path, self.field, self.first = json_path, field, {}
        self.given: Optional[str] = None  # where the first given id was
        self.absent: Optional[str] = None  # where the first missing one was

    def add(self, value: Optional[int], where: str) -> None:
        if value is None:
            self.absent = self.absent or where
        else:
            self.given = self.given or where
            other = self.first.setdefault(value, where)
            if other != where:
                raise DataError(f"{self.json_path}: {where}.{self.field} = {value} is also {other}'s: "
                                f"each {self.field} must be unique")
        if self.given and self.absent:
            raise DataError(f"{self.json_path}: {self.absent} has no {self.field!r} while {self.given} has one: "
                            f"give every entry its {self.field}, or none (then they are numbered in file order)")


def _json_document(path: Path) -> Any:
    """The parsed file; a key given twice in one object is refused (JSON keeps the last silently,
    which moved an image to the split written second), as is nesting too deep to parse."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        twice = next((k for k in keys if keys.count(k) > 1), None)
        if twice is not None:
            raise DataError(f"{path}: key {twice!r} appears twice in one object ({dict(items)!r:.200}); keep one")
        return dict(items)

    try:
        return json.loads(read_utf8(path), object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to read as a Karpathy dataset file") from None


def _check_split_name(where: str, split: str) -> None:
    """A split name one or two letters from a known one ('trian', 'tset') is a typo: the image would
    sit in a split no run reads, its captions silently missing from training. Other names, and
    numbered ones ('train2', a fold), are a user's own splits (data.train_split=... names them)."""
    import difflib

    known = (*KNOWN_SPLITS, "restval")
    close = difflib.get_close_matches(split, known, n=1, cutoff=0.7)
    if split not in known and close and not split[-1:].isdigit():
        close = close[0]
        raise DataError(f"{where} = {split!r}: not a split (did you mean {close!r}?); "
                        f"the splits are {', '.join(known)} or your own, named in data.*_split")


def read_karpathy(source: Source, **_: Any) -> Corpus:
    json_text, image_dir = karpathy_paths(source.location)
    json_path = Path(json_text)
    kind = _path_kind(json_path, f"karpathy:{json_path}")  # a link loop is named as one
    if kind != "file":
        raise DataError(f"karpathy:{json_path}: " + ("file does not exist" if kind == "missing" else
                                                     f"is a {KIND_NAMES[kind]}, "
                                                     "not the dataset's JSON file") + _colon_hint(source.location))
    image_root = Path(image_dir) if image_dir else json_path.parent / "images"
    doc = _json_document(json_path)
    if not isinstance(doc, dict):  # "field 'images' must be..." sent users looking for a field the file has
        raise DataError(f"{json_path}: the top level is a JSON {type(doc).__name__}, expected an object "
                        "{\"images\": [...]} (the Karpathy split format)")
    entries = doc.get("images")
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{json_path}: field 'images' must be a non-empty list")
    _check_image_root(image_root, json_path, bool(image_dir))
    restval = source.options.get("restval", "train")
    images: dict[str, list] = {"image_id": [], "split": [], "path": []}
    captions: dict[str, list] = {"caption_id": [], "image_id": [], "split": [], "text": []}
    missing: list[str] = []
    seen: dict[Any, tuple[int, str, Path]] = {}
    imgids, sentids = _Ids(json_path, "imgid"), _Ids(json_path, "sentid")
    for index, entry in enumerate(entries):
        image_id, split, filename, caps = _karpathy_entry(entry, index, json_path)
        imgids.add(image_id, f"images[{index}]")
        for j, (sentid, _) in enumerate(caps):
            sentids.add(sentid, f"images[{index}].sentences[{j}]")
        image_id = index if image_id is None else image_id
        split = _split(split, restval)
        _check_split_name(f"{json_path}: images[{index}] field 'split'", split)
        path = image_root / filename
        where = f"{json_path}: images[{index}] field 'filename' = {filename!r}"
        kind = _path_kind(path, where)
        if kind in ("folder", "other"):  # a fifo or device would block or stream forever once read
            raise DataError(f"{where} is a {KIND_NAMES[kind]} ({path}), not an image file")
        if kind == "missing":
            missing.append(str(path))
        else:
            _check_listed_once(seen, path, (index, split), where)
        images["image_id"].append(image_id)
        images["split"].append(split)
        images["path"].append(str(path.resolve()))
        for sentid, text in caps:
            captions["caption_id"].append(len(captions["caption_id"]) if sentid is None else sentid)
            captions["image_id"].append(image_id)
            captions["split"].append(split)
            captions["text"].append(text)
    if missing:
        _report_missing(missing, image_root, json_path, source.options.get("bad_images") == "skip")
    table = pa.table(images, schema=pa.schema([("image_id", pa.int64()), ("split", pa.string()), ("path", pa.string())]))
    _check_unique(table, "image_id", json_path)
    cap_table = pa.table(captions)
    _check_unique(cap_table, "caption_id", json_path)
    return Corpus(table, cap_table, str(source), [json_path])


def _colon_hint(location: str) -> str:
    """How a JSON path holding ':' is written, where the location was split at one (else "")."""
    if ":" not in location:
        return ""
    return (f" (karpathy:JSON:IMAGE_DIR: {location!r} was split at its first ':', as no text before another "
            "':' is a file either; a ':' inside the JSON's path is written %3A)")


def _check_listed_once(seen: dict[Any, tuple[int, str, Path]], path: Path, entry: tuple[int, str], where: str) -> None:
    """Refuse a picture listed by two entries: in two splits a test image would be trained on; in one,
    its captions would count as wrong answers for itself. Files are told apart by device and inode, not
    by name: a hard link (or a name in other letter case on a case-insensitive disk) is the same
    picture under another name, which a comparison of resolved paths let through."""
    info, real = path.stat(), path.resolve()
    key: Any = (info.st_dev, info.st_ino) if info.st_ino else real  # no inode numbers (some file systems): by name
    index, split, first = seen.setdefault(key, (*entry, real))
    if index != entry[0]:
        splits = f"both in split {split!r}" if split == entry[1] else f"splits {split!r} and {entry[1]!r}"
        other = "" if first == real else f", {str(first)!r}, under another name (a hard link, or other letter case)"
        raise DataError(f"{where} is the same file as images[{index}]'s{other} ({splits}); give each image one entry")


def _report_missing(missing: list[str], image_root: Path, json_path: Path, skip: bool) -> None:
    """Missing image files: refused, naming them; under `?bad_images=skip` (README: it drops missing,
    unreadable and truncated images) a warning, and the store drops them and their captions with
    the others that cannot be read, counting them in its manifest."""
    _refuse_or_drop(f"{json_path}: {len(missing)} image file(s) named in field 'filename' are missing under "
                    f"{image_root}, e.g. {missing[:3]}{_missing_hint(Path(missing[0]))}", skip)


def _refuse_or_drop(text: str, skip: bool, refused: str = "") -> None:
    """Missing image files said in `text`: a DataError (`refused` appended), or under ?bad_images=skip
    a warning, the store then dropping them and their captions (store.drop_bad_images)."""
    if not skip:
        raise DataError(text + refused)
    log.warning("%s; bad_images=skip drops them and their captions", text)


def _missing_hint(path: Path) -> str:
    """Why a missing image may look present to the user: the name is a link to nothing (listed, but
    its target is gone), or its folder has a name that only looks the same (`_near_miss`)."""
    if os.path.islink(path):  # a dangling link: its name matches exactly, so _near_miss would blame the name
        return f"; {str(path)!r} is a link to {os.readlink(path)!r}, which does not exist"
    return _near_miss(path)


def _near_miss(path: Path) -> str:
    """Why a missing image may look present to the user: its folder has a file whose name differs only
    in letter case or Unicode normalization (macOS writes names decomposed, "e" + U+0301 for "é"),
    which prints the same. "" where there is none."""
    try:
        names = os.listdir(path.parent)
    except (OSError, ValueError):
        return ""
    want = unicodedata.normalize("NFC", path.name).casefold()
    near = next((n for n in names if unicodedata.normalize("NFC", n).casefold() == want), None)
    return "" if near is None else (f"; {str(path.parent / near)!r} is there, its name written with other letter "
                                    "case or Unicode normalization (NFC/NFD): rename the file or fix the JSON")


def _check_image_root(image_root: Path, json_path: Path, given: bool) -> None:
    """The image folder exists: else every image was reported missing under it, the folder's own
    absence (or a file in its place) left for the user to spot."""
    kind = _path_kind(image_root, f"{json_path}: image folder {str(image_root)!r}")
    if kind != "folder":
        how = ("given after the JSON path" if given
               else "the default: <json dir>/images; give another as karpathy:JSON:IMAGE_DIR")
        raise DataError(f"{json_path}: image folder {image_root} ({how}) "
                        f"{'does not exist' if kind == 'missing' else 'is not a folder'}")


KIND_NAMES = {"folder": "folder", "other": "special file"}
"""How a message names what `_path_kind` found in place of a file."""


def _path_kind(path: Path, where: str) -> str:
    """"file", "folder", "missing" or "other" (a fifo, a device), following links. A path that cannot
    be looked up (a name too long, a NUL byte, a link loop, no permission) is a DataError naming
    `where` and the reason: pathlib's is_file() raises some of those and calls others missing."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as exc:
        raise DataError(f"{where}: cannot look up {path} ({exc.strerror or exc})") from None
    except ValueError as exc:  # "embedded null byte"
        raise DataError(f"{where}: not a usable file name ({exc})") from None
    return "folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def _check_unique(table: pa.Table, column: str, where: Path | str) -> None:
    values = table.column(column)
    if len(pc.unique(values)) != len(values):
        counts = pc.value_counts(values).to_pylist()
        dup = next(c["values"] for c in counts if c["counts"] > 1)
        raise DataError(f"{where}: field {column!r} has duplicate value {dup!r}")


# ---------------------------------------------------------------------------- parquet / hf


def _parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise DataError(f"parquet:{path}: folder holds no .parquet files")
        return files
    kind = _path_kind(path, f"parquet:{path}")  # a link loop is named as one
    if kind != "file":
        raise DataError(f"parquet:{path}: {'file does not exist' if kind == 'missing' else 'is a special file'}")
    return [path]


def _name_splits(files: list[Path], path: Path) -> dict[Path, str]:
    """Each file's split by its name's leading word (`train-00000-of-00002`, `val2014`, `validation_0`)
    or its folder's, in a folder whose file names say splits; {} where none does (shards of one split:
    ?split=, default train)."""
    if not path.is_dir():
        return {}
    named = {file: _named_split(file, path) for file in files}
    return named if any(split in KNOWN_SPLITS for split in named.values()) else {}


def _named_split(file: Path, root: Path) -> str:
    """The split a file's name says, else the nearest folder under `root` whose name says one: the
    Hub's Parquet export is `default/train/0000.parquet`, `default/test/0000.parquet`, and with the
    file names alone its test and validation rows were read as training rows, without a word."""
    words = [_split(re.match(r"[A-Za-z]*", name).group(0))
             for name in (file.stem, *reversed(file.relative_to(root).parts[:-1]))]
    return next((word for word in words if word in KNOWN_SPLITS), words[0])


def _file_split(file: Path, named: dict[Path, str], folder: Path) -> str:
    """The split of a table without a split column in a folder whose file names say splits. A file
    named otherwise would join the default split unseen: refused, naming it."""
    if named[file] not in KNOWN_SPLITS:
        raise DataError(f"parquet:{folder}: {file.relative_to(folder)} has no split column and its name does not start "
                        "with a split (train, val/validation/dev, test), nor does its folder's, beside files whose "
                        "names do: add a split column or rename it")
    return named[file]


def _table_from_parquet(path: Path, split_col: str) -> pa.Table:
    files = _parquet_files(path)
    named = _name_splits(files, path)
    tables = []
    for file in files:
        table = _read_parquet_file(file)
        if split_col not in table.column_names and named:
            table = table.append_column(split_col, pa.array([_file_split(file, named, path)] * len(table)))
        tables.append(table)
    return _concat(tables, path) if len(tables) > 1 else tables[0]


def _parquet(path: Path, read: Callable[[Path], Any]) -> Any:
    """`read(path)` (its schema, some columns, the table), an empty or unreadable file a DataError."""
    try:
        empty = path.stat().st_size == 0  # a link to nothing or to itself fails here, in a folder's listing
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({files.read_problem(exc)})") from None
    if empty:
        raise DataError(f"{path}: empty file (0 bytes), not Parquet")
    try:  # absolute: pyarrow reads a relative `run:1/t.parquet` as a URI of scheme "run"
        return read(Path(os.path.abspath(path)))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0] if str(exc) else exc!r})") from exc


def _parquet_schema(path: Path) -> pa.Schema:
    return _parquet(path, pq.read_schema)


def _read_parquet_file(path: Path, columns: Optional[list[str]] = None) -> pa.Table:
    return _parquet(path, lambda file: pq.read_table(file, columns=columns))


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _shown(value: Any) -> str:
    """A table value as a message shows it: null as null (str(None) read as a file named 'None')."""
    return "null" if value is None else repr(str(value)[:120])


def _image_paths(value: str, base: Path, where: str) -> list[Path]:
    """Where a path of an image column may be: absolute, a `file:` URI (`file:///d/a%20b.png`), or
    relative to the table's folder (where an export writes its images), else to the working directory."""
    if value.startswith("file:"):
        parsed = urlparse(value)
        if parsed.netloc not in ("", "localhost"):  # file://host/share: a path on another machine
            raise DataError(f"{where} = {value!r}: a file: URI of host {parsed.netloc!r}; write file:///PATH")
        return [Path(url2pathname(parsed.path))]
    if _URL.match(value):  # http://, s3://, hf://: "not a file" sent users looking for a local file
        raise DataError(f"{where} = {value!r} is a URL: image columns are read from local files (paths or "
                        "file:///PATH): download the images first")
    path = Path(value)
    return [path] if path.is_absolute() else [base / path, path]


def _image_file(value: Any, base: Path, where: str) -> Optional[Path]:
    """The file a path of an image column names (`_image_paths`), None where no such file exists: a
    missing picture, dropped under ?bad_images=skip. A value that names no image file (null, blank,
    a folder, a fifo) is refused in any case, as Karpathy's filenames are: it is no picture gone."""
    if not isinstance(value, str) or is_blank(value):
        raise DataError(f"{where} = {_shown(value)}: no image (expected image bytes or the path of an image file)")
    for path in _image_paths(value, base, where):
        kind = _path_kind(path, f"{where} = {value!r}")
        if kind in ("folder", "other"):  # a fifo would block once read
            raise DataError(f"{where} = {value!r} is a {KIND_NAMES[kind]} ({path}), not an image file")
        if kind == "file":
            return path
    return None


def _no_file(where: str, value: str, base: Path) -> str:
    """The message for a path naming no file (the start of a refusal or a warning)."""
    paths = _image_paths(value, base, where)
    if len(paths) > 1:
        return (f"{where} = {value!r} is not image bytes or a file (relative paths are looked up under {base} and "
                f"the working directory): no such file{_missing_hint(paths[0])}")
    shown = "" if str(paths[0]) == value else f" {paths[0]}"  # a file: URI's path, escapes decoded
    return f"{where} = {value!r} is not image bytes or a file: no such file{shown}{_missing_hint(paths[0])}"


def _image_bytes(value: Any, row_at: str, field: str, base: Path, skip: bool) -> Optional[bytes]:
    """A row's encoded picture (`row_at`: the source and row); None for a missing or unreadable file
    under `skip` (the store drops it with its captions, and counts it)."""
    given = value
    if isinstance(value, dict):  # datasets.Image stores {bytes, path}
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str) or is_blank(value):
        raise DataError(f"{row_at}: image column value {_shown(given)} in field {field!r} is not image bytes or a file")
    where = f"{row_at}: field {field!r}"
    file = _image_file(value, base, where)
    if file is None:
        problem = _no_file(where, value, base)
    else:
        try:
            return file.read_bytes()
        except OSError as exc:  # no permission, an I/O error: unreadable, as bad_images=skip says
            problem = f"{where} = {value!r}: cannot read {file} ({files.read_problem(exc)})"
    if not skip:
        raise DataError(f"{problem} (add ?bad_images=skip to data.source to train without it)")
    return None


def _listed_images(column: pa.ChunkedArray, base: Path, where: str, field: str,
                   missing: list[tuple[str, str]]) -> list[Optional[str]]:
    """The image files a column of paths names, per row (cache keys); None where one is missing,
    each such row appended to `missing` as (where, value) for `_report_missing_paths`."""
    out: list[Optional[str]] = []
    for row, value in enumerate(column.to_pylist()):
        at = f"{where}: row {row}: field {field!r}"
        file = _image_file(value, base, at)
        if file is None:
            missing.append((at, value))
        out.append(None if file is None else str(file))
    return out


def _report_missing_paths(missing: list[tuple[str, str]], total: int, base: Path, skip: bool) -> None:
    """Missing files named by an image column of paths: refused, naming the first, as Karpathy's are
    (`_report_missing`); under ?bad_images=skip a warning, and the store drops them with their captions
    and counts them in its manifest."""
    if not missing:
        return
    where, value = missing[0]
    others = f", also {', '.join(repr(v) for _, v in missing[1:3])}" if len(missing) > 1 else ""
    _refuse_or_drop(f"{_no_file(where, value, base)}; {len(missing)} of the {total} image files named are missing"
                    f"{others}", skip, " (add ?bad_images=skip to data.source to train without them)")


def corpus_from_table(table: pa.Table, options: dict[str, str], name: str, files: list[Path], base: Path) -> Corpus:
    """Image/caption table (one row per image with a list of captions, or one row per caption);
    `base`: the folder its relative image paths start from."""
    image_col, text_col, id_col = table_columns(table.column_names, options, name)
    split_col = options.get("split_column", "split")
    splits = table.column(split_col).to_pylist() if split_col in table.column_names else [options.get("split", "train")] * len(table)
    raw_ids = table.column(id_col).to_pylist() if id_col else None
    images: dict[str, list] = {"image_id": [], "split": [], "image": []}
    captions: dict[str, list] = {"caption_id": [], "image_id": [], "split": [], "text": []}
    seen: dict[Any, int] = {}
    first_row: list[int] = []  # per image: the row it was first read from
    texts = table.column(text_col).to_pylist()
    skip = options.get("bad_images") == "skip"
    for row, value in enumerate(table.column(image_col).to_pylist()):
        data = _image_bytes(value, f"{name}: row {row}", image_col, base, skip)
        if not isinstance(splits[row], str) or not splits[row]:
            raise DataError(f"{name}: row {row}: field {split_col!r} = {splits[row]!r}: expected a split name")
        split = _split(splits[row])
        _check_split_name(f"{name}: row {row}: field {split_col!r}", split)
        if raw_ids is not None and raw_ids[row] is None:  # null ids would all become one image
            raise DataError(f"{name}: row {row}: field {id_col!r} is null (every row needs its image's id)")
        if raw_ids is not None and (not isinstance(raw_ids[row], (int, float, str, bytes))
                                    or isinstance(raw_ids[row], bool)):  # a list or struct: no image's id
            raise DataError(f"{name}: row {row}: field {id_col!r} = {raw_ids[row]!r}: not an id (a number or text)")
        if raw_ids is not None and isinstance(raw_ids[row], float) and not math.isfinite(raw_ids[row]):
            # NaN equals nothing, itself included: each row of an image became an image of its own
            raise DataError(f"{name}: row {row}: field {id_col!r} = {raw_ids[row]!r}: not an id "
                            "(a finite number or text)")
        # Keyed by split too: ids restart per split in many exports, and an image repeated in two
        # splits must become two images, else one split's captions point at the other's image.
        # a missing file (None under skip) is told apart by its path: the missing ones are not one image
        key = (split, raw_ids[row] if raw_ids is not None else data if data is not None else ("missing", str(value)))
        if key not in seen:
            seen[key] = len(seen)
            first_row.append(row)
            images["image_id"].append(seen[key])
            images["split"].append(split)
            images["image"].append(data)
        elif raw_ids is not None and images["image"][seen[key]] != data:  # one id, two pictures: one would be lost
            raise DataError(f"{name}: row {row}: field {id_col!r} = {raw_ids[row]!r} names another picture than row "
                            f"{first_row[seen[key]]} with the same id (split {split!r}): ids must name one image each")
        caps = texts[row] if isinstance(texts[row], list) else [texts[row]]
        if not caps:  # an image without captions has no positive to retrieve
            raise DataError(f"{name}: row {row}: field {text_col!r} is an empty list: every image needs a caption")
        for item in caps:
            text = _caption_text(item, f"{name}: row {row}: field {text_col!r}")
            captions["caption_id"].append(len(captions["caption_id"]))
            captions["image_id"].append(seen[key])
            captions["split"].append(split)
            captions["text"].append(text.strip())
    _warn_shared_pictures(images["image"], images["split"], first_row, name)
    image_table = pa.table(images, schema=pa.schema([("image_id", pa.int64()), ("split", pa.string()), ("image", pa.binary())]))
    return Corpus(image_table, pa.table(captions), name, files)


def _warn_shared_pictures(pictures: list[Optional[bytes]], splits: list[str], rows: list[int], name: str) -> None:
    """Warn where one picture (the same bytes) is an image of two splits: images are keyed by split
    (ids restart per split in many exports), so it is trained on and tested on, and test scores
    overstate. Karpathy's reader refuses one file under two entries; here exact duplicates across
    splits occur in real exports, so they are said, not refused."""
    first: dict[bytes, tuple[str, int]] = {}
    shared = []
    for data, split, row in zip(pictures, splits, rows):
        if data is None:
            continue
        seen = first.setdefault(data, (split, row))
        if seen[0] != split:
            shared.append((seen, (split, row)))
    if shared:
        (a_split, a_row), (b_split, b_row) = shared[0]
        log.warning("%s: %d picture(s) are images of two splits (the same bytes), e.g. row %d (%s) and row %d (%s): "
                    "such a picture is trained on and tested on, and test scores overstate", name, len(shared),
                    a_row, a_split, b_row, b_split)


def _caption_text(item: Any, where: str) -> str:
    """One caption of a text column: a string, or Karpathy's {"raw": string, ...}. The message shows
    the value as the table holds it (a dict without "raw" was shown as the None it gave)."""
    text = item.get("raw") if isinstance(item, dict) else item
    if isinstance(item, dict) and not isinstance(text, str):
        raise DataError(f"{where} holds {str(item)[:120]}: a dict without a \"raw\" caption string "
                        "(a caption is a string, or a dict holding one under \"raw\" as Karpathy's sentences do)")
    if not isinstance(text, str):
        raise DataError(f"{where} holds {str(item)[:120]}, not caption text")
    if is_blank(text):
        raise DataError(f"{where} has an empty caption {text!r}")
    return text


def is_blank(text: str) -> bool:
    """No character a reader sees: spaces, and also zero-width, control and format characters only
    ('\u200b', '\x00'), which `str.strip` keeps and a tokenizer turns into an empty caption."""
    return not any(ch.isprintable() and not ch.isspace() for ch in text)


def table_columns(names: list[str], options: dict[str, str], name: str) -> tuple[str, str, Optional[str]]:
    """The (image, text, id) columns a table source reads, each checked to exist among `names`."""
    image_col = options.get("image", "image")
    text_col = options.get("text", next((n for n in ("caption", "captions", "text", "sentences") if n in names), "caption"))
    id_col = options.get("id")
    for role, column in (("image", image_col), ("text", text_col), ("id", id_col)):
        if column is not None and column not in names:
            raise DataError(f"{name}: no {role} column {column!r}; columns are {names} (choose with ?{role}=COLUMN)")
    return image_col, text_col, id_col


def read_parquet(source: Source, **_: Any) -> LazyCorpus:
    """A Parquet file or folder; its splits and image files read from their columns alone, the
    table itself once the feature cache needs it (LazyCorpus)."""
    path, options, name = Path(source.location), source.options, str(source)
    files = _parquet_files(path)
    base = path if path.is_dir() else path.parent
    split_col, image_col = options.get("split_column", "split"), options.get("image", "image")
    named = _name_splits(files, path)
    splits: set[str] = set()
    image_files: list = []
    missing: list[tuple[str, str]] = []
    schemas = [_parquet_schema(file) for file in files]
    table_columns(list(dict.fromkeys(n for schema in schemas for n in schema.names)), options, name)
    _check_image_kinds(files, schemas, image_col, path)
    for file, schema in zip(files, schemas):
        if split_col in schema.names:
            splits |= _split_names(_read_parquet_file(file, [split_col]).column(0), str(file), split_col)
        else:
            splits.add(_file_split(file, named, path) if named else _split(options.get("split", "train")))
        if _holds_paths(schema, image_col):
            column = _read_parquet_file(file, [image_col]).column(0)
            image_files += _listed_images(column, base, str(file), image_col, missing)
    _report_missing_paths(missing, len(image_files), base, options.get("bad_images") == "skip")

    def load() -> Corpus:
        return corpus_from_table(_table_from_parquet(path, split_col), options, name, files, base)

    return LazyCorpus(name, files, sorted(splits), load, image_files)


def _split_names(column: pa.ChunkedArray, where: str, field: str) -> set[str]:
    """The splits a split column names; a value that is no name (a number, null, blank) refused here,
    else the run's splits were "not found" among none."""
    values = pc.unique(column).to_pylist()
    if any(not isinstance(v, str) or not v.strip() for v in values):
        row = next(i for i, v in enumerate(column.to_pylist()) if not isinstance(v, str) or not v.strip())
        raise DataError(f"{where}: row {row}: field {field!r} = {column[row].as_py()!r} (type {column.type}): "
                        "expected split names (train, val, test)")
    return {_split(v) for v in values}


def _check_image_kinds(files: list[Path], schemas: list[pa.Schema], column: str, path: Path) -> None:
    """Files of one folder hold their pictures one way: merged, a path column became bytes (the path's
    text, then undecodable) or bytes became text."""
    kinds = {file: _holds_paths(schema, column) for file, schema in zip(files, schemas) if column in schema.names}
    if len(set(kinds.values())) > 1:
        paths = next(f for f, is_path in kinds.items() if is_path)
        other = next(f for f, is_path in kinds.items() if not is_path)
        other_type = schemas[files.index(other)].field(column).type
        raise DataError(f"parquet:{path}: field {column!r} holds file paths in {paths.relative_to(path)} but "
                        f"{other_type} in {other.relative_to(path)}: write every file's images one way")


def _holds_paths(schema: pa.Schema, column: str) -> bool:
    """Whether `column` holds text (file paths): plain, large or dictionary-encoded (a pandas category;
    its files were left out of the cache key, a repaired image served its old features)."""
    if column not in schema.names:
        return False
    kind = schema.field(column).type
    kind = kind.value_type if pa.types.is_dictionary(kind) else kind
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def read_hf(source: Source, **_: Any) -> Corpus | LazyCorpus:
    path = Path(source.location)
    if path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        return read_parquet(source)
    if not path.exists():
        raise DataError(f"hf:{path}: no such folder (hf: reads a datasets.save_to_disk folder offline)")
    import datasets  # lazy: heavy, and only this reader needs it

    loaded = _load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        _check_dict_options(source, loaded)
        parts = list(loaded.items())
    else:
        parts = [(source.options.get("split", "train"), loaded)]
    _check_same_columns(parts, path)
    split_col, image_col = source.options.get("split_column", "split"), source.options.get("image", "image")
    _check_split_image_kinds(parts, image_col, path)
    tables, image_files, missing = [], [], []
    for split, ds in parts:
        table = ds.data.table  # memory-mapped Arrow: columns are read without decoding the rest
        if split_col not in table.column_names:
            table = table.append_column(split_col, pa.array([_split(split)] * len(table)))
        if _holds_paths(table.schema, image_col):
            image_files += _listed_images(table.column(image_col), path, f"hf:{path}: split {split!r}",
                                          image_col, missing)
        tables.append(table)
    table = _concat(tables, path)
    table_columns(table.column_names, source.options, str(source))
    files = sorted(p for p in path.rglob("*") if p.is_file())
    splits = _split_names(table.column(split_col), f"hf:{path}", split_col)
    _report_missing_paths(missing, len(image_files), path, source.options.get("bad_images") == "skip")
    return LazyCorpus(str(source), files, sorted(splits),
                      lambda: corpus_from_table(table, source.options, str(source), files, path), image_files)


# What datasets.load_from_disk raises on a damaged folder: besides missing files and unparsable
# JSON or Arrow (OSError, ValueError), JSON of the wrong shape fails as it is indexed (TypeError,
# KeyError, AttributeError), and a split saved without rows (no Arrow file) as an IndexError.
_LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError, pa.ArrowException)


def _load_from_disk(path: Path) -> Any:
    """datasets.load_from_disk(path); a damaged folder a DataError naming the file at fault where
    one is found (the library's messages name none, or only the folder)."""
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except _LOAD_ERRORS as exc:
        detail = str(exc).splitlines()[0] if str(exc) else ""
        if isinstance(exc, KeyError) or not detail:  # str(KeyError('x')) is just "'x'"
            detail = f"{type(exc).__name__}: {detail}".rstrip(": ")
        culprit = _damaged_hf_file(path) if _looks_saved(path) else None
        if culprit is not None:
            file, why = culprit
            raise DataError(f"hf:{path}: damaged datasets.save_to_disk folder: {os.path.relpath(file, path)}: {why}") from exc
        raise DataError(f"hf:{path}: not a datasets.save_to_disk folder nor Parquet ({detail})") from exc


def _looks_saved(path: Path) -> bool:
    """Whether `path` holds one of the files save_to_disk writes at its top (else it is some other folder)."""
    return any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))


def _damaged_hf_file(path: Path) -> Optional[tuple[Path, str]]:
    """The first file of a save_to_disk folder that does not read as the library expects, and why;
    None where each looks whole (run only after loading failed, so its cost never matters)."""
    folders = [path]
    listing = path / "dataset_dict.json"
    if listing.is_file():
        doc, error = _json_file(listing)
        if error:
            return listing, error
        splits = doc.get("splits") if isinstance(doc, dict) else None
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            return listing, f"expected {{\"splits\": [names]}}, got {str(doc)[:80]}"
        folders = [path / s for s in splits]
    for folder in folders:
        culprit = _damaged_hf_split(folder)
        if culprit is not None:
            return culprit
    return None


def _damaged_hf_split(folder: Path) -> Optional[tuple[Path, str]]:
    """`_damaged_hf_file` for one split's folder: state.json, dataset_info.json, the Arrow files."""
    import datasets

    state_file, info_file = folder / "state.json", folder / "dataset_info.json"
    for file in (state_file, info_file):
        if not file.is_file():
            return file, "missing"
    state, error = _json_file(state_file)
    if error:
        return state_file, error
    data_files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(data_files, list) or not all(isinstance(f, dict) and isinstance(f.get("filename"), str)
                                                   for f in data_files):
        return state_file, f"expected \"_data_files\": [{{\"filename\": ...}}], got {str(state)[:80]}"
    if not data_files:  # datasets writes none for a split without rows, then cannot load it
        return state_file, ("lists no Arrow files: the split was saved without rows, which datasets cannot load; "
                            "leave empty splits out of the DatasetDict before save_to_disk")
    info, error = _json_file(info_file)
    if error:
        return info_file, error
    try:
        datasets.DatasetInfo.from_dict(info)
    except _LOAD_ERRORS as exc:
        return info_file, f"not a dataset_info ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"
    for entry in data_files:
        arrow = folder / entry["filename"]
        try:
            with pa.memory_map(str(arrow)) as source:
                pa.ipc.open_stream(source).read_all()
        except (OSError, pa.ArrowException) as exc:
            return arrow, f"not a readable Arrow stream ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return None


def _json_file(file: Path) -> tuple[Any, Optional[str]]:
    """A JSON file's (value, None), or (None, why it has none)."""
    try:
        return json.loads(file.read_text(encoding="utf-8")), None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None, f"not valid JSON ({exc})"


def _check_dict_options(source: Source, loaded: Any) -> None:
    """?split= names the split of the rows of a source that does not say it (a single Dataset, a
    Parquet table without a split column); a DatasetDict says it for every row, so the option would
    be silently ignored: refused. The splits a run reads are chosen by data.train_split and co."""
    if "split" in source.options:
        raise DataError(f"data.source {str(source)!r}: option split={source.options['split']!r}: hf:{source.location} "
                        f"is a DatasetDict whose splits ({', '.join(loaded)}) name its rows' splits; ?split= names "
                        "the split of a single Dataset's rows: drop it (data.train_split, val_split and test_split "
                        "choose the splits a run uses)")


def _check_split_image_kinds(parts: list[tuple[str, Any]], column: str, path: Path) -> None:
    """Splits hold their pictures one way (`_check_image_kinds`): concatenated, a split's paths became
    bytes (the path's text), each refused as "cannot identify image file <_io.BytesIO ...>"."""
    kinds = {split: _holds_paths(ds.data.table.schema, column) for split, ds in parts if column in ds.column_names}
    if len(set(kinds.values())) > 1:
        paths = next(split for split, is_path in kinds.items() if is_path)
        other = next(split for split, is_path in kinds.items() if not is_path)
        other_type = dict(parts)[other].data.table.schema.field(column).type
        raise DataError(f"hf:{path}: field {column!r} holds file paths in split {paths!r} but {other_type} in split "
                        f"{other!r}: write every split's images one way")


def _check_same_columns(parts: list[tuple[str, Any]], path: Path) -> None:
    """Refuse splits with different columns: concatenated, the missing ones were filled with nulls
    and a caption column named otherwise in one split read as "holds None" at a row counted over
    all splits."""
    first, columns = parts[0][0], set(parts[0][1].column_names)
    for split, ds in parts[1:]:
        if set(ds.column_names) != columns:
            raise DataError(f"hf:{path}: split {split!r} has columns {sorted(ds.column_names)} but split {first!r} "
                            f"has {sorted(columns)}: every split needs the same columns (rename them)")


def read_synthetic(source: Source, **_: Any) -> Corpus:
    from itmatch.data.synthetic import make_shapes

    kwargs = {k: int(v) for k, v in source.options.items() if k in ("n_images", "seed", "image_size")}
    try:
        json_path = make_shapes(source.location, **kwargs)
    except ValueError as exc:  # the generator's own checks: option ranges, a file where the folder goes
        raise DataError(f"data.source {str(source)!r}: {exc}") from None
    return read_karpathy(Source("karpathy", str(json_path)))


READERS: dict[str, Callable[..., Corpus | LazyCorpus]] = {
    "precomp": read_precomp,
    "karpathy": read_karpathy,
    "parquet": read_parquet,
    "hf": read_hf,
    "synthetic": read_synthetic,
}


_TABLE_OPTIONS = {"image": str, "text": str, "id": str, "split_column": str, "split": str, "bad_images": str}
OPTIONS: dict[str, dict[str, type]] = {  # what each reader reads (bad_images: itmatch.data.store, for pixels)
    "precomp": {"caps_per_image": int},
    "karpathy": {"restval": str, "bad_images": str},
    "parquet": _TABLE_OPTIONS,
    "hf": _TABLE_OPTIONS,
    "synthetic": {"n_images": int, "seed": int, "image_size": int, "bad_images": str},
}


def read_source(text: str, *, caption_features: str | None = None) -> Corpus | LazyCorpus:
    """Parse the source string and read it; `caption_features` names precomp's caption file."""
    source = parse_source(text)
    if source.scheme not in READERS:  # region-phrase data: itmatch.data.phrase_store reads it
        raise DataError(f"data.source {text!r}: {source.scheme}: holds region-phrase data (a phrase localization "
                        "task), not image-caption pairs; prepare it with itmatch.data.raw.prepare_inputs")
    typed_options(source, OPTIONS[source.scheme])
    try:
        return READERS[source.scheme](source, caption_features=caption_features)
    except OSError as exc:  # a location the system cannot look up (a name too long, a link loop): one line
        raise DataError(f"data.source {text!r}: {exc.filename or source.location}: {files.read_problem(exc)}") from None
