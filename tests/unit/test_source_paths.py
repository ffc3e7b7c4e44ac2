"""Table sources whose image column holds file paths (`parquet:`, `hf:`), and `data.source` strings
whose paths hold the characters the syntax splits at (`:`, `?`) or others (`#`, spaces). Missing
pictures are dropped under `?bad_images=skip` as Karpathy's are (README, "Bad input") and refused
by default naming the file, field and value; values that name no image file at all are refused in
one line; paths are read as users write them. Inputs are a few tiny pictures in tmp_path; nothing
here starts Ray."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from refusals import refused

from itmatch.data.raw import prepare_raw
from itmatch.data.readers import read_source
from itmatch.data.sources import parse_source
from itmatch.data.store import prepare

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def png(colour: tuple[int, int, int]) -> bytes:
    """A small picture: a colour with a ramp across it (no two pictures encode alike)."""
    ramp = np.linspace(0, 40, 8 * 6).reshape(6, 8, 1).astype(int)
    pixels = np.clip(np.array(colour)[None, None, :] + ramp, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i}.png" for i in range(len(COLOURS))]
    for path, colour in zip(paths, COLOURS):
        path.write_bytes(png(colour))
    return paths


def raw_rows(store, split: str) -> list[tuple[bytes, list[str]]]:
    """(image bytes, its captions) of a raw store's split, in image order."""
    rows = store.split(split)
    captions: dict[int, list[str]] = {}
    for row, text in zip(rows.caption_image.tolist(), rows.texts):
        captions.setdefault(row, []).append(text)
    return [(rows.image_bytes[r].as_py(), captions[r]) for r in range(len(rows.image_ids))]


def _silence_datasets():
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


# The rows both table sources hold: (image path relative to the source's folder, caption, split);
# 8.png and 9.png are not there.
ROWS = [("images/0.png", "red", "train"), ("images/9.png", "gone a", "train"), ("images/1.png", "green", "train"),
        ("images/8.png", "gone b", "train"), ("images/0.png", "red again", "train"), ("images/2.png", "blue", "test")]


def parquet_source(root: Path) -> str:
    write_images(root / "images")
    pq.write_table(pa.table({"image": [r[0] for r in ROWS], "caption": [r[1] for r in ROWS],
                             "split": [r[2] for r in ROWS]}), root / "t.parquet")
    return f"parquet:{root / 't.parquet'}"


def hf_source(root: Path) -> str:
    datasets = _silence_datasets()
    parts = {split: datasets.Dataset.from_dict({"image": [r[0] for r in ROWS if r[2] == split],
                                                "caption": [r[1] for r in ROWS if r[2] == split]})
             for split in ("train", "test")}
    datasets.DatasetDict(parts).save_to_disk(str(root))
    write_images(root / "images")
    return f"hf:{root}"


# --------------------------------------------------------------------------- missing files


@pytest.mark.parametrize("make", [parquet_source, hf_source], ids=["parquet", "hf"])
@pytest.mark.parametrize("raw", [False, True], ids=["features", "raw"])
def test_missing_path_files_are_dropped_under_skip_as_karpathys_are(tmp_path, make, raw, caplog):
    """A path naming a missing file was refused even under ?bad_images=skip (Karpathy's are dropped)."""
    source = make(tmp_path / "data")
    store_of = (lambda s: prepare_raw(s, cache_dir=tmp_path / "cache")) if raw else \
        (lambda s: prepare(s, cache_dir=tmp_path / "cache", image_encoder="pixels", text_encoder="hashing",
                           progress=False))
    message = refused(lambda: store_of(source), "row 1: field 'image' = 'images/9.png'", "no such file",
                      "2 of the 6 image files named are missing", "'images/8.png'", "?bad_images=skip")
    assert message.startswith(str(tmp_path / "data" / "t.parquet") if make is parquet_source
                              else f"hf:{tmp_path / 'data'}: split 'train'")
    with caplog.at_level(logging.WARNING, logger="itmatch.data"):
        store = store_of(f"{source}?bad_images=skip")
    assert any("images/9.png" in r.getMessage() and "bad_images=skip drops them" in r.getMessage()
               for r in caplog.records)
    assert store.manifest["skipped_images"] == {"train": 2, "test": 0}  # two files, not one "missing image"
    assert store.manifest["counts"] == {"train": {"images": 2, "captions": 3}, "test": {"images": 1, "captions": 1}}
    images = tmp_path / "data" / "images"
    picture = {name: (images / name).read_bytes() for name in ("0.png", "1.png", "2.png")}
    want = {"train": [(picture["0.png"], ["red", "red again"]), (picture["1.png"], ["green"])],
            "test": [(picture["2.png"], ["blue"])]}
    if raw:
        assert {split: raw_rows(store, split) for split in want} == want
    else:
        for split, rows in want.items():
            assert sorted(store.split(split).texts) == sorted(t for _, texts in rows for t in texts)


def test_an_unreadable_path_file_is_named_or_dropped_under_skip(tmp_path, monkeypatch):
    """A file that exists but cannot be read raised PermissionError from inside the store (a traceback)."""
    source = parquet_source(tmp_path / "data")
    blocked = tmp_path / "data" / "images" / "1.png"
    real = Path.read_bytes

    def read_bytes(self):
        if self == blocked:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    for name in ("9.png", "8.png"):
        shutil.copy(tmp_path / "data" / "images" / "3.png", tmp_path / "data" / "images" / name)
    refused(lambda: prepare_raw(source, cache_dir=tmp_path / "cache"), "row 2: field 'image' = 'images/1.png'",
            f"cannot read {blocked}", "?bad_images=skip")
    store = prepare_raw(f"{source}?bad_images=skip", cache_dir=tmp_path / "cache")
    assert store.manifest["skipped_images"] == {"train": 1, "test": 0}
    assert [texts for _, texts in raw_rows(store, "train")] == [["red", "red again"], ["gone a", "gone b"]]


@pytest.mark.parametrize("value, shown", [
    (None, "= null: no image"),  # was shown as 'None', a file of that name
    ("", "= '': no image"),
    ("{images}", "is a folder"),
    ("http://example.com/0.png", "is a URL"),
    ("file://server/share/0.png", "a file: URI of host 'server'"),
])
def test_values_naming_no_image_file_are_refused_even_under_skip(tmp_path, value, shown):
    """Not a picture gone but a table naming none: refused as Karpathy's null filenames are, under skip too."""
    images = tmp_path / "images"
    write_images(images)
    value = value.format(images=images) if value else value
    pq.write_table(pa.table({"image": pa.array([str(images / "0.png"), value], pa.string()), "caption": ["a", "b"]}),
                   tmp_path / "t.parquet")
    for query in ("", "?bad_images=skip"):
        refused(lambda: prepare_raw(f"parquet:{tmp_path / 't.parquet'}{query}", cache_dir=tmp_path / "cache"),
                f"{tmp_path / 't.parquet'}: row 1: field 'image'", shown)


def test_file_uris_and_paths_out_of_the_folder_are_read(tmp_path):
    """file:///... (escapes decoded) was refused as "not image bytes or a file"; `..` is a path like any."""
    paths = write_images(tmp_path / "my images")
    (tmp_path / "table").mkdir()
    pq.write_table(pa.table({"image": [paths[0].as_uri(), "../my images/1.png", f"file://localhost{paths[2]}"],
                             "caption": ["a", "b", "c"]}), tmp_path / "table" / "t.parquet")
    assert paths[0].as_uri().count("%20") == 1
    store = prepare_raw(f"parquet:{tmp_path / 'table'}", cache_dir=tmp_path / "cache")
    assert raw_rows(store, "train") == [(p.read_bytes(), [t]) for p, t in zip(paths, "abc")]


def test_hf_splits_holding_paths_and_bytes_are_refused(tmp_path):
    """Concatenated, the paths became bytes: "cannot identify image file <_io.BytesIO object at 0x...>"."""
    datasets = _silence_datasets()
    paths = write_images(tmp_path / "images")
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": [str(p) for p in paths[:2]], "caption": ["a", "b"]}),
        "test": datasets.Dataset.from_dict({"image": [paths[2].read_bytes()], "caption": ["c"]}),
    }).save_to_disk(str(tmp_path / "dd"))
    refused(lambda: read_source(f"hf:{tmp_path / 'dd'}"), f"hf:{tmp_path / 'dd'}: field 'image' holds file paths "
            "in split 'train' but binary in split 'test'")


def test_a_dictionary_encoded_path_column_keys_the_cache(tmp_path):
    """A pandas category column of paths was not taken for paths: its files did not key the cache and a
    picture repaired in place was served its old features."""
    paths = write_images(tmp_path / "images")
    column = pa.array([str(p) for p in paths]).dictionary_encode()
    pq.write_table(pa.table({"image": column, "caption": list("abcd")}), tmp_path / "t.parquet")
    assert pa.types.is_dictionary(pq.read_schema(tmp_path / "t.parquet").field("image").type)
    first = prepare_raw(f"parquet:{tmp_path / 't.parquet'}", cache_dir=tmp_path / "cache")
    paths[1].write_bytes(png((0, 0, 0)))
    os.utime(paths[1], ns=(1, 1))  # another time as well as another size
    again = prepare_raw(f"parquet:{tmp_path / 't.parquet'}", cache_dir=tmp_path / "cache")
    assert again.root != first.root
    assert raw_rows(again, "train")[1] == (paths[1].read_bytes(), ["b"])


# --------------------------------------------------------------------------- source strings


def karpathy_set(folder: Path) -> Path:
    """A Karpathy JSON at folder/dataset.json over folder/images, two images."""
    write_images(folder / "images")
    doc = {"images": [{"filename": f"{i}.png", "split": split, "sentences": [{"raw": f"picture {i}"}]}
                      for i, split in ((0, "train"), (1, "restval"))]}
    (folder / "dataset.json").write_text(json.dumps(doc))
    return folder / "dataset.json"


@pytest.mark.parametrize("folder", ["run:1", "a?b", "c#d", "e f", "all :?# %3F"])
def test_paths_holding_special_characters_are_read_as_written(tmp_path, folder):
    """`karpathy:/data/run:1/dataset.json` read a JSON `/data/run`, `parquet:/data/a?b/` an option `b/`."""
    root = tmp_path / folder
    json_path = karpathy_set(root)
    images = root / "images"
    pq.write_table(pa.table({"image": ["images/0.png", "images/1.png"], "caption": ["x", "y"]}), root / "t.parquet")
    for source in (f"karpathy:{json_path}", f"karpathy:{json_path}:{images}",
                   f"karpathy:{json_path}:{images}?restval=keep"):
        corpus = read_source(source)
        assert corpus.images.column("path").to_pylist() == [str(images / "0.png"), str(images / "1.png")]
        assert corpus.splits == (["restval", "train"] if "keep" in source else ["train"])
    for source in (f"parquet:{root}", f"parquet:{root / 't.parquet'}", f"parquet:{root}?split=test"):
        store = prepare_raw(source, cache_dir=tmp_path / "cache")
        split = "test" if "split=" in source else "train"
        assert raw_rows(store, split) == [((images / f"{i}.png").read_bytes(), [t]) for i, t in enumerate("xy")]
    assert parse_source(f"parquet:{root}?split=test").options == {"split": "test"}


def test_escapes_name_paths_that_do_not_exist_yet_and_literal_ones_win(tmp_path):
    """%3F, %3A and %25 write '?', ':' and '%' in any path (a synthetic folder is made on first use); a
    path that exists as written (`a%3Fb`, downloaded under that name) is read as it is."""
    source = parse_source(f"synthetic:{tmp_path}/new%3Fset%3A1%25?n_images=12")
    assert source.location == f"{tmp_path}/new?set:1%" and source.options == {"n_images": "12"}
    corpus = read_source(f"synthetic:{tmp_path}/new%3Fset%3A1%25?n_images=12")  # its JSON's folder holds ':'
    assert corpus.images.num_rows == 12 and (tmp_path / "new?set:1%").is_dir()
    assert read_source(f"karpathy:{tmp_path}/new%3Fset%3A1%25/dataset_shapes.json").images.num_rows == 12
    literal = tmp_path / "a%3Fb"
    karpathy_set(literal)
    assert parse_source(f"karpathy:{literal}/dataset.json").location == f"{literal}/dataset.json"
    assert read_source(f"karpathy:{literal}/dataset.json?restval=keep").splits == ["restval", "train"]


def test_a_relative_parquet_path_with_a_colon_is_a_file_not_a_uri(tmp_path, monkeypatch):
    """pyarrow read `run:1/t.parquet` as a URI of scheme "run": "Unrecognized filesystem type"."""
    (tmp_path / "run:1").mkdir()
    paths = write_images(tmp_path / "run:1" / "images")
    pq.write_table(pa.table({"image": ["images/0.png"], "caption": ["x"]}), tmp_path / "run:1" / "t.parquet")
    monkeypatch.chdir(tmp_path)
    for source in ("parquet:run:1/t.parquet", "parquet:run:1"):
        assert raw_rows(prepare_raw(source, cache_dir=tmp_path / "cache"), "train") == [(paths[0].read_bytes(), ["x"])]


def test_a_path_split_at_a_question_mark_is_named_with_its_escape(tmp_path):
    """`parquet:/d/a?b/` without such a folder was "unknown option 'b/'" on a source 'parquet:/d/a?b/='."""
    refused(lambda: read_source(f"parquet:{tmp_path}/a?b/"), f"no file or folder '{tmp_path}/a?b/'",
            f"read as '{tmp_path}/a'", "%3F")
    message = refused(lambda: read_source(f"parquet:{tmp_path}/a?b"), "unknown option 'b'", "%3F")
    assert "?b=" not in message


def test_a_missing_json_in_a_location_with_colons_names_the_whole(tmp_path):
    """`karpathy:/d/run:2/dataset.json` was "karpathy:/d/run: file does not exist", the rest unsaid."""
    location = f"{tmp_path}/run:2/dataset.json"
    refused(lambda: read_source(f"karpathy:{location}"), f"karpathy:{tmp_path}/run: file does not exist",
            repr(location), "%3A")


def test_train_cli_names_a_missing_path_file_in_one_line(tmp_path, capsys):
    from trainers import train

    source = parquet_source(tmp_path / "data")
    config = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"
    code = train.main(["--config", str(config), f"data.source={source}", "scaling.num_workers=1",
                       "train.epochs=1", "tracking.enabled=false", f"run.storage_path={tmp_path / 'runs'}",
                       f"data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert "field 'image' = 'images/9.png'" in err[0] and str(tmp_path / "data" / "t.parquet") in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("splits, shared", [(["train", "test", "val"], 1), (["train", "train", "test"], 0)])
def test_a_picture_in_two_splits_of_a_table_is_said(tmp_path, splits, shared, caplog):
    """The same bytes under two splits became two images, one trained on and one tested on, silently."""
    picture, other = png((10, 20, 30)), png((200, 100, 0))
    table = pa.table({"image": [picture, picture, other], "text": ["a", "b", "c"], "split": splits})
    pq.write_table(table, tmp_path / "t.parquet")
    with caplog.at_level(logging.WARNING, logger="itmatch.data"):
        images = read_source(f"parquet:{tmp_path / 't.parquet'}").images  # a lazy corpus reads its rows here
    assert images.num_rows == 3 - (shared == 0 and splits[0] == splits[1])
    said = f"{shared} picture(s) are images of two splits (the same bytes), e.g. row 0 (train) and row 1 (test)"
    assert (said in caplog.text) is bool(shared)
