"""Data sources, readers and the feature store, on tiny inputs written into tmp_path."""

from __future__ import annotations

import io
import json
import re
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from itmatch.data.readers import Corpus, column_to_numpy, read_source
from itmatch.data.sources import DataError, Source, parse_source
from itmatch.data.store import FeatureStore, prepare

REAL_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "flickr8k-1k"
SPLIT_NAMES = {"train": "train", "dev": "val", "test": "test"}


# --------------------------------------------------------------------------- helpers


def write_precomp(root: Path, sizes: dict[str, int], *, dim: int = 4, cap_dim: int = 3, per: int = 5,
                  feature_name: str | None = "foo", per_caption_rows: bool = False, seed: int = 0) -> dict:
    """VSE++ layout; returns {prefix: (image rows [n, dim], caption lines, caption features)}."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in sizes.items():
        ims = rng.normal(size=(n, dim)).astype(np.float32)
        lines = [f"{prefix} image {i} caption {j}" for i in range(n) for j in range(per)]
        feats = rng.normal(size=(n * per, cap_dim)).astype(np.float32)
        np.save(root / f"{prefix}_ims.npy", np.repeat(ims, per, axis=0) if per_caption_rows else ims)
        (root / f"{prefix}_caps.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        if feature_name:
            np.save(root / f"{prefix}_caps_{feature_name}.npy", feats)
        out[prefix] = (ims, lines, feats)
    return out


def png_bytes(color: tuple[int, int, int], size: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def pixel(data: bytes) -> tuple[int, int, int]:
    return Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))


def rows_of(table: pa.Table, split: str) -> list[dict]:
    return [r for r in table.to_pylist() if r["split"] == split]


def caption_groups(corpus: Corpus) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for row in corpus.captions.to_pylist():
        groups.setdefault(row["image_id"], []).append(row["text"])
    return groups


# --------------------------------------------------------------------------- sources


@pytest.mark.parametrize(
    "text, expected",
    [
        ("precomp:/data/f30k", Source("precomp", "/data/f30k", {})),
        ("precomp:rel/dir?caps_per_image=2", Source("precomp", "rel/dir", {"caps_per_image": "2"})),
        ("karpathy:/a/b.json", Source("karpathy", "/a/b.json", {})),
        ("karpathy:/a/b.json:/a/imgs?restval=keep", Source("karpathy", "/a/b.json:/a/imgs", {"restval": "keep"})),
        ("parquet:/x/y.parquet?image=img&text=sentence", Source("parquet", "/x/y.parquet", {"image": "img", "text": "sentence"})),
        ("hf:/x/ds", Source("hf", "/x/ds", {})),
        ("synthetic:.cache/s?n_images=12&seed=3", Source("synthetic", ".cache/s", {"n_images": "12", "seed": "3"})),
    ],
)
def test_parse_source(text, expected):
    source = parse_source(text)
    assert source == expected
    assert parse_source(str(source)) == source  # str() is a canonical, re-parsable form


@pytest.mark.parametrize(
    "text, match",
    [
        ("/data/f30k", "no scheme"),
        ("ftp:/data/f30k", "unknown scheme 'ftp'"),
        ("precomp:", "empty location"),
        ("hf:?split=train", "empty location"),
    ],
)
def test_parse_source_errors(text, match):
    with pytest.raises(DataError, match=match):
        parse_source(text)


# --------------------------------------------------------------------------- precomp


def test_precomp_tables(tmp_path):
    data = write_precomp(tmp_path / "p", {"train": 3, "dev": 2, "test": 1})
    corpus = read_source(f"precomp:{tmp_path / 'p'}", caption_features="foo")
    assert corpus.splits == ["test", "train", "val"]
    assert corpus.payload() == "feature"
    images, captions = corpus.images, corpus.captions
    assert len(set(images.column("image_id").to_pylist())) == images.num_rows == 6
    assert len(set(captions.column("caption_id").to_pylist())) == captions.num_rows == 30
    img_feats = column_to_numpy(images.column("feature"))
    cap_feats = column_to_numpy(captions.column("feature"))
    image_split = dict(zip(images.column("image_id").to_pylist(), images.column("split").to_pylist()))
    for prefix, (ims, lines, feats) in data.items():
        split = SPLIT_NAMES[prefix]
        img_rows = [i for i, s in enumerate(images.column("split").to_pylist()) if s == split]
        np.testing.assert_array_equal(img_feats[img_rows], ims)
        cap_rows = [i for i, s in enumerate(captions.column("split").to_pylist()) if s == split]
        assert [captions.column("text")[i].as_py() for i in cap_rows] == lines
        np.testing.assert_array_equal(cap_feats[cap_rows], feats)
        # caption k of the split belongs to image k // 5 of the split, in order
        split_image_ids = [images.column("image_id")[i].as_py() for i in img_rows]
        cap_image = [captions.column("image_id")[i].as_py() for i in cap_rows]
        assert cap_image == [split_image_ids[k // 5] for k in range(len(lines))]
        assert all(image_split[i] == split for i in cap_image)
    assert {p.name for p in corpus.files} >= {"train_ims.npy", "train_caps.txt", "train_caps_foo.npy"}


def test_precomp_dev_and_val_files_are_not_merged(tmp_path):
    write_precomp(tmp_path, {"train": 2, "dev": 2, "val": 2})
    with pytest.raises(DataError, match="dev_ims.npy and val_ims.npy are both split 'val'"):
        read_source(f"precomp:{tmp_path}")


@pytest.mark.parametrize("caption_features", [None, "bar"])
def test_precomp_without_caption_features(tmp_path, caption_features):
    write_precomp(tmp_path, {"train": 2})
    corpus = read_source(f"precomp:{tmp_path}", caption_features=caption_features)
    assert "feature" not in corpus.captions.column_names
    assert corpus.captions.num_rows == 10


def test_precomp_one_image_row_per_caption_is_deduplicated(tmp_path):
    data = write_precomp(tmp_path, {"train": 4, "test": 2}, per_caption_rows=True)
    assert np.load(tmp_path / "train_ims.npy").shape[0] == 20
    corpus = read_source(f"precomp:{tmp_path}", caption_features="foo")
    assert corpus.images.num_rows == 6
    train = [i for i, s in enumerate(corpus.images.column("split").to_pylist()) if s == "train"]
    np.testing.assert_array_equal(column_to_numpy(corpus.images.column("feature"))[train], data["train"][0])
    assert [len(v) for v in caption_groups(corpus).values()] == [5] * 6


def test_precomp_caps_per_image_option(tmp_path):
    write_precomp(tmp_path, {"train": 3}, per=2)
    corpus = read_source(f"precomp:{tmp_path}?caps_per_image=2")
    assert corpus.images.num_rows == 3
    assert sorted(len(v) for v in caption_groups(corpus).values()) == [2, 2, 2]
    with pytest.raises(DataError, match="6 captions"):
        read_source(f"precomp:{tmp_path}")  # 3 rows * 5 != 6


def test_precomp_one_caption_per_image_is_not_read_as_repeated_rows(tmp_path):
    """As many rows as captions is VSE++'s COCO layout only when each image's row is repeated; one
    caption per image (20 rows, 20 captions) was read as 4 images, every 5th row, and trained."""
    write_precomp(tmp_path, {"train": 20}, per=1)
    with pytest.raises(DataError, match=r"train_ims.npy: 20 rows .* rows 0..4 are not one image's row repeated "
                                        r"caps_per_image=5 times \(4 of 4 runs differ\).*caps_per_image=1"):
        read_source(f"precomp:{tmp_path}")
    assert read_source(f"precomp:{tmp_path}?caps_per_image=1").images.num_rows == 20
    write_precomp(tmp_path, {"train": 4}, per_caption_rows=True)  # the real repeated layout still reads
    assert read_source(f"precomp:{tmp_path}").images.num_rows == 4


def test_repeated_rows_are_checked_a_chunk_at_a_time_as_a_whole_file_check_would(tmp_path):
    """COCO's per-caption file is ~4.6 GB memory-mapped: compared in chunks of runs, the result, the
    first differing run and the count of differing ones are those of one comparison over the file
    (a loop over the runs here), whatever the chunk size, NaN rows included."""
    from itmatch.data.readers import _repeated_rows

    rng = np.random.default_rng(0)
    per, images = 3, rng.normal(size=(11, 4)).astype(np.float32)
    images[2] = np.nan
    rows = np.repeat(images, per, axis=0)
    path = tmp_path / "train_ims.npy"
    np.save(path, rows)
    mapped = np.load(path, mmap_mode="r")
    for chunk_bytes in (1, 48, 100, 1 << 26):  # one run per chunk, runs split unevenly, one chunk
        assert np.array_equal(_repeated_rows(mapped, path, per, chunk_bytes), images, equal_nan=True)
    rows[7 * per + 1, 0] += 1.0  # runs 7 and 9 differ
    rows[9 * per + 2, 3] = np.nan
    np.save(path, rows)
    mapped = np.load(path, mmap_mode="r")
    differ = [i for i in range(len(images)) if not all(
        np.array_equal(rows[i * per + j], rows[i * per], equal_nan=True) for j in range(per))]
    assert differ == [7, 9]
    for chunk_bytes in (1, 48, 100, 1 << 26):
        with pytest.raises(DataError, match=r"rows 21..23 are not one image's row .* \(2 of 11 runs differ\)"):
            _repeated_rows(mapped, path, per, chunk_bytes)


def test_precomp_captions_as_vsepp_reads_them(tmp_path):
    """Windows line ends and a byte-order mark are not caption text; a form feed or U+2028 inside a
    caption does not end it (str.splitlines would split there and shift every later caption)."""
    write_precomp(tmp_path, {"train": 2}, per=2)
    lines = ["one\u2028two", "a\x0cb", "c\x85d", "plain"]
    (tmp_path / "train_caps.txt").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    corpus = read_source(f"precomp:{tmp_path}?caps_per_image=2")
    assert corpus.captions.column("text").to_pylist() == lines
    assert corpus.captions.column("image_id").to_pylist() == [0, 0, 1, 1]


def test_karpathy_json_with_a_byte_order_mark(tmp_path):
    doc = karpathy_doc(tmp_path / "images")
    (tmp_path / "d.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(doc).encode())
    assert read_source(f"karpathy:{tmp_path / 'd.json'}").images.num_rows == 3


@pytest.mark.parametrize("source, match", [
    ("precomp:{tmp}?caps_per_imag=2", "unknown option 'caps_per_imag' for precomp:; choices: caps_per_image"),
    ("precomp:{tmp}?caps_per_image=2.5", "caps_per_image='2.5' is not an integer"),
    ("precomp:{tmp}?caps_per_image=-1", "caps_per_image=-1: must be at least 1"),
    ("synthetic:{tmp}/s?n_image=5", "unknown option 'n_image' for synthetic:"),
    ("parquet:{tmp}?splitcolumn=s", "unknown option 'splitcolumn' for parquet:"),
])
def test_source_options_are_checked(tmp_path, source, match):
    write_precomp(tmp_path, {"train": 3}, per=2)
    with pytest.raises(DataError, match=re.escape(match)):
        read_source(source.format(tmp=tmp_path))


def test_precomp_caption_count_mismatch(tmp_path):
    write_precomp(tmp_path, {"train": 3})
    caps = tmp_path / "train_caps.txt"
    caps.write_text("\n".join(caps.read_text().splitlines()[:-1]) + "\n")  # 14 captions for 3 images
    with pytest.raises(DataError) as info:
        read_source(f"precomp:{tmp_path}")
    message = str(info.value)
    assert str(caps) in message and "14" in message and "3 rows" in message


def test_precomp_feature_rows_mismatch(tmp_path):
    write_precomp(tmp_path, {"train": 3})
    np.save(tmp_path / "train_caps_foo.npy", np.zeros((14, 3), np.float32))
    with pytest.raises(DataError, match=r"train_caps_foo\.npy: 14 rows .* 15 captions"):
        read_source(f"precomp:{tmp_path}", caption_features="foo")


def test_precomp_caption_features_for_some_splits_only(tmp_path, monkeypatch):
    # dev has no dev_caps_foo.npy: its captions go to the text encoder, the others keep their files
    import sys
    import types

    data = write_precomp(tmp_path / "p", {"train": 2, "dev": 1, "test": 1})
    (tmp_path / "p" / "dev_caps_foo.npy").unlink()
    corpus = read_source(f"precomp:{tmp_path / 'p'}", caption_features="foo")
    assert "feature" in corpus.captions.column_names

    encoded = []

    class FakeTextEncoder:
        def encode(self, texts, progress=False):
            encoded.append(list(texts))
            return np.full((len(texts), 3), 7.0, np.float32)

    fake = types.ModuleType("itmatch.data.encoders")
    fake.build_text_encoder = lambda name: FakeTextEncoder()
    fake.TEXT_ENCODERS, fake.IMAGE_ENCODERS, fake.image_encoder_choices = {"foo": FakeTextEncoder}, {}, list
    fake.ARCH_PREFIXES = ()
    monkeypatch.setitem(sys.modules, "itmatch.data.encoders", fake)
    store = _prepare(f"precomp:{tmp_path / 'p'}", tmp_path / "cache")
    assert encoded == [data["dev"][1]]
    np.testing.assert_array_equal(store.split("train").caption_feats, data["train"][2])
    np.testing.assert_array_equal(store.split("test").caption_feats, data["test"][2])
    np.testing.assert_array_equal(store.split("val").caption_feats, np.full((5, 3), 7.0, np.float32))


def test_precomp_missing_caps(tmp_path):
    write_precomp(tmp_path, {"train": 2, "test": 1})
    (tmp_path / "test_caps.txt").unlink()
    with pytest.raises(DataError, match="missing file test_caps.txt"):
        read_source(f"precomp:{tmp_path}")


def test_precomp_1d_npy(tmp_path):
    write_precomp(tmp_path, {"train": 2})
    np.save(tmp_path / "train_ims.npy", np.zeros(10, np.float32))
    with pytest.raises(DataError, match=r"train_ims\.npy: expected a 2-D array"):
        read_source(f"precomp:{tmp_path}")


@pytest.mark.parametrize("dtype", [np.complex64, np.str_, np.dtype("datetime64[s]")])
def test_precomp_features_must_be_real_numbers(tmp_path, dtype):
    write_precomp(tmp_path, {"train": 2})
    np.save(tmp_path / "train_caps_foo.npy", np.ones((10, 3)).astype(dtype))
    with pytest.raises(DataError, match=r"train_caps_foo\.npy: expected real numbers, got dtype"):
        read_source(f"precomp:{tmp_path}", caption_features="foo")


def test_precomp_features_of_other_real_dtypes_are_read_as_float32(tmp_path):
    written = write_precomp(tmp_path, {"train": 2})
    np.save(tmp_path / "train_ims.npy", written["train"][0].astype(np.float16))
    features = read_source(f"precomp:{tmp_path}").images.column("feature").to_pylist()
    assert np.allclose(features, written["train"][0], atol=1e-2)


@pytest.mark.parametrize("name", ["train_ims.npy", "train_caps_foo.npy"])
def test_precomp_empty_npy_file_is_named(tmp_path, name):
    write_precomp(tmp_path, {"train": 2})
    (tmp_path / name).write_bytes(b"")  # np.load raised EOFError, a traceback
    with pytest.raises(DataError, match=rf"{name}: empty file \(0 bytes\)"):
        read_source(f"precomp:{tmp_path}", caption_features="foo")


@pytest.mark.parametrize("name, shape, what", [("dev_ims.npy", (2, 0), "image features of split 'val'"),
                                                ("dev_caps_foo.npy", (10, 0), "caption features of split 'val'")])
def test_precomp_zero_width_features_are_refused(tmp_path, name, shape, what):
    write_precomp(tmp_path, {"train": 2, "dev": 2})
    np.save(tmp_path / name, np.zeros(shape, np.float32))  # pyarrow refused a zero-size list column
    with pytest.raises(DataError, match=rf"{name}: shape \({shape[0]}, 0\): {what} are 0 wide"):
        read_source(f"precomp:{tmp_path}", caption_features="foo")


@pytest.mark.parametrize("dtype, value, shown, cause", [
    (np.float32, 3e38, "3e+38", "squared length overflows float32"),  # finite, but training's loss was not
    (np.float64, 1e300, "1e+300", "finite, but beyond the range of float32"),  # was "a non-finite value"
    (np.float16, np.inf, "inf", "non-finite value inf"),
])
def test_precomp_values_float32_cannot_carry_name_file_row_and_value(tmp_path, dtype, value, shown, cause):
    written = write_precomp(tmp_path, {"train": 3, "test": 2})
    ims = written["train"][0].astype(dtype)
    ims[1, 2] = ims[2, 0] = value
    np.save(tmp_path / "train_ims.npy", ims)
    with pytest.raises(DataError) as info:
        read_source(f"precomp:{tmp_path}", caption_features="foo")
    message = str(info.value)
    assert "train_ims.npy: image features of split 'train': row 1 holds " in message
    assert shown in message and cause in message and "(2 bad rows)" in message


def test_precomp_large_but_usable_values_pass_and_the_check_goes_a_chunk_at_a_time(tmp_path):
    from itmatch.data.readers import _check_values

    written = write_precomp(tmp_path, {"train": 3})
    ims = written["train"][0] * np.float32(1e18)  # squared norms ~1e36: below float32's 3.4e38
    np.save(tmp_path / "train_ims.npy", ims)
    np.testing.assert_array_equal(column_to_numpy(read_source(f"precomp:{tmp_path}").images.column("feature")), ims)
    rows = np.ones((50, 4))
    rows[[7, 31, 49], 1] = [np.nan, 1e30, -np.inf]
    for chunk_bytes in (1, 64, 1 << 26):  # one row, two rows, the whole array per chunk: one answer
        with pytest.raises(DataError, match=r"x\.npy: f: row 7 holds the non-finite value nan \(3 bad rows\)"):
            _check_values(rows, Path("x.npy"), "f", chunk_bytes)


def test_precomp_a_split_without_the_caption_features_others_have_is_named(tmp_path):
    write_precomp(tmp_path / "p", {"train": 2, "dev": 1, "test": 1}, feature_name="custom")
    (tmp_path / "p" / "dev_caps_custom.npy").unlink()  # was "unknown text encoder ... no features of that name"
    with pytest.raises(DataError) as info:
        _prepare(f"precomp:{tmp_path / 'p'}", tmp_path / "cache", text_encoder="custom")
    message = str(info.value)
    assert f"{tmp_path / 'p' / 'dev_caps_custom.npy'}: missing: split 'val'" in message
    assert "unknown text encoder" not in message


def test_precomp_a_folder_named_like_a_feature_file_is_refused(tmp_path):
    write_precomp(tmp_path, {"train": 2, "dev": 1})
    (tmp_path / "dev_caps_foo.npy").unlink()
    (tmp_path / "dev_caps_foo.npy").mkdir()  # was skipped: that split's captions were encoded live
    with pytest.raises(DataError, match=r"dev_caps_foo\.npy: not a file \(a folder\)"):
        read_source(f"precomp:{tmp_path}", caption_features="foo")


def test_precomp_width_mismatch_names_the_split_that_differs(tmp_path):
    write_precomp(tmp_path, {"train": 2, "dev": 1, "test": 1}, cap_dim=3)
    np.save(tmp_path / "dev_caps_foo.npy", np.zeros((5, 2), np.float32))  # dev sorts first: it was the reference
    with pytest.raises(DataError, match=r"dev_caps_foo\.npy: caption features are 2 wide but "
                                        r"test_caps_foo\.npy, train_caps_foo\.npy have width 3$"):
        read_source(f"precomp:{tmp_path}", caption_features="foo")


def test_precomp_not_a_directory(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        read_source(f"precomp:{tmp_path / 'absent'}")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        read_source(f"precomp:{tmp_path / 'file'}")
    with pytest.raises(DataError, match="_ims.npy"):
        read_source(f"precomp:{tmp_path}")  # a directory without any split


@pytest.mark.skipif(not (REAL_DATA / "precomp").is_dir(), reason=f"{REAL_DATA} not present")
def test_precomp_real_flickr8k():
    corpus = read_source(f"precomp:{REAL_DATA / 'precomp'}", caption_features="minilm")
    counts = {s: rows_of(corpus.images.select(["image_id", "split"]), s) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in counts.items()} == {"train": 600, "val": 100, "test": 100}
    assert corpus.captions.num_rows == 4000
    assert column_to_numpy(corpus.images.column("feature")).shape == (800, 1280)
    assert column_to_numpy(corpus.captions.column("feature")).shape == (4000, 384)
    assert sorted(set(map(len, caption_groups(corpus).values()))) == [5]
    first = (REAL_DATA / "precomp" / "test_caps.txt").read_text(encoding="utf-8").splitlines()[0]
    assert rows_of(corpus.captions.select(["split", "text"]), "test")[0]["text"] == first


# --------------------------------------------------------------------------- karpathy


def karpathy_doc(images_dir: Path) -> dict:
    images_dir.mkdir(parents=True, exist_ok=True)
    for name, color in (("a.png", (255, 0, 0)), ("b.png", (0, 255, 0)), ("c.png", (0, 0, 255))):
        (images_dir / name).write_bytes(png_bytes(color))
    return {"dataset": "tiny", "images": [
        {"filename": "a.png", "imgid": 10, "split": "train",
         "sentences": [{"raw": " A red square. ", "sentid": 100}, {"raw": "Red.", "sentid": 101}]},
        {"filename": "b.png", "imgid": 11, "split": "restval",
         "sentences": [{"tokens": ["a", "green", "square"], "sentid": 102}, {"raw": "Green.", "sentid": 103}]},
        {"filename": "c.png", "imgid": 12, "split": "val",
         "sentences": [{"raw": "Blue.", "sentid": 104}]},
    ]}


def write_json(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.replace('"split": "train"', '"split": "trian"'),
     "images[0] field 'split' = 'trian': not a split (did you mean 'train'?)"),  # its captions were dropped
    (lambda t: t.replace('"split": "train"', '"split": "train", "split": "test"'),
     "key 'split' appears twice in one object"),  # JSON kept the second: the image moved to test
    (lambda t: "[" * 100000 + "]" * 100000, "nested too deeply"),  # a RecursionError traceback
])
def test_karpathy_misspelt_split_duplicate_key_deep_nesting(tmp_path, edit, needle):
    json_path = write_json(tmp_path / "dataset.json", karpathy_doc(tmp_path / "images"))
    json_path.write_text(edit(json_path.read_text()))
    with pytest.raises(DataError) as info:
        read_source(f"karpathy:{json_path}")
    assert str(json_path) in str(info.value) and needle in str(info.value)


@pytest.mark.parametrize("filename, needle", [
    ("/etc/hostname", "leads out of the images folder"), ("../images/a.png", "leads out of the images folder"),
    ("sub", "field 'filename' = 'sub' is a folder"),  # was counted among the missing files
])
def test_karpathy_filenames_stay_inside_the_images_folder(tmp_path, filename, needle):
    doc = karpathy_doc(tmp_path / "images")
    (tmp_path / "images" / "sub").mkdir()
    doc["images"][1]["filename"] = filename
    with pytest.raises(DataError, match=re.escape(needle)):
        read_source(f"karpathy:{write_json(tmp_path / 'dataset.json', doc)}")


def test_precomp_split_without_rows_is_named(tmp_path):
    write_precomp(tmp_path, {"train": 3, "test": 2})
    np.save(tmp_path / "test_ims.npy", np.zeros((0, 4), np.float32))
    (tmp_path / "test_caps.txt").write_text("")
    with pytest.raises(DataError, match=r"test_ims.npy: no rows .* split 'test' has no images"):
        read_source(f"precomp:{tmp_path}")


def test_karpathy_own_split_names_are_kept(tmp_path):
    doc = karpathy_doc(tmp_path / "images")
    doc["images"][0]["split"], doc["images"][2]["split"] = "holdout", "train2"
    corpus = read_source(f"karpathy:{write_json(tmp_path / 'dataset.json', doc)}")
    assert corpus.images.column("split").to_pylist() == ["holdout", "train", "train2"]


def test_karpathy(tmp_path):
    doc = karpathy_doc(tmp_path / "images")
    json_path = write_json(tmp_path / "dataset.json", doc)
    corpus = read_source(f"karpathy:{json_path}")
    assert corpus.payload() == "path"
    assert corpus.images.to_pylist() == [
        {"image_id": 10, "split": "train", "path": str((tmp_path / "images" / "a.png").resolve())},
        {"image_id": 11, "split": "train", "path": str((tmp_path / "images" / "b.png").resolve())},
        {"image_id": 12, "split": "val", "path": str((tmp_path / "images" / "c.png").resolve())},
    ]
    assert corpus.captions.to_pylist() == [
        {"caption_id": 100, "image_id": 10, "split": "train", "text": "A red square."},
        {"caption_id": 101, "image_id": 10, "split": "train", "text": "Red."},
        {"caption_id": 102, "image_id": 11, "split": "train", "text": "a green square"},
        {"caption_id": 103, "image_id": 11, "split": "train", "text": "Green."},
        {"caption_id": 104, "image_id": 12, "split": "val", "text": "Blue."},
    ]
    assert corpus.files == [json_path]


def test_karpathy_image_dir_and_restval_keep(tmp_path):
    doc = karpathy_doc(tmp_path / "pics")
    (tmp_path / "meta").mkdir()
    json_path = write_json(tmp_path / "meta" / "d.json", doc)
    corpus = read_source(f"karpathy:{json_path}:{tmp_path / 'pics'}?restval=keep")
    assert corpus.images.column("split").to_pylist() == ["train", "restval", "val"]
    assert corpus.splits == ["restval", "train", "val"]
    assert all(Path(p).is_file() for p in corpus.images.column("path").to_pylist())


def test_karpathy_filepath_and_missing_sentid(tmp_path):
    (tmp_path / "images" / "sub").mkdir(parents=True)
    (tmp_path / "images" / "sub" / "x.png").write_bytes(png_bytes((1, 2, 3)))
    doc = {"images": [{"filepath": "sub", "filename": "x.png", "split": "test",
                       "sentences": [{"raw": "one"}, {"raw": "two"}]}]}
    corpus = read_source(f"karpathy:{write_json(tmp_path / 'd.json', doc)}")
    assert corpus.images.column("image_id").to_pylist() == [0]  # no imgid: its index
    assert corpus.captions.column("caption_id").to_pylist() == [0, 1]
    doc["images"][0].update(imgid=7.0, filepath=None, filename="sub/x.png")  # an integral float id; a null folder
    doc["images"][0]["sentences"][1]["sentid"] = None
    corpus = read_source(f"karpathy:{write_json(tmp_path / 'd.json', doc)}")
    assert corpus.images.column("image_id").to_pylist() == [7]
    assert corpus.captions.column("caption_id").to_pylist() == [0, 1]
    assert Path(corpus.images.column("path")[0].as_py()).name == "x.png"


def test_karpathy_missing_image_file(tmp_path):
    doc = karpathy_doc(tmp_path / "images")
    (tmp_path / "images" / "b.png").unlink()
    with pytest.raises(DataError) as info:
        read_source(f"karpathy:{write_json(tmp_path / 'd.json', doc)}")
    assert "b.png" in str(info.value) and "a.png" not in str(info.value)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d["images"][1].pop("sentences"), r"images\[1\]: missing field 'sentences'"),
        (lambda d: d["images"][2].pop("filename"), r"images\[2\]: missing field 'filename'"),
        (lambda d: d["images"][0]["sentences"].__setitem__(1, {"raw": "  ", "sentid": 101}),
         r"images\[0\]\.sentences\[1\]: no caption text"),
        (lambda d: d["images"][2].__setitem__("sentences", []), r"images\[2\]\.sentences"),
        (lambda d: d["images"][2].__setitem__("imgid", 10), r"images\[2\]\.imgid = 10 is also images\[0\]'s"),
        (lambda d: d["images"][2]["sentences"][0].__setitem__("sentid", 100),
         r"images\[2\]\.sentences\[0\]\.sentid = 100 is also images\[0\]\.sentences\[0\]'s"),
        # ids given for some entries only: a numbered one could collide with a given one
        (lambda d: d["images"][1].pop("imgid"), r"images\[1\] has no 'imgid' while images\[0\] has one"),
        (lambda d: d["images"][2]["sentences"][0].pop("sentid"),
         r"images\[2\]\.sentences\[0\] has no 'sentid' while images\[0\]\.sentences\[0\] has one"),
        (lambda d: d.__setitem__("images", []), r"field 'images'"),
        # fields of the wrong JSON type: each names its field and value (not a TypeError from deep inside)
        (lambda d: d["images"][0]["sentences"][1].__setitem__("sentid", "abc"),
         r"images\[0\]\.sentences\[1\]\.sentid = 'abc': expected an integer"),
        (lambda d: d["images"][1].__setitem__("imgid", 1.5), r"images\[1\]\.imgid = 1\.5: expected an integer"),
        (lambda d: d["images"][1].__setitem__("imgid", "11"), r"images\[1\]\.imgid = '11'"),
        (lambda d: d["images"][1].__setitem__("imgid", True), r"images\[1\]\.imgid = True"),
        (lambda d: d["images"][1]["sentences"].__setitem__(0, {"tokens": [1, 2]}),
         r"images\[1\]\.sentences\[0\]: no caption text \(raw = \[1, 2\]\)"),
        (lambda d: d["images"][0].__setitem__("filename", None), r"images\[0\]\.filename = None"),
        (lambda d: d["images"][0].__setitem__("filename", 7), r"images\[0\]\.filename = 7"),
        (lambda d: d["images"][0].__setitem__("filepath", 3), r"images\[0\]\.filepath = 3: expected a string"),
        (lambda d: d["images"][2].__setitem__("split", None), r"images\[2\]\.split = None"),
        (lambda d: d["images"][2].__setitem__("split", 3), r"images\[2\]\.split = 3"),
        # numbers Python's json writes (NaN, Infinity) or int64 cannot hold: tracebacks from int() or Arrow before
        (lambda d: d["images"][1].__setitem__("imgid", float("nan")), r"images\[1\]\.imgid = nan: expected an integer"),
        (lambda d: d["images"][1].__setitem__("imgid", float("inf")), r"images\[1\]\.imgid = inf"),
        (lambda d: d["images"][0]["sentences"][0].__setitem__("sentid", 2**63),
         r"images\[0\]\.sentences\[0\]\.sentid = 9223372036854775808"),
        (lambda d: d["images"][0]["sentences"][0].__setitem__("raw", "a \ud800 dog"),
         r"images\[0\]\.sentences\[0\]: caption .* is not valid Unicode"),
    ],
)
def test_karpathy_errors(tmp_path, mutate, match):
    doc = karpathy_doc(tmp_path / "images")
    mutate(doc)
    json_path = write_json(tmp_path / "d.json", doc)
    with pytest.raises(DataError, match=match) as info:
        read_source(f"karpathy:{json_path}")
    assert str(json_path) in str(info.value)


def test_karpathy_invalid_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(DataError, match="not valid JSON") as info:
        read_source(f"karpathy:{bad}")
    assert str(bad) in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        read_source(f"karpathy:{tmp_path / 'absent.json'}")


# --------------------------------------------------------------------------- parquet


def read_table_source(text: str):
    """A table source read as prepare() reads it on a cache miss: its splits and files first, its
    rows (where row errors surface) once the tables are used."""
    corpus = read_source(text)
    corpus.images, corpus.captions
    return corpus

COLORS = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (200, 200, 10)]


def test_parquet_one_row_per_image(tmp_path):
    table = pa.table({
        "image": pa.array([png_bytes(c) for c in COLORS[:3]], pa.binary()),
        "captions": [["r1", "r2"], ["g1"], ["b1", "b2", "b3"]],
        "split": ["train", "dev", "test"],
    })
    pq.write_table(table, tmp_path / "t.parquet")
    corpus = read_table_source(f"parquet:{tmp_path / 't.parquet'}")
    assert corpus.payload() == "image"
    assert corpus.images.column("split").to_pylist() == ["train", "val", "test"]
    assert [pixel(b) for b in corpus.images.column("image").to_pylist()] == COLORS[:3]
    ids = corpus.images.column("image_id").to_pylist()
    assert caption_groups(corpus) == {ids[0]: ["r1", "r2"], ids[1]: ["g1"], ids[2]: ["b1", "b2", "b3"]}
    assert [r["split"] for r in corpus.captions.to_pylist()] == ["train", "train", "val", "test", "test", "test"]
    assert len(set(corpus.captions.column("caption_id").to_pylist())) == 6


def test_parquet_one_row_per_caption_with_id_and_column_options(tmp_path):
    pics = [png_bytes(c) for c in COLORS]
    table = pa.table({
        "pic": pa.array([pics[0], pics[1], pics[0], pics[2], pics[1], pics[0]], pa.binary()),
        "sentence": ["a0", "b0", "a1", "c0", "b1", "a2"],
        "img_id": [7, 8, 7, 9, 8, 7],
    })
    pq.write_table(table, tmp_path / "t.parquet")
    corpus = read_table_source(f"parquet:{tmp_path / 't.parquet'}?image=pic&text=sentence&id=img_id&split=test")
    assert corpus.images.num_rows == 3
    assert corpus.splits == ["test"]
    colour_of = dict(zip(corpus.images.column("image_id").to_pylist(), map(pixel, corpus.images.column("image").to_pylist())))
    by_colour = {colour_of[k]: v for k, v in caption_groups(corpus).items()}
    assert by_colour == {COLORS[0]: ["a0", "a1", "a2"], COLORS[1]: ["b0", "b1"], COLORS[2]: ["c0"]}


def test_parquet_one_row_per_caption_groups_by_bytes_without_id(tmp_path):
    pics = [png_bytes(c) for c in COLORS]
    table = pa.table({"image": pa.array([pics[1], pics[0], pics[1]], pa.binary()), "caption": ["x", "y", "z"]})
    pq.write_table(table, tmp_path / "t.parquet")
    corpus = read_table_source(f"parquet:{tmp_path / 't.parquet'}")
    assert corpus.images.num_rows == 2
    assert sorted(caption_groups(corpus).values()) == [["x", "z"], ["y"]]
    assert corpus.splits == ["train"]


def test_parquet_folder_splits_from_file_names(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    shards = {"train-0000.parquet": [0, 1], "train-0001.parquet": [2], "validation-0000.parquet": [3], "test_0000.parquet": [0]}
    for name, idx in shards.items():
        pq.write_table(pa.table({
            "image": pa.array([png_bytes(COLORS[i]) for i in idx], pa.binary()),
            "text": [f"{name} {i}" for i in idx],
        }), folder / name)
    corpus = read_table_source(f"parquet:{folder}")
    assert sorted(corpus.images.column("split").to_pylist()) == ["test", "train", "train", "train", "val"]
    assert {p.name for p in corpus.files} == set(shards)
    # the same picture in train and test is two images, each with its own split's caption
    for row in corpus.images.to_pylist():
        texts = caption_groups(corpus)[row["image_id"]]
        assert len(texts) == 1
        prefix = {"train": "train-", "val": "validation-", "test": "test_"}[row["split"]]
        assert texts[0].startswith(prefix)
    cap_split = {r["image_id"]: r["split"] for r in corpus.images.to_pylist()}
    assert all(cap_split[r["image_id"]] == r["split"] for r in corpus.captions.to_pylist())


def test_parquet_folder_split_names_with_years_and_a_stray_file(tmp_path):
    """COCO-style val2014.parquet was read as train (its whole name was not a split); a file named
    otherwise beside named ones would join the default split unseen. Shards that no name assigns
    stay one split (the ?split= default)."""
    folder = tmp_path / "coco"
    folder.mkdir()
    for name, colour in (("train2014.parquet", 0), ("val2014.parquet", 1), ("test2014.parquet", 2)):
        pq.write_table(pa.table({"image": pa.array([png_bytes(COLORS[colour])], pa.binary()), "text": [name]}),
                       folder / name)
    corpus = read_table_source(f"parquet:{folder}")
    assert dict(zip(corpus.captions.column("text").to_pylist(), corpus.captions.column("split").to_pylist())) == \
        {"train2014.parquet": "train", "val2014.parquet": "val", "test2014.parquet": "test"}
    pq.write_table(pa.table({"image": pa.array([png_bytes(COLORS[3])], pa.binary()), "text": ["x"]}), folder / "extra.parquet")
    with pytest.raises(DataError, match="extra.parquet has no split column and its name does not start with a split"):
        read_table_source(f"parquet:{folder}")
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"image": pa.array([png_bytes(COLORS[i])], pa.binary()), "text": [f"s{i}"]}),
                       shards / f"part-{i}.parquet")
    assert read_table_source(f"parquet:{shards}?split=test").splits == ["test"]


def test_parquet_an_id_naming_two_pictures_or_an_image_without_captions_is_refused(tmp_path):
    """Both were accepted silently: the second picture was dropped (its captions given to the first),
    and an image with no caption has nothing to retrieve."""
    table = pa.table({"image": pa.array([png_bytes(COLORS[0]), png_bytes(COLORS[1])], pa.binary()),
                      "caption": ["a", "b"], "idx": [4, 4]})
    pq.write_table(table, tmp_path / "ids.parquet")
    with pytest.raises(DataError, match=r"row 1: field 'idx' = 4 names another picture than row 0"):
        read_table_source(f"parquet:{tmp_path / 'ids.parquet'}?id=idx")
    table = pa.table({"image": pa.array([png_bytes(COLORS[0]), png_bytes(COLORS[1])], pa.binary()),
                      "captions": pa.array([["a"], []], pa.list_(pa.string()))})
    pq.write_table(table, tmp_path / "empty.parquet")
    with pytest.raises(DataError, match=r"row 1: field 'captions' is an empty list"):
        read_table_source(f"parquet:{tmp_path / 'empty.parquet'}")


def test_parquet_a_list_id_or_a_misspelt_split_is_refused(tmp_path):
    """A list id was a TypeError traceback (unhashable); a row in split 'trian' was silently left out."""
    images = pa.array([png_bytes(COLORS[0]), png_bytes(COLORS[1])], pa.binary())
    pq.write_table(pa.table({"image": images, "caption": ["a", "b"], "idx": [[5], [6]]}), tmp_path / "ids.parquet")
    with pytest.raises(DataError, match=r"row 0: field 'idx' = \[5\]: not an id"):
        read_table_source(f"parquet:{tmp_path / 'ids.parquet'}?id=idx")
    pq.write_table(pa.table({"image": images, "caption": ["a", "b"], "split": ["train", "trian"]}),
                   tmp_path / "typo.parquet")
    with pytest.raises(DataError, match=r"row 1: field 'split' = 'trian': not a split \(did you mean 'train'\?\)"):
        read_table_source(f"parquet:{tmp_path / 'typo.parquet'}")


@pytest.mark.parametrize("values, shown", [([1, 2], "row 0: field 'split' = 1 (type int64)"),
                                           (["train", None], "row 1: field 'split' = None (type string)"),
                                           (["train", "  "], "row 1: field 'split' = '  ' (type string)")])
def test_parquet_a_split_column_without_names_is_named(tmp_path, values, shown):
    """A numeric split column (an export's 0/1/2) was reported as the run's split "not found;
    available: []"; a null or blank value among names was refused only once the rows were read."""
    images = pa.array([png_bytes(COLORS[0]), png_bytes(COLORS[1])], pa.binary())
    pq.write_table(pa.table({"image": images, "caption": ["a", "b"], "split": values}), tmp_path / "s.parquet")
    with pytest.raises(DataError, match=re.escape(f"s.parquet: {shown}: expected split names")):
        read_source(f"parquet:{tmp_path / 's.parquet'}")


def test_parquet_files_holding_pictures_two_ways_are_refused(tmp_path):
    """One file of paths and one of bytes were merged into bytes: every path's text then failed to
    decode as a picture, with a message naming a BytesIO object."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0.png").write_bytes(png_bytes(COLORS[0]))
    pq.write_table(pa.table({"image": ["images/0.png"], "caption": ["a"]}), tmp_path / "train-0.parquet")
    pq.write_table(pa.table({"image": pa.array([png_bytes(COLORS[1])], pa.binary()), "caption": ["b"]}),
                   tmp_path / "train-1.parquet")
    with pytest.raises(DataError, match=r"field 'image' holds file paths in train-0.parquet but binary in "
                                        r"train-1.parquet"):
        read_source(f"parquet:{tmp_path}")


def test_a_struct_image_without_bytes_or_path_is_shown_as_it_is(tmp_path):
    pq.write_table(pa.table({"image": [{"bytes": None, "path": None}], "caption": ["x"]}), tmp_path / "s.parquet")
    with pytest.raises(DataError, match=re.escape("row 0: image column value \"{'bytes': None, 'path': None}\"")):
        read_table_source(f"parquet:{tmp_path / 's.parquet'}")


def test_parquet_ids_restarting_per_split_stay_apart(tmp_path):
    table = pa.table({
        "image": pa.array([png_bytes(COLORS[i]) for i in (0, 0, 1, 1)], pa.binary()),
        "caption": ["t0", "t1", "v0", "v1"],
        "idx": [0, 0, 0, 0],
        "split": ["train", "train", "validation", "validation"],
    })
    pq.write_table(table, tmp_path / "t.parquet")
    corpus = read_table_source(f"parquet:{tmp_path / 't.parquet'}?id=idx")
    assert corpus.images.num_rows == 2
    split_of = {r["image_id"]: r["split"] for r in corpus.images.to_pylist()}
    groups = caption_groups(corpus)
    assert sorted((split_of[k], v) for k, v in groups.items()) == [("train", ["t0", "t1"]), ("val", ["v0", "v1"])]


@pytest.mark.parametrize("query, role, column", [("", "text", "caption"), ("?image=img", "image", "img"),
                                                ("?text=sentence", "text", "sentence"), ("?id=nope", "id", "nope")])
def test_parquet_missing_column(tmp_path, query, role, column):
    columns = {"image": pa.array([png_bytes(COLORS[0])], pa.binary()), "label": ["x"]}
    if query:  # only the first case lacks a caption column
        columns["caption"] = ["a caption"]
    pq.write_table(pa.table(columns), tmp_path / "t.parquet")
    with pytest.raises(DataError) as info:
        read_table_source(f"parquet:{tmp_path / 't.parquet'}{query}")
    message = str(info.value)
    assert f"no {role} column {column!r}" in message
    assert str(list(columns)) in message  # the available columns, listed


def test_parquet_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_table_source(f"parquet:{tmp_path / 'absent.parquet'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .parquet files"):
        read_table_source(f"parquet:{tmp_path / 'empty'}")
    pq.write_table(pa.table({"image": pa.array([png_bytes(COLORS[0])], pa.binary()), "caption": [" "]}), tmp_path / "e.parquet")
    with pytest.raises(DataError, match="row 0.*empty caption"):
        read_table_source(f"parquet:{tmp_path / 'e.parquet'}")
    pq.write_table(pa.table({"image": [12], "caption": ["x"]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match="row 0.*not image bytes"):
        read_table_source(f"parquet:{tmp_path / 'n.parquet'}")


def test_parquet_image_paths_relative_to_the_table_absolute_or_as_structs(tmp_path, monkeypatch):
    """An export that writes `images/x.png` beside its table is read from any working directory
    (under `ray job submit` it is not the table's folder); absolute paths and datasets.Image's
    {bytes: null, path} structs are read too; a path found nowhere names the folders it tried."""
    export = tmp_path / "export"
    (export / "images").mkdir(parents=True)
    for i, color in enumerate(COLORS[:3]):
        (export / "images" / f"{i}.png").write_bytes(png_bytes(color))
    table = pa.table({"image": ["images/0.png", str(export / "images" / "1.png"), "images/2.png"],
                      "caption": ["r", "g", "b"]})
    pq.write_table(table, export / "t.parquet")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for source in (f"parquet:{export / 't.parquet'}", f"parquet:{export}"):
        corpus = read_source(source)
        assert [pixel(b) for b in corpus.images.column("image").to_pylist()] == COLORS[:3]
    structs = pa.table({"image": [{"bytes": None, "path": "images/1.png"}], "caption": ["g"]})
    pq.write_table(structs, export / "s.parquet")
    assert [pixel(b) for b in read_table_source(f"parquet:{export / 's.parquet'}").images.column("image").to_pylist()] \
        == [COLORS[1]]
    pq.write_table(pa.table({"image": ["images/9.png"], "caption": ["x"]}), export / "m.parquet")
    with pytest.raises(DataError, match=re.escape(f"'images/9.png' is not image bytes or a file (relative paths "
                                                  f"are looked up under {export}")):
        read_table_source(f"parquet:{export / 'm.parquet'}")


# --------------------------------------------------------------------------- hf


def _hf_dataset(colors, captions):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "image_key": datasets.Value("int64")})
    rows = {"image": [Image.new("RGB", (5, 5), COLORS[c]) for c in colors], "caption": captions,
            "image_key": list(colors)}
    return datasets.Dataset.from_dict(rows, features=features)


def _silence_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def test_hf_dataset_dict_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    _silence_datasets()
    dd = datasets.DatasetDict({
        "train": _hf_dataset([0, 0, 1], ["red a", "red b", "green a"]),
        "validation": _hf_dataset([2, 2], ["blue a", "blue b"]),
        "test": _hf_dataset([3], ["yellow a"]),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    corpus = read_source(f"hf:{tmp_path / 'dd'}?id=image_key")
    assert corpus.splits == ["test", "train", "val"]
    assert corpus.images.num_rows == 4
    colour = {r["image_id"]: pixel(r["image"]) for r in corpus.images.to_pylist()}
    split = {r["image_id"]: r["split"] for r in corpus.images.to_pylist()}
    got = sorted((split[k], colour[k], v) for k, v in caption_groups(corpus).items())
    assert got == sorted([("train", COLORS[0], ["red a", "red b"]), ("train", COLORS[1], ["green a"]),
                          ("val", COLORS[2], ["blue a", "blue b"]), ("test", COLORS[3], ["yellow a"])])
    assert any(p.suffix == ".arrow" for p in corpus.files)


def test_hf_single_dataset_and_parquet_export(tmp_path):
    pytest.importorskip("datasets")
    _silence_datasets()
    ds = _hf_dataset([1, 0, 1], ["g1", "r1", "g2"])
    ds.save_to_disk(str(tmp_path / "ds"))
    corpus = read_source(f"hf:{tmp_path / 'ds'}?split=test")  # no split in a bare Dataset: the option names it
    assert corpus.splits == ["test"]
    by_colour = {pixel(r["image"]): caption_groups(corpus)[r["image_id"]] for r in corpus.images.to_pylist()}
    assert by_colour == {COLORS[1]: ["g1", "g2"], COLORS[0]: ["r1"]}

    ds.to_parquet(str(tmp_path / "export.parquet"))
    exported = read_source(f"hf:{tmp_path / 'export.parquet'}")
    assert exported.splits == ["train"]
    assert {pixel(r["image"]): caption_groups(exported)[r["image_id"]] for r in exported.images.to_pylist()} == by_colour


def test_hf_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        read_source(f"hf:{tmp_path / 'absent'}")


def _hf_dict(root: Path, **splits) -> Path:
    """The `_hf_dataset`s given, saved at root as a DatasetDict."""
    datasets = pytest.importorskip("datasets")
    _silence_datasets()
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return root


def _hf_three_splits(root: Path) -> Path:
    return _hf_dict(root, train=_hf_dataset([0, 1], ["r", "g"]), validation=_hf_dataset([2], ["b"]),
                    test=_hf_dataset([3], ["y"]))


def _overwrite(name: str, text: str) -> Callable[[Path], str]:
    """A damage: the file `name` of a saved folder replaced by `text`; returns `name`."""
    return lambda root: ((root / name).write_text(text), name)[1]


def _truncate_arrow(root: Path) -> str:
    arrow = next((root / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    return f"train/{arrow.name}"


@pytest.mark.parametrize("damage, why", [
    (_overwrite("train/state.json", '{"_data_files": 7, "_fingerprint": "x"}'), '"_data_files"'),  # was TypeError
    (_overwrite("train/state.json", "{}"), '"_data_files"'),  # was KeyError
    (_overwrite("train/state.json", '{"_data_files": [\n'), "not valid JSON"),
    (_overwrite("dataset_dict.json", '{"splits": 5}'), '"splits"'),  # was TypeError
    (_overwrite("train/dataset_info.json", '{"features": {"image": {"_type": "Nope"}}}'), "Nope"),
    (_truncate_arrow, "not a readable Arrow stream"),
])
def test_hf_a_damaged_save_to_disk_folder_names_the_file(tmp_path, damage, why):
    """Valid JSON of the wrong shape was a TypeError/KeyError traceback; other damage named only the folder."""
    root = _hf_three_splits(tmp_path / "dd")
    file = damage(root)
    with pytest.raises(DataError) as info:
        read_source(f"hf:{root}")
    message = str(info.value)
    assert message.startswith(f"hf:{root}: damaged datasets.save_to_disk folder: {file}: ") and why in message
    assert "\n" not in message


def test_hf_split_option_on_a_dataset_dict_is_refused(tmp_path):
    """?split= names the split of a bare Dataset's rows; on a DatasetDict it was silently ignored."""
    root = _hf_three_splits(tmp_path / "dd")
    with pytest.raises(DataError, match=r"option split='test': .*DatasetDict whose splits \(train, validation, "
                                        r"test\).*drop it"):
        read_source(f"hf:{root}?split=test")
    assert read_source(f"hf:{root}").splits == ["test", "train", "val"]


def test_hf_splits_with_different_columns_are_named(tmp_path):
    """A caption column named `text` in one split was read as nulls: "row 40: field 'caption' holds None"."""
    validation = _hf_dataset([2], ["b"]).rename_column("caption", "text")
    root = _hf_dict(tmp_path / "dd", train=_hf_dataset([0, 1], ["r", "g"]), validation=validation)
    with pytest.raises(DataError) as info:
        read_source(f"hf:{root}")
    assert str(info.value) == (f"hf:{root}: split 'validation' has columns ['image', 'image_key', 'text'] but split "
                               "'train' has ['caption', 'image', 'image_key']: every split needs the same columns "
                               "(rename them)")


def test_a_caption_dict_without_raw_is_shown_as_it_is(tmp_path):
    """[{"text": ...}] was reported as "holds None": the value the dict's missing "raw" gave."""
    pq.write_table(pa.table({"image": pa.array([png_bytes(COLORS[0])], pa.binary()),
                             "sentences": [[{"text": "a red square", "sentid": 0}]]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"row 0: field 'sentences' holds \{'text': 'a red square', 'sentid': 0\}: "
                                        r"a dict without a \"raw\" caption string"):
        read_table_source(f"parquet:{tmp_path / 'd.parquet'}")
    pq.write_table(pa.table({"image": pa.array([png_bytes(COLORS[0])], pa.binary()),
                             "sentences": [[{"raw": "a red square", "sentid": 0}]]}), tmp_path / "ok.parquet")
    assert read_table_source(f"parquet:{tmp_path / 'ok.parquet'}").captions.column("text").to_pylist() == ["a red square"]


# --------------------------------------------------------------------------- store.prepare


def _prepare(source: str, cache: Path, **kw) -> FeatureStore:
    kw.setdefault("image_encoder", "unused")
    kw.setdefault("text_encoder", "foo")
    return prepare(source, cache_dir=cache, progress=False, **kw)


def test_prepare_precomp(tmp_path):
    data = write_precomp(tmp_path / "p", {"train": 4, "dev": 2, "test": 3}, dim=6, cap_dim=5)
    store = _prepare(f"precomp:{tmp_path / 'p'}", tmp_path / "cache")
    assert sorted(store.manifest["splits"]) == ["test", "train", "val"]
    assert store.dims == (6, 5)
    assert store.manifest["image_encoder"] == "precomputed"
    assert store.manifest["counts"]["train"] == {"images": 4, "captions": 20}
    for prefix, (ims, lines, feats) in data.items():
        split = store.split(SPLIT_NAMES[prefix])
        np.testing.assert_array_equal(split.image_feats, ims)
        np.testing.assert_array_equal(split.caption_feats, feats)
        assert split.texts == lines
        assert len(split) == len(lines)
        assert split.image_feats.dtype == np.float32 and split.caption_feats.dtype == np.float32
        np.testing.assert_array_equal(split.caption_image, np.repeat(np.arange(len(ims)), 5))
        np.testing.assert_array_equal(split.caption_gid, split.image_ids[np.repeat(np.arange(len(ims)), 5)])
        assert len(set(split.caption_ids.tolist())) == len(lines)
    # workers open the same folder
    reopened = FeatureStore.open(store.root)
    np.testing.assert_array_equal(reopened.split("train").caption_feats, data["train"][2])
    assert reopened.identity == store.identity


def test_prepare_caption_image_follows_image_ids(tmp_path, monkeypatch):
    # captions out of image order, ids not 0..n: caption_image must point at each caption's own image row
    from itmatch.data import store as store_module
    from itmatch.data.readers import features_column

    rng = np.random.default_rng(1)
    image_ids = np.array([40, 7, 19, 3], np.int64)
    image_feats = rng.normal(size=(4, 3)).astype(np.float32)
    owner = np.array([2, 0, 3, 2, 1, 0, 0, 3], np.int64)  # caption -> row of its image
    cap_feats = rng.normal(size=(8, 2)).astype(np.float32)
    corpus = Corpus(
        pa.table({"image_id": image_ids, "split": ["train"] * 4, "feature": features_column(image_feats)}),
        pa.table({"caption_id": np.arange(100, 108), "image_id": image_ids[owner], "split": ["train"] * 8,
                  "text": [f"c{i}" for i in range(8)], "feature": features_column(cap_feats)}),
        "precomp:x", [],
    )
    monkeypatch.setattr(store_module, "read_source", lambda *a, **k: corpus)
    split = _prepare("precomp:x", tmp_path / "cache").split("train")
    np.testing.assert_array_equal(split.image_ids, image_ids)
    np.testing.assert_array_equal(split.caption_image, owner)
    np.testing.assert_array_equal(split.caption_gid, image_ids[owner])
    np.testing.assert_array_equal(split.image_feats[split.caption_image], image_feats[owner])
    np.testing.assert_array_equal(split.caption_feats, cap_feats)
    assert split.caption_ids.tolist() == list(range(100, 108))


def test_prepare_is_cached(tmp_path):
    write_precomp(tmp_path / "p", {"train": 3, "test": 2})
    first = _prepare(f"precomp:{tmp_path / 'p'}", tmp_path / "cache")
    manifest = (first.root / "manifest.json").read_text()
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.root.glob("*.parquet")}
    assert set(mtimes) == {"train_images.parquet", "train_captions.parquet", "test_images.parquet", "test_captions.parquet"}
    second = _prepare(f"precomp:{tmp_path / 'p'}", tmp_path / "cache")
    assert second.root == first.root
    assert (second.root / "manifest.json").read_text() == manifest
    assert {p.name: p.stat().st_mtime_ns for p in second.root.glob("*.parquet")} == mtimes
    # a subset of the cached splits is a hit too
    assert _prepare(f"precomp:{tmp_path / 'p'}", tmp_path / "cache", splits=["test"]).root == first.root
    assert {p.name: p.stat().st_mtime_ns for p in first.root.glob("*.parquet")} == mtimes


def test_a_cached_parquet_source_is_not_read_again_and_its_image_files_key_the_cache(tmp_path, monkeypatch):
    """A cache hit read the whole table into Python objects first (a 310 MB table took 2.5 GB): now
    only its split column; and the image files a path column names key the cache (a repaired
    image was served its old features)."""
    from itmatch.data import readers

    (tmp_path / "images").mkdir()
    for i, colour in enumerate(COLORS):
        (tmp_path / "images" / f"{i}.png").write_bytes(png_bytes(colour))
    pq.write_table(pa.table({"image": [f"images/{i}.png" for i in range(4)], "caption": [f"c{i}" for i in range(4)],
                             "split": ["train", "train", "test", "test"]}), tmp_path / "t.parquet")
    source = f"parquet:{tmp_path / 't.parquet'}"
    first = _prepare(source, tmp_path / "cache", image_encoder="pixels", text_encoder="hashing")
    real = readers.corpus_from_table
    monkeypatch.setattr(readers, "corpus_from_table", lambda *a, **k: pytest.fail("rows read on a cache hit"))
    again = _prepare(source, tmp_path / "cache", image_encoder="pixels", text_encoder="hashing")
    assert again.root == first.root and sorted(again.manifest["splits"]) == ["test", "train"]
    monkeypatch.setattr(readers, "corpus_from_table", real)
    (tmp_path / "images" / "2.png").write_bytes(png_bytes((0, 0, 0)))  # repaired in place
    repaired = _prepare(source, tmp_path / "cache", image_encoder="pixels", text_encoder="hashing")
    assert repaired.root != first.root
    assert repaired.manifest["digests"]["test"] != first.manifest["digests"]["test"]
    assert repaired.manifest["digests"]["train"] == first.manifest["digests"]["train"]


def test_prepare_another_split_keeps_the_first(tmp_path):
    # the trainer prepares train, an evaluator later prepares test: train must stay readable, untouched
    data = write_precomp(tmp_path / "p", {"train": 3, "test": 2})
    first = _prepare(f"precomp:{tmp_path / 'p'}", tmp_path / "cache", splits=["train"])
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.root.glob("train_*.parquet")}
    second = _prepare(f"precomp:{tmp_path / 'p'}", tmp_path / "cache", splits=["test"])
    assert second.root == first.root
    assert sorted(second.manifest["splits"]) == ["test", "train"]
    assert set(second.manifest["counts"]) == set(second.manifest["digests"]) == {"train", "test"}
    assert second.manifest["digests"]["train"] == first.manifest["digests"]["train"]
    assert {p.name: p.stat().st_mtime_ns for p in first.root.glob("train_*.parquet")} == mtimes
    reopened = FeatureStore.open(first.root)
    np.testing.assert_array_equal(reopened.split("train").image_feats, data["train"][0])
    np.testing.assert_array_equal(reopened.split("test").image_feats, data["test"][0])


def test_prepare_notices_changed_caption_features(tmp_path):
    write_precomp(tmp_path / "p", {"train": 2})
    first = _prepare(f"precomp:{tmp_path / 'p'}", tmp_path / "cache")
    new = np.full((10, 3), 0.5, np.float32)
    np.save(tmp_path / "p" / "train_caps_foo.npy", new)
    stat = (tmp_path / "p" / "train_caps_foo.npy").stat()
    os.utime(tmp_path / "p" / "train_caps_foo.npy", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = _prepare(f"precomp:{tmp_path / 'p'}", tmp_path / "cache")
    np.testing.assert_array_equal(second.split("train").caption_feats, new)
    assert second.manifest["digests"] != first.manifest["digests"]


def test_prepare_missing_split(tmp_path):
    write_precomp(tmp_path / "p", {"train": 2, "dev": 1})
    with pytest.raises(DataError) as info:
        _prepare(f"precomp:{tmp_path / 'p'}", tmp_path / "cache", splits=["train", "test"])
    assert "'test'" in str(info.value) and "'train'" in str(info.value) and "'val'" in str(info.value)
    store = _prepare(f"precomp:{tmp_path / 'p'}", tmp_path / "cache", splits=["train"])
    with pytest.raises(DataError, match=r"split 'val' not found; available: \['train'\]"):
        store.split("val")


@pytest.mark.parametrize("which", ["ims", "caps"])
def test_prepare_nan_names_split_and_row(tmp_path, which):
    write_precomp(tmp_path / "p", {"train": 3, "dev": 3})
    path = tmp_path / "p" / ("dev_ims.npy" if which == "ims" else "dev_caps_foo.npy")
    array = np.load(path)
    array[2, 1] = np.nan
    array[-1, 0] = np.inf  # a later bad row: the first one is named
    np.save(path, array)
    with pytest.raises(DataError) as info:
        _prepare(f"precomp:{tmp_path / 'p'}", tmp_path / "cache")
    message = str(info.value)
    assert message.startswith(f"{path}: ")  # the file, not only the split, is named
    assert "split 'val'" in message and "row 2 holds the non-finite value" in message
    assert ("image" if which == "ims" else "caption") in message


def test_prepare_karpathy_pixels_hashing(tmp_path):
    pytest.importorskip("itmatch.data.encoders", reason="itmatch/data/encoders.py not written yet")
    doc = karpathy_doc(tmp_path / "images")
    json_path = write_json(tmp_path / "d.json", doc)
    store = _prepare(f"karpathy:{json_path}", tmp_path / "cache", image_encoder="pixels", text_encoder="hashing")
    assert sorted(store.manifest["splits"]) == ["train", "val"]
    assert store.manifest["image_encoder"] == "pixels" and store.manifest["text_encoder"] == "hashing"
    train, val = store.split("train"), store.split("val")
    assert train.image_ids.tolist() == [10, 11] and val.image_ids.tolist() == [12]
    assert train.texts == ["A red square.", "Red.", "a green square", "Green."]
    assert train.caption_image.tolist() == [0, 0, 1, 1]
    d_img, d_txt = store.dims
    assert train.image_feats.shape == (2, d_img) and val.image_feats.shape == (1, d_img)
    assert train.caption_feats.shape == (4, d_txt)
    assert np.isfinite(train.image_feats).all() and np.isfinite(train.caption_feats).all()
    assert not np.allclose(train.image_feats[0], train.image_feats[1])  # red and green differ
    assert not np.allclose(train.caption_feats[0], train.caption_feats[1])
    again = _prepare(f"karpathy:{json_path}", tmp_path / "cache", image_encoder="pixels", text_encoder="hashing")
    assert again.root == store.root


# --------------------------------------------------------------------------- unions of splits


def test_a_union_of_splits_is_its_parts_one_after_another(tmp_path):
    """`train+val` (search.refit's training data): the images, captions and features of train and
    then val, each caption still pointing at its own image, checked against the files read back with
    numpy; the sampler's caption groups agree; a missing part is named."""
    data = write_precomp(tmp_path / "p", {"train": 3, "dev": 2, "test": 1})
    store = _prepare(f"precomp:{tmp_path / 'p'}", tmp_path / "cache")
    union = store.split("train+val")
    np.testing.assert_array_equal(union.image_feats, np.concatenate([data["train"][0], data["dev"][0]]))
    np.testing.assert_array_equal(union.caption_feats, np.concatenate([data["train"][2], data["dev"][2]]))
    assert union.texts == data["train"][1] + data["dev"][1]
    # caption k belongs to image k // 5 of the concatenation: the same features, the same text prefix
    np.testing.assert_array_equal(union.caption_image, np.arange(25) // 5)
    train, val = store.split("train"), store.split("val")
    assert list(union.image_ids) == list(train.image_ids) + list(val.image_ids)
    groups, shards = store.caption_groups("train+val")
    assert list(groups) == list(union.caption_gid) and list(shards) == list(groups)
    with pytest.raises(DataError, match="split 'dev' not found"):
        store.split("train+dev")


def test_a_union_whose_parts_share_an_image_is_refused_naming_it(tmp_path):
    write_precomp(tmp_path / "p", {"train": 3, "dev": 2, "test": 1})
    store = _prepare(f"precomp:{tmp_path / 'p'}", tmp_path / "cache")
    # readers keep image ids apart across splits; a store written otherwise (a copy of train as
    # another split) must not let a union count one image as two groups
    for kind in ("images", "captions"):
        (store.root / f"copy_{kind}.parquet").write_bytes((store.root / f"train_{kind}.parquet").read_bytes())
    store.manifest["splits"] = [*store.manifest["splits"], "copy"]
    with pytest.raises(DataError, match=r"split 'train\+copy'.*image_id \d+ is in more than one"):
        store.split("train+copy")
    assert len(store.split("train+train").image_ids) == 3  # a part named twice is one part


@pytest.mark.parametrize("written, meant", [("Train", "train"), (" test ", "test"), ("TEST", "test"),
                                             ("training", "train"), ("Dev", "val"), ("restval", "train")])
def test_a_split_is_read_whatever_its_case_or_padding(written, meant):
    """Else "Train" became a split nothing reads and its images silently dropped out of training."""
    from itmatch.data.readers import _split

    assert _split(written) == meant


def test_an_image_file_replaced_in_place_is_a_cache_miss(tmp_path):
    """The cache was keyed by the JSON alone: a repaired or re-downloaded image kept its old features."""
    from itmatch.data.store import cache_key

    json_path = write_json(tmp_path / "d.json", karpathy_doc(tmp_path / "images"))
    key = cache_key(read_source(f"karpathy:{json_path}"), "enc", "txt")
    assert cache_key(read_source(f"karpathy:{json_path}"), "enc", "txt") == key  # nothing changed: a hit
    (tmp_path / "images" / "b.png").write_bytes(png_bytes((9, 9, 9)) + b"\0")
    assert cache_key(read_source(f"karpathy:{json_path}"), "enc", "txt") != key


def test_an_npz_archive_under_an_npy_name_is_named(tmp_path):
    write_precomp(tmp_path / "p", {"train": 2})
    np.savez(tmp_path / "p" / "x.npz", a=np.zeros((2, 3), np.float32))
    (tmp_path / "p" / "x.npz").replace(tmp_path / "p" / "train_ims.npy")
    with pytest.raises(DataError, match=r"train_ims\.npy: is an \.npz archive"):
        read_source(f"precomp:{tmp_path / 'p'}")
