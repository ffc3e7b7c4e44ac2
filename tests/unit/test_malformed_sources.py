"""Malformed or unusual data sources that slipped past the readers: each is refused with one line
naming the file, field and value (or read as meant), never a traceback, a silent misreading, or a
user's files overwritten. Inputs are tiny and written into tmp_path; nothing here starts Ray."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from refusals import refused
from test_readers import karpathy_doc, png_bytes, read_table_source, write_json, write_precomp

from itmatch.data.raw import prepare_raw
from itmatch.data.readers import read_source
from itmatch.data.store import prepare


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- synthetic


def test_synthetic_refuses_a_folder_of_other_files_and_leaves_it_as_it_was(tmp_path):
    folder = tmp_path / "mine"
    (folder / "images").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    (folder / "images" / "holiday.jpg").write_bytes(b"not generated")
    before = tree(folder)
    refused(lambda: read_source(f"synthetic:{folder}?n_images=4"),
            f"synthetic:{folder}?n_images=4", str(folder), "notes.txt", "images/holiday.jpg", "new or empty folder")
    assert tree(folder) == before  # no dataset_shapes.json, no shapes_*.png among the user's files


def test_synthetic_never_deletes_a_dataset_shapes_json_it_did_not_write(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "dataset_shapes.json").write_text('{"images": "my own"}')
    refused(lambda: read_source(f"synthetic:{folder}?n_images=4"), str(folder), "dataset_shapes.json")
    assert (folder / "dataset_shapes.json").read_text() == '{"images": "my own"}'


def test_synthetic_takes_its_own_earlier_output_interrupted_or_whole(tmp_path):
    folder = tmp_path / "shapes"
    read_source(f"synthetic:{folder}?n_images=4")  # whole: rewritten with other parameters
    assert len(read_source(f"synthetic:{folder}?n_images=5").images) == 5
    (folder / "dataset_shapes.json").unlink()  # as a kill before the JSON leaves it, temporaries too
    (folder / "images" / ".shapes_000001.png.0123456789abcdef").write_bytes(b"partial")
    assert len(read_source(f"synthetic:{folder}?n_images=4").images) == 4


def test_synthetic_disk_full_is_one_line_and_leaves_no_half_written_folder(tmp_path, monkeypatch):
    import itmatch.data.synthetic as synthetic

    real, calls = synthetic.atomic_write_bytes, []

    def full_after_two(path, data):
        calls.append(path)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(synthetic, "atomic_write_bytes", full_after_two)
    folder = tmp_path / "new" / "shapes"
    refused(lambda: read_source(f"synthetic:{folder}?n_images=6"), str(folder), os.strerror(errno.ENOSPC))
    assert not (tmp_path / "new").exists()  # the folders this call made are gone again


def test_synthetic_location_the_system_cannot_create_is_one_line(tmp_path):
    folder = tmp_path / ("y" * 300)  # longer than a file name may be
    refused(lambda: read_source(f"synthetic:{folder}?n_images=4"), "cannot write the synthetic data there",
            os.strerror(errno.ENAMETOOLONG))


def test_shapes_phrases_os_error_is_one_line(tmp_path, monkeypatch):
    import itmatch.phrases.synthetic as phrases_synthetic
    from itmatch.data.phrase_store import read_phrase_source

    def no_space(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(phrases_synthetic, "write_proposals", no_space)
    folder = tmp_path / "sp"
    refused(lambda: read_phrase_source(f"shapes-phrases:{folder}?n_images=4"), str(folder), "proposals.parquet",
            os.strerror(errno.ENOSPC))


# --------------------------------------------------------------------------- karpathy


def karpathy(tmp_path: Path, edit) -> Path:
    doc = karpathy_doc(tmp_path / "images")
    edit(doc)
    return write_json(tmp_path / "d.json", doc)


@pytest.mark.parametrize("filename, needle", [
    ("a\x00.png", "not a usable file name (embedded null byte)"),  # a ValueError traceback from resolve()
    ("x" * 300 + ".png", os.strerror(errno.ENAMETOOLONG)),  # an OSError traceback from is_dir()
])
def test_karpathy_a_filename_no_file_can_have_is_named(tmp_path, filename, needle):
    json_path = karpathy(tmp_path, lambda d: d["images"][1].update(filename=filename))
    refused(lambda: read_source(f"karpathy:{json_path}"), str(json_path), "images[1] field 'filename'", needle)


def test_karpathy_an_image_that_is_a_link_loop_or_a_fifo_is_named_as_such(tmp_path):
    images = tmp_path / "images"
    json_path = karpathy(tmp_path, lambda d: None)
    (images / "b.png").unlink()
    (images / "b.png").symlink_to(images / "b.png")
    refused(lambda: read_source(f"karpathy:{json_path}"), "images[1] field 'filename' = 'b.png'",
            os.strerror(errno.ELOOP))
    (images / "b.png").unlink()
    os.mkfifo(images / "b.png")  # reported missing before; opened, it would block
    refused(lambda: read_source(f"karpathy:{json_path}"), "images[1] field 'filename' = 'b.png' is a special file")


@pytest.mark.parametrize("value, shown", [("a red square", '"a red square" (a JSON string)'),
                                          (None, "null (a JSON null)")])
def test_karpathy_a_sentence_that_is_not_an_object_is_shown(tmp_path, value, shown):
    json_path = karpathy(tmp_path, lambda d: d["images"][0]["sentences"].__setitem__(1, value))
    message = refused(lambda: read_source(f"karpathy:{json_path}"), str(json_path), "images[0].sentences[1]", shown)
    assert "raw = None" not in message


def test_karpathy_a_top_level_list_is_named_as_one(tmp_path):
    json_path = write_json(tmp_path / "d.json", karpathy_doc(tmp_path / "images")["images"])
    refused(lambda: read_source(f"karpathy:{json_path}"), str(json_path), "top level is a JSON list")


def test_karpathy_a_missing_image_folder_is_named_not_each_image(tmp_path):
    json_path = write_json(tmp_path / "d.json", karpathy_doc(tmp_path / "elsewhere"))
    refused(lambda: read_source(f"karpathy:{json_path}"), str(json_path),
            f"image folder {tmp_path / 'images'} (the default", "does not exist")
    refused(lambda: read_source(f"karpathy:{json_path}:{json_path}"), f"image folder {json_path}", "is not a folder")


def test_karpathy_a_sentid_of_minus_one_is_an_id_not_a_missing_one(tmp_path):
    json_path = karpathy(tmp_path, lambda d: d["images"][2]["sentences"][0].update(sentid=-1))
    captions = read_source(f"karpathy:{json_path}").captions  # refused before: "has no 'sentid'"
    assert -1 in captions.column("caption_id").to_pylist()


@pytest.mark.parametrize("blank", ["\u200b\u200b", "\x00", " \u2060 "])
def test_karpathy_a_caption_of_invisible_characters_is_empty(tmp_path, blank):
    json_path = karpathy(tmp_path, lambda d: d["images"][0]["sentences"][1].update(raw=blank))
    refused(lambda: read_source(f"karpathy:{json_path}"), str(json_path), "images[0].sentences[1]", "no caption text")


# --------------------------------------------------------------------------- precomp


@pytest.mark.parametrize("edit, line, last", [
    (lambda texts: [texts[0], "\u200b", *texts[2:]], 2, False),  # zero-width: str.strip keeps it
    (lambda texts: [*texts, ""], 11, True),  # "...\n\n" at the file's end
])
def test_precomp_an_invisible_or_trailing_blank_caption_line_is_named(tmp_path, edit, line, last):
    write_precomp(tmp_path, {"train": 2})
    caps = tmp_path / "train_caps.txt"
    caps.write_text("\n".join(edit(caps.read_text().splitlines())) + "\n")
    message = refused(lambda: read_source(f"precomp:{tmp_path}", caption_features="foo"), str(caps),
                      f"line {line} is an empty caption")
    assert ("blank line at its end" in message) == last


def test_precomp_a_file_without_a_split_name_is_refused(tmp_path):
    write_precomp(tmp_path, {"train": 2, "test": 1})
    for suffix in ("ims.npy", "caps.txt", "caps_foo.npy"):
        os.rename(tmp_path / f"test_{suffix}", tmp_path / f"_{suffix}")  # read as split '' before
    refused(lambda: read_source(f"precomp:{tmp_path}", caption_features="foo"), str(tmp_path / "_ims.npy"),
            "no split name")


def test_precomp_a_link_loop_is_named_not_reported_missing(tmp_path):
    write_precomp(tmp_path, {"train": 2})
    (tmp_path / "train_caps.txt").unlink()
    (tmp_path / "train_caps.txt").symlink_to(tmp_path / "train_caps.txt")
    message = refused(lambda: read_source(f"precomp:{tmp_path}"), str(tmp_path / "train_caps.txt"),
                      os.strerror(errno.ELOOP))
    assert "missing" not in message


# --------------------------------------------------------------------------- parquet / hf


def _images(n: int) -> list[bytes]:
    return [png_bytes((40 * i, 0, 0)) for i in range(n)]


@pytest.mark.parametrize("raw", [False, True])
def test_a_split_without_rows_is_refused(tmp_path, raw):
    pq.write_table(pa.table({"image": pa.array([], pa.binary()), "caption": pa.array([], pa.string())}),
                   tmp_path / "t.parquet")  # its split is the default, train; the raw store kept it empty
    source = f"parquet:{tmp_path / 't.parquet'}"
    if raw:
        refused(lambda: prepare_raw(source, cache_dir=tmp_path / "cache"), source, "split 'train' has no images")
    else:
        refused(lambda: prepare(source, cache_dir=tmp_path / "cache", image_encoder="pixels", text_encoder="hashing",
                                progress=False), source, "split 'train' has no images")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.parquet"))


def test_skipping_every_image_is_refused(tmp_path):
    pq.write_table(pa.table({"image": [b"not an image", b""], "caption": ["a", "b"]}), tmp_path / "t.parquet")
    source = f"parquet:{tmp_path / 't.parquet'}?bad_images=skip"
    refused(lambda: prepare_raw(source, cache_dir=tmp_path / "cache"), source, "split 'train'",
            "none of its 2 images can be decoded")


def test_parquet_a_nan_id_is_refused(tmp_path):
    image = _images(1)[0]  # one picture, four captions: NaN ids made four images of one caption each
    pq.write_table(pa.table({"image": [image] * 4, "caption": list("abcd"), "key": [float("nan")] * 4}),
                   tmp_path / "t.parquet")
    refused(lambda: read_table_source(f"parquet:{tmp_path / 't.parquet'}?id=key"), "row 0", "field 'key' = nan")


def test_parquet_splits_named_by_folders_as_the_hub_exports_them(tmp_path):
    sizes = {"train": 3, "validation": 1, "test": 2}
    for split, n in sizes.items():
        (tmp_path / "default" / split).mkdir(parents=True)
        pq.write_table(pa.table({"image": _images(n), "caption": [f"{split} {i}" for i in range(n)]}),
                       tmp_path / "default" / split / "0000.parquet")
    corpus = read_table_source(f"parquet:{tmp_path}")  # every row was "train" before
    assert corpus.splits == ["test", "train", "val"]
    assert corpus.images.column("split").to_pylist().count("test") == 2


def test_hf_a_split_saved_without_rows_names_its_state_file(tmp_path):
    import datasets

    datasets.disable_progress_bars()
    features = datasets.Features({"image": datasets.Value("binary"), "caption": datasets.Value("string")})
    full = datasets.Dataset.from_dict({"image": _images(2), "caption": ["a", "b"]}, features=features)
    empty = datasets.Dataset.from_dict({"image": [], "caption": []}, features=features)
    datasets.DatasetDict({"train": full, "test": empty}).save_to_disk(str(tmp_path / "ds"))
    refused(lambda: read_source(f"hf:{tmp_path / 'ds'}"), "test/state.json", "saved without rows")  # an IndexError


# --------------------------------------------------------------------------- the command


def test_train_cli_refuses_a_synthetic_folder_of_other_files_in_one_line(tmp_path, capsys):
    from trainers import train

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"mine")
    config = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"
    code = train.main(["--config", str(config), f"data.source=synthetic:{folder}?n_images=40",
                       "scaling.num_workers=1", "train.epochs=1", f"run.storage_path={tmp_path / 'runs'}",
                       f"data.cache_dir={tmp_path / 'cache'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'ml.db'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "cat.jpg" in err[-1] and str(folder) in err[-1]
    assert sorted(p.name for p in folder.iterdir()) == ["cat.jpg"] and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- the data cache


def _karpathy_source(tmp_path: Path) -> str:
    return f"karpathy:{write_json(tmp_path / 'd.json', karpathy_doc(tmp_path / 'images'))}"


@pytest.mark.parametrize("raw", [False, True])
def test_a_cache_dir_that_is_a_file_is_one_line(tmp_path, raw):
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache folder goes")  # a NotADirectoryError traceback before
    source = _karpathy_source(tmp_path)
    if raw:
        refused(lambda: prepare_raw(source, cache_dir=cache), str(cache), "cannot write the data cache",
                os.strerror(errno.ENOTDIR), "data.cache_dir")
    else:
        refused(lambda: prepare(source, cache_dir=cache, image_encoder="pixels", text_encoder="hashing",
                                progress=False), str(cache), os.strerror(errno.ENOTDIR), "data.cache_dir")


def test_a_full_disk_while_caching_is_one_line_and_lists_no_split(tmp_path, monkeypatch):
    import pyarrow.parquet as parquet

    def no_space(table, where, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))

    monkeypatch.setattr(parquet, "write_table", no_space)
    refused(lambda: prepare_raw(_karpathy_source(tmp_path), cache_dir=tmp_path / "cache"), "_images.parquet",
            os.strerror(errno.ENOSPC), "data.cache_dir")
    assert not list((tmp_path / "cache").rglob("manifest.json")) and not list((tmp_path / "cache").rglob(".*"))


# --------------------------------------------------------------------------- locations


@pytest.mark.parametrize("scheme", ["precomp", "karpathy", "parquet", "hf"])
def test_a_location_the_system_cannot_look_up_is_one_line(tmp_path, scheme):
    location = tmp_path / ("z" * 300)  # an OSError traceback from is_dir()/is_file() before
    refused(lambda: read_source(f"{scheme}:{location}"), str(location), os.strerror(errno.ENAMETOOLONG))


@pytest.mark.parametrize("target", ["self", "gone.parquet"])
def test_parquet_a_broken_link_in_the_folder_is_named(tmp_path, target):
    pq.write_table(pa.table({"image": _images(2), "caption": ["a", "b"]}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").symlink_to(tmp_path / ("b.parquet" if target == "self" else target))
    refused(lambda: read_source(f"parquet:{tmp_path}"), str(tmp_path / "b.parquet"), "cannot read")


def test_karpathy_a_folder_given_as_the_json_is_named_as_one(tmp_path):
    refused(lambda: read_source(f"karpathy:{tmp_path}"), str(tmp_path), "is a folder, not the dataset's JSON file")


@pytest.mark.parametrize("on_disk", ["cafe\u0301.png", "CAFÉ.png"])
def test_karpathy_a_missing_image_whose_name_only_looks_the_same_is_pointed_out(tmp_path, on_disk):
    # "café.png" in the JSON (NFC), the file written decomposed (NFD, as macOS does) or in capitals
    json_path = karpathy(tmp_path, lambda d: d["images"][0].update(filename="caf\u00e9.png"))
    (tmp_path / "images" / "a.png").rename(tmp_path / "images" / on_disk)
    refused(lambda: read_source(f"karpathy:{json_path}"), "are missing", repr(str(tmp_path / "images" / on_disk)),
            "Unicode normalization")


def test_evaluate_pictures_into_a_file_is_refused_before_evaluating(tmp_path, capsys):
    from trainers import evaluate

    target = tmp_path / "pics"
    target.write_text("a file")  # a FileExistsError traceback once every metric had been computed
    code = evaluate.main(["--model", str(tmp_path / "no-model"), "--data", _karpathy_source(tmp_path),
                          "--pictures", str(target)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == f"error: --pictures {target}: is a file; give a folder (the pictures are written into it)"
    assert target.read_text() == "a file"
