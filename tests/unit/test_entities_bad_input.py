"""Bad Flickr30K Entities input is refused when read, with one line naming the file, the field (or
row) and the value: image sizes and boxes of the Annotations, `<filename>`s leaving the images
folder, proposals' image ids and boxes, and proposals that leave pictures (or whole splits) without
any. Valid quirks of real data (boxes a little past the border, integral float ids) stay accepted."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from itmatch.data.phrase_store import pixel_box, prepare_phrases, read_phrase_source
from itmatch.data.sources import DataError
from itmatch.phrases.entities import read_entities, read_proposals
from itmatch.phrases.synthetic import write_shapes_entities

SIZE = 48


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_shapes_entities(tmp_path_factory.mktemp("ent") / "base", 16, seed=1, image_size=SIZE,
                                 val_fraction=0.25, test_fraction=0.25)


@pytest.fixture
def root(base, tmp_path) -> Path:
    """A fresh copy of the valid folder to break (without the writer's marker: nothing rewrites it)."""
    return Path(shutil.copytree(base, tmp_path / "copy", ignore=shutil.ignore_patterns("shapes_entities.json")))


def edit(path: Path, pattern: str, replacement: str) -> None:
    text = path.read_text()
    new = re.sub(pattern, replacement, text, count=1)
    assert new != text, (path, pattern)
    path.write_text(new)


def refused(root: Path, *needles: str, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        read_entities(root, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def split_ids(root: Path, split: str) -> list[int]:
    return [int(n) for n in (root / f"{split}.txt").read_text().split()]


# --------------------------------------------------------------------------- Annotations/<id>.xml


@pytest.mark.parametrize("value", ["0", "-48"])
def test_non_positive_image_size_is_refused(root, value):
    edit(root / "Annotations/0.xml", r"<width>\d+</width>", f"<width>{value}</width>")
    refused(root, "Annotations/0.xml", "<width>", repr(value))


def test_box_entirely_outside_the_image_is_refused(root):
    edit(root / "Annotations/0.xml", r"(?s)<bndbox>.*?</bndbox>",
         "<bndbox><xmin>700</xmin><ymin>700</ymin><xmax>716</xmax><ymax>717</ymax></bndbox>")
    message = refused(root, "Annotations/0.xml", "<object> #1", "<name> 1", "700", "716", "outside")
    assert f"{SIZE}x{SIZE}" in message


def test_box_partly_outside_the_image_is_kept_and_clipped_when_cropped(root):
    edit(root / "Annotations/0.xml", r"<xmin>\d+</xmin>", "<xmin>-5</xmin>")
    edit(root / "Annotations/0.xml", r"<xmax>\d+</xmax>", "<xmax>900</xmax>")
    corpus = read_entities(root)
    box = corpus.regions.filter(pc.equal(corpus.regions.column("entity_id"), 1)).column("box")[0].as_py()
    assert box[0] == -6 and box[2] == 900
    assert pixel_box(np.array(box), SIZE, SIZE)[0::2] == (0, SIZE)


def test_xml_size_that_disagrees_with_the_image_file_is_refused(root):
    edit(root / "Annotations/0.xml", r"<width>\d+</width>\s*<height>\d+</height>",
         "<width>640</width><height>480</height>")
    refused(root, "Annotations/0.xml", "640x480", "shapes_000000.png", f"{SIZE}x{SIZE}")


def test_xml_size_is_not_checked_without_an_image_folder(root):
    edit(root / "Annotations/0.xml", r"<width>\d+</width>\s*<height>\d+</height>",
         "<width>640</width><height>480</height>")
    shutil.rmtree(root / "images")
    assert read_entities(root).images.column("width").to_pylist()[0] == 640


@pytest.mark.parametrize("name", ["../../../../../etc/passwd", "/etc/passwd", "sub/../../shapes_000001.png", "."])
def test_filename_leaving_the_images_folder_is_refused(root, name):
    edit(root / "Annotations/0.xml", r"<filename>[^<]*</filename>", f"<filename>{name}</filename>")
    refused(root, "Annotations/0.xml", "<filename>", repr(name))


def test_filename_in_a_subfolder_is_accepted(root):
    (root / "images/sub").mkdir()
    shutil.move(root / "images/shapes_000000.png", root / "images/sub/shapes_000000.png")
    edit(root / "Annotations/0.xml", r"<filename>[^<]*</filename>", "<filename>sub/./shapes_000000.png</filename>")
    assert read_entities(root).images.column("path")[0].as_py().endswith("sub/shapes_000000.png")


# --------------------------------------------------------------------------- proposals.parquet


def rewrite_proposals(root: Path, **columns) -> Path:
    path = root / "proposals.parquet"
    table = pq.read_table(path)
    for name, values in columns.items():
        table = table.set_column(table.column_names.index(name), name, values)
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("first, needle", [("abc", "'abc'"), (None, "null"), (0.5, "0.5"), (float("nan"), "nan")])
def test_bad_proposal_image_id_is_refused(root, first, needle):
    ids = pq.read_table(root / "proposals.parquet").column("image_id").to_pylist()
    kind = pa.string() if isinstance(first, str) else pa.float64() if isinstance(first, float) else pa.int64()
    values = [first] + [str(i) if kind == pa.string() else i for i in ids[1:]]
    path = rewrite_proposals(root, image_id=pa.array(values, kind))
    with pytest.raises(DataError) as err:
        read_proposals(path)
    message = str(err.value)
    assert "proposals.parquet" in message and "row 0" in message and "image_id" in message and needle in message


def test_integral_float_and_digit_text_ids_are_accepted(root):
    want = read_proposals(root / "proposals.parquet")
    ids = pq.read_table(root / "proposals.parquet").column("image_id").to_pylist()
    rewrite_proposals(root, image_id=pa.array([float(i) for i in ids], pa.float64()))
    assert read_proposals(root / "proposals.parquet").equals(want)
    rewrite_proposals(root, image_id=pa.array([str(i) for i in ids], pa.string()))
    assert read_proposals(root / "proposals.parquet").equals(want)


def test_proposal_entirely_outside_its_image_is_refused(root):
    table = pq.read_table(root / "proposals.parquet")
    x1, x2 = table.column("x1").to_pylist(), table.column("x2").to_pylist()
    x1[3], x2[3] = 5000.0, 6000.0
    rewrite_proposals(root, x1=pa.array(x1, table.schema.field("x1").type),
                      x2=pa.array(x2, table.schema.field("x2").type))
    refused(root, "proposals.parquet", "row 3", "5000.0", "6000.0", "outside", f"{SIZE}x{SIZE}")


def test_empty_proposals_file_is_refused(root):
    path = root / "proposals.parquet"
    pq.write_table(pq.read_table(path).slice(0, 0), path)
    with pytest.raises(DataError) as err:
        read_phrase_source(f"entities:{root}")
    assert str(path) in str(err.value) and "no proposal" in str(err.value)


def drop_proposals(root: Path, image_ids: list[int]) -> Path:
    path = root / "proposals.parquet"
    table = pq.read_table(path)
    pq.write_table(table.filter(pc.invert(pc.is_in(table.column("image_id"), pa.array(image_ids, pa.int64())))),
                   path)
    return path


def prepare(root: Path, tmp_path: Path, splits):
    # raw: no encoder is built; the proposals are checked before any picture is stored
    return prepare_phrases(f"entities:{root}", cache_dir=tmp_path / "cache", image_encoder="-", text_encoder="-",
                           splits=splits, progress=False, raw_images=True)


def test_split_without_proposals_is_refused(root, tmp_path):
    test = split_ids(root, "test")
    path = drop_proposals(root, test)
    for splits in (["test"], None):
        with pytest.raises(DataError) as err:
            prepare(root, tmp_path, splits)
        message = str(err.value)
        assert str(path) in message and "'test'" in message and f"{len(test)} of {len(test)}" in message
        assert f"{test[:5]}" in message
    assert prepare(root, tmp_path, ["train"]).manifest["counts"]["train"]["proposals"] > 0


def test_some_pictures_without_proposals_are_named(root, tmp_path):
    train = split_ids(root, "train")
    path = drop_proposals(root, train[1:3])
    with pytest.raises(DataError) as err:
        prepare(root, tmp_path, ["train"])
    message = str(err.value)
    assert str(path) in message and "'train'" in message and f"2 of {len(train)}" in message
    assert f"{train[1:3]}" in message


def test_xml_size_is_checked_when_the_store_is_built_not_on_every_read(root, tmp_path, monkeypatch):
    """The check opens one image header per picture (~31k on Flickr30K): prepare_phrases runs it for
    the splits it builds, and a cache hit reads no header; a mismatch is refused before anything is
    stored, in the split that has it only."""
    import itmatch.data.phrase_store as phrase_store

    test_id = split_ids(root, "test")[0]
    edit(root / f"Annotations/{test_id}.xml", r"<width>\d+</width>\s*<height>\d+</height>",
         "<width>640</width><height>480</height>")
    with pytest.raises(DataError, match=rf"Annotations/{test_id}.xml: <size> .* = 640x480, but its image .* is "
                                        rf"{SIZE}x{SIZE}"):
        prepare(root, tmp_path, ["test"])
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    store = prepare(root, tmp_path, ["train"])  # a split without the mismatch builds
    opened = []
    monkeypatch.setattr(phrase_store, "check_image_sizes", lambda *a, **k: opened.append(a))
    assert prepare(root, tmp_path, ["train"]).root == store.root and opened == []


def test_an_annotation_edited_in_place_is_not_served_from_the_cache(root, tmp_path):
    """The store's folder was named by the files' sizes and times and the folders': an XML rewritten
    in place (same size, the folder's time unchanged) was served its old boxes. What was read names
    the folder now."""
    store = prepare(root, tmp_path, ["train"])
    train_id = split_ids(root, "train")[0]
    xml = root / f"Annotations/{train_id}.xml"
    folder_time, text = (root / "Annotations").stat().st_mtime_ns, xml.read_text()
    # a box's left edge one pixel further left, its last digit 1-9 one less: the file keeps its size
    match = next(m for m in re.finditer(r"<xmin>\d*([1-9])</xmin>", text))
    with open(xml, "r+") as handle:
        handle.write(text[:match.start(1)] + str(int(match.group(1)) - 1) + text[match.end(1):])
    assert (root / "Annotations").stat().st_mtime_ns == folder_time and len(xml.read_text()) == len(text)
    fresh = prepare(root, tmp_path, ["train"])
    assert fresh.root != store.root
    boxes = lambda s: pq.read_table(Path(s.root) / "train_regions.parquet").column("box").to_pylist()  # noqa: E731
    assert boxes(fresh) != boxes(store)
    assert prepare(root, tmp_path, ["train"]).root == fresh.root  # and unchanged again: a hit
