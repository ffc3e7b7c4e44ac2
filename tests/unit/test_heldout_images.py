"""Held-out images and Karpathy-style raw image data as users feed them: pictures missing, cut short,
linked to nothing or listed twice under another name. Each is dropped as `?bad_images=skip` promises
(README, "Bad input": missing, unreadable or truncated images, counted in the store's manifest) or
refused in one line naming the file, the field and the value. Inputs are a few tiny pictures in
tmp_path; nothing here starts Ray."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from refusals import refused

from itmatch.data.raw import open_store, prepare_raw
from itmatch.data.readers import read_source
from itmatch.data.store import prepare

COLOURS = {"a.png": (200, 30, 30), "b.png": (30, 200, 30), "c.jpg": (30, 30, 200), "d.png": (200, 200, 30)}


def encoded(colour: tuple[int, int, int], fmt: str) -> bytes:
    """A small picture: a colour with a ramp across it (so that no two pictures encode alike)."""
    ramp = np.linspace(0, 40, 8 * 6).reshape(6, 8, 1).astype(np.uint8)
    pixels = np.clip(np.array(colour, np.uint8)[None, None, :].astype(int) + ramp, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def write_images(folder: Path, names=COLOURS) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(encoded(COLOURS[name], "JPEG" if name.endswith(".jpg") else "PNG"))


def karpathy_json(path: Path, names: list[str], splits: list[str]) -> Path:
    """A Karpathy file listing `names` (two captions each, the second given as tokens only)."""
    entries = [{"filename": name, "imgid": i, "split": split,
                "sentences": [{"raw": f"Picture {name}.", "sentid": 2 * i},
                              {"tokens": ["picture", str(i)], "sentid": 2 * i + 1}]}
               for i, (name, split) in enumerate(zip(names, splits))]
    path.write_text(json.dumps({"images": entries}))
    return path


def _store(source: str, cache: Path, raw: bool):
    if raw:
        return prepare_raw(source, cache_dir=cache)
    return prepare(source, cache_dir=cache, image_encoder="pixels", text_encoder="hashing", progress=False)


# --------------------------------------------------------------------------- ?bad_images=skip


@pytest.mark.parametrize("raw", [False, True], ids=["features", "raw"])
def test_missing_images_are_dropped_under_skip_as_undecodable_ones_are(tmp_path, raw, caplog):
    """README: `?bad_images=skip` drops missing, unreadable and truncated images with their captions
    and counts them in the manifest. Missing files were refused by the reader whatever the option,
    so a JSON listing images the folder lacks (Flickr8k's held-back ones) could not be trained on."""
    images = tmp_path / "images"
    write_images(images)
    (images / "b.png").unlink()  # missing
    (images / "c.jpg").write_bytes((images / "c.jpg").read_bytes()[:200])  # cut short
    json_path = karpathy_json(tmp_path / "d.json", list(COLOURS), ["train"] * 4)
    refused(lambda: _store(f"karpathy:{json_path}", tmp_path / "cache", raw),  # the default still fails
            "missing", "field 'filename'", str(images / "b.png"))
    with caplog.at_level(logging.WARNING, logger="itmatch.data"):
        store = _store(f"karpathy:{json_path}?bad_images=skip", tmp_path / "cache", raw)
    assert store.manifest["skipped_images"] == {"train": 2}
    assert store.manifest["counts"] == {"train": {"images": 2, "captions": 4}}
    assert any("b.png" in r.getMessage() and "missing" in r.getMessage() for r in caplog.records)
    split = store.split("train")
    assert split.image_ids.tolist() == [0, 3]  # a.png and d.png, with their own captions
    assert split.texts == ["Picture a.png.", "picture 0", "Picture d.png.", "picture 3"]
    kept = [images / "a.png", images / "d.png"]
    if raw:  # the bytes on disk, untouched
        assert [v.as_py() for v in split.image_bytes] == [p.read_bytes() for p in kept]
    else:  # the `pixels` features of what PIL itself decodes: 16x16 box-filtered, standardised
        want = [np.asarray(Image.open(p).convert("RGB").resize((16, 16), Image.Resampling.BOX), np.float32) / 255
                for p in kept]
        want = np.stack([((w - w.mean()) / (w.std() + 1e-6)).reshape(-1) for w in want])
        np.testing.assert_allclose(split.image_feats, want, atol=1e-5)


def test_the_raw_store_manifest_counts_the_images_skipped(tmp_path):
    """The feature store recorded `skipped_images`; the raw store (end-to-end towers) dropped the count,
    so what ?bad_images=skip left out was seen only in a warning."""
    images = tmp_path / "images"
    write_images(images)
    (images / "c.jpg").write_bytes((images / "c.jpg").read_bytes()[:200])
    json_path = karpathy_json(tmp_path / "d.json", list(COLOURS), ["train", "train", "train", "test"])
    store = prepare_raw(f"karpathy:{json_path}?bad_images=skip", cache_dir=tmp_path / "cache")
    assert store.manifest["skipped_images"] == {"train": 1, "test": 0}
    assert open_store(store.root).manifest["skipped_images"] == {"train": 1, "test": 0}
    assert store.split("train").image_ids.tolist() == [0, 1]


# --------------------------------------------------------------------------- the files named


def test_a_dangling_link_is_named_as_a_link_to_nothing(tmp_path):
    """An image that is a link whose target is gone was said to be "there, its name written with other
    letter case or Unicode normalization": its name matches exactly, the hint sent users renaming it."""
    images = tmp_path / "images"
    write_images(images, ["a.png", "d.png"])
    gone = tmp_path / "elsewhere" / "b.png"
    (images / "b.png").symlink_to(gone)
    json_path = karpathy_json(tmp_path / "d.json", ["a.png", "b.png", "d.png"], ["train"] * 3)
    message = refused(lambda: read_source(f"karpathy:{json_path}"), "field 'filename'", str(images / "b.png"),
                      f"is a link to {str(gone)!r}, which does not exist")
    assert "letter case" not in message


def test_train_cli_names_a_dangling_link_in_one_line(tmp_path, capsys):
    from trainers import train

    images = tmp_path / "images"
    write_images(images, ["a.png", "d.png"])
    (images / "b.png").symlink_to(tmp_path / "gone.png")
    json_path = karpathy_json(tmp_path / "d.json", ["a.png", "b.png", "d.png"], ["train", "val", "test"])
    config = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"
    code = train.main(["--config", str(config), f"data.source=karpathy:{json_path}", "scaling.num_workers=1",
                       "train.epochs=1", "tracking.enabled=false", f"run.storage_path={tmp_path / 'runs'}",
                       f"data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert str(images / "b.png") in err[0] and "is a link to" in err[0] and str(tmp_path / "gone.png") in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("splits, shown", [
    (["train", "train", "test"], "(splits 'train' and 'test')"),
    (["train", "test", "train"], "(both in split 'train')"),
])
def test_a_picture_listed_again_under_a_hard_link_is_refused(tmp_path, splits, shown):
    """Duplicates were found by resolved path, which a hard link (or, on a case-insensitive disk, a name
    in other letter case) does not share: the same picture was then read as two images, in two splits
    a test image trained on, in one a picture whose captions count as wrong answers for itself."""
    images = tmp_path / "images"
    write_images(images, ["a.png", "b.png"])
    os.link(images / "a.png", images / "copy.png")
    assert os.path.samefile(images / "a.png", images / "copy.png")  # the reference: one file on disk
    json_path = karpathy_json(tmp_path / "d.json", ["a.png", "b.png", "copy.png"], splits)
    refused(lambda: read_source(f"karpathy:{json_path}"), str(json_path), "images[2] field 'filename' = 'copy.png'",
            "is the same file as images[0]'s", repr(str((images / "a.png").resolve())), "hard link", shown)
