"""Phrase localization pictures (itmatch/eval/phrase_pictures.py) on a small shapes-phrases store: the
shown proposals against a per-phrase loop, the page parsed as HTML (self-contained, escaped, one
section per phrase), the drawn boxes read back from the JPEGs, the source-picture loader's refusals,
and the model entry point on a feature and a raw store."""

from __future__ import annotations

import base64
import io
import os
import shutil
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from itmatch.config import load_config
from itmatch.data.raw import prepare_inputs
from itmatch.eval.phrase_pictures import (RANK_COLOURS, TRUTH_COLOUR, draw_boxes, model_phrase_pictures, phrase_map,
                                          phrase_page, phrase_picture_loader)
from itmatch.eval.pictures import MAP_FILE, PAGE_FILE
from itmatch.models import build_model
from test_phrase_task import iou_loop  # the same loop reference

EVIL = '<script>alert(1)</script> & "quotes"'
PNG = b"\x89PNG\r\n\x1a\n"
JPEG_URI = "data:image/jpeg;base64,"
SIZE = 320


def _prepare(tmp: Path, folder: str, raw: bool):
    return prepare_inputs(f"shapes-phrases:{tmp / folder}?n_images=40&seed=1", cache_dir=tmp / "cache",
                          raw_images=raw, image_encoder="pixels", text_encoder="hashing",
                          splits=["train", "val", "test"])


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("phrase_pictures")


@pytest.fixture(scope="module")
def store(tmp):
    return _prepare(tmp, "shapes", raw=False)


@pytest.fixture(scope="module")
def raw_store(tmp, store):
    return _prepare(tmp, "shapes", raw=True)


@pytest.fixture(scope="module")
def split(store):
    return store.split("test")


@pytest.fixture(scope="module")
def scores(split):
    """Seeded random scores, the padding columns the highest of all: shown only if not masked."""
    s = torch.rand(len(split), split.proposal_rows.shape[1], generator=torch.Generator().manual_seed(0))
    return torch.where(torch.from_numpy(split.proposal_rows[split.phrase_picture] >= 0), s, torch.tensor(1e9))


class _Sections(HTMLParser):
    """Per query section: its attributes, texts and table rows; every <img> src; <script> tags."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[dict] = []
        self.imgs: list[str] = []
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        elif tag == "section":
            self.sections.append({**a, "rows": [], "imgs": []})
        elif tag == "tr" and "data-row" in a:
            self.sections[-1]["rows"].append((int(a["data-row"]), a["data-correct"] == "1"))
        elif tag == "img":
            self.imgs.append(a["src"])
            self.sections[-1]["imgs"].append(a["src"])

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Sections:
    parser = _Sections()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _decode(uri: str) -> Image.Image:
    assert uri.startswith(JPEG_URI)
    image = Image.open(io.BytesIO(base64.b64decode(uri[len(JPEG_URI):], validate=True)))
    assert image.format == "JPEG"
    return image.convert("RGB")


def _reference(split, scores, row, k):
    """(top rows, their IoUs, first hitting rank) of one phrase: its picture's own proposals, one by one."""
    picture = split.phrase_picture[row]
    props = [int(r) for r in split.proposal_rows[picture] if r >= 0]
    ranked = sorted(props, key=lambda r: -float(scores[row, list(split.proposal_rows[picture]).index(r)]))
    ious = [iou_loop(split.phrase_box[row], split.region_box[r]) for r in ranked]
    first = next((i + 1 for i, v in enumerate(ious) if v >= 0.5), None)
    return ranked[:k], ious[:k], first


def _greenish(pixel) -> bool:
    r, g, b = (int(v) for v in pixel)
    return g > 120 and g > r + 60 and g > b + 60


def _edge_pixels(box, scale, width, height, inset: int = 1):
    """Pixels along the centre of the stroke of a box drawn scaled (its outline drawn inward)."""
    x1, y1 = int(np.floor(box[0] * scale)) + inset, int(np.floor(box[1] * scale)) + inset
    x2, y2 = min(int(np.ceil(box[2] * scale)), width) - 1 - inset, min(int(np.ceil(box[3] * scale)), height) - 1 - inset
    return [(x, y) for x in range(x1, x2 + 1) for y in (y1, y2)] + [(x, y) for y in range(y1, y2 + 1) for x in (x1, x2)]


# --------------------------------------------------------------------------- the page


def test_shown_proposals_equal_a_per_phrase_loop(tmp, store, split, scores):
    loader = phrase_picture_loader(split, store)
    queries = phrase_page(scores, split, tmp / "page.html", picture_loader=loader, n_queries=12, k=3, seed=4)
    rows = [q.row for q in queries]
    assert len(queries) == 12 and rows == sorted(set(rows)) and max(rows) < len(split)
    for q in queries:
        top, ious, first = _reference(split, scores, q.row, 3)
        assert q.top == top and q.picture == split.phrase_picture[q.row]  # padding (score 1e9) never shown
        assert all(split.region_picture[r] == q.picture and split.image_ids[r] < 0 for r in q.top)
        np.testing.assert_allclose(q.ious, ious)
        assert q.hits == [v >= 0.5 for v in ious] and q.first_hit == first
        assert q.scores == sorted(q.scores, reverse=True)
    assert any(q.first_hit is not None for q in queries)
    every = phrase_page(scores, split, tmp / "all.html", picture_loader=None, n_queries=10_000, k=2)
    assert [q.row for q in every] == list(range(len(split)))


def test_page_is_self_contained_escaped_and_has_a_section_per_query(tmp, store, split, scores):
    evil = replace(split, texts=[f"{t} {EVIL}" for t in split.texts])
    path = tmp / "evil.html"
    queries = phrase_page(scores, evil, path, picture_loader=phrase_picture_loader(split, store), n_queries=7,
                          title=EVIL)
    page = _parse(path)
    raw = path.read_text(encoding="utf-8")
    assert page.scripts == 0 and "<script>" not in raw and "&lt;script&gt;" in raw
    assert "http://" not in raw and "https://" not in raw and "<link" not in raw  # nothing fetched
    assert [int(s["data-query"]) for s in page.sections] == [q.row for q in queries]
    for section, q in zip(page.sections, queries):
        assert section["rows"] == list(zip(q.top, q.hits))
        assert int(section["data-hit"]) == int(q.hits[0]) and int(section["data-rank"]) == (q.first_hit or 0)
        assert len(section["imgs"]) == 1
    assert len(page.imgs) == len(queries) and all(max(_decode(u).size) == SIZE for u in page.imgs)
    assert sum(f"{evil.texts[q.row]}" in "".join(page.text) for q in queries) == len(queries)  # round-trips


def test_drawn_picture_has_the_truth_in_green_on_its_box_edges(tmp, store, split, scores):
    loader = phrase_picture_loader(split, store)
    path = tmp / "drawn.html"
    queries = phrase_page(scores, split, path, picture_loader=loader, n_queries=5, seed=1)
    for q, uri in zip(queries, _parse(path).imgs):
        with Image.open(loader(q.picture)) as source:
            scale = SIZE / max(source.size)
        image = np.asarray(_decode(uri))
        edge = _edge_pixels(split.phrase_box[q.row], scale, image.shape[1], image.shape[0])
        green = np.mean([_greenish(image[y, x]) for x, y in edge])
        assert green > 0.7, (q.row, green)  # rank tags may cover a little of it


def test_draw_boxes_scales_and_colours_every_box():
    """A plain large picture shrunk to `size`: the truth green, #1 red, #2 its own colour, lines >= 2 px."""
    picture = Image.new("RGB", (1000, 600), (128, 128, 128))
    truth, first, second = [100, 100, 300, 400], [500, 150, 700, 350], [750, 300, 950, 550]
    image = np.asarray(draw_boxes(picture, truth, [first, second], size=SIZE))
    assert image.shape == (192, 320, 3)
    scale = 0.32
    for box, colour in ((truth, TRUTH_COLOUR), (first, RANK_COLOURS[0]), (second, RANK_COLOURS[1])):
        for inset in (0, 1):
            x = int(np.floor(box[0] * scale)) + inset
            y = (int(box[1] * scale) + int(box[3] * scale)) // 2
            assert tuple(image[y, x]) == colour, (box, inset)
    assert RANK_COLOURS[0] != RANK_COLOURS[1] and TRUTH_COLOUR not in RANK_COLOURS
    small = draw_boxes(Image.new("RGB", (64, 32)), [0, 0, 64, 32], [], size=SIZE)
    assert small.size == (320, 160) and tuple(np.asarray(small)[80, 0]) == TRUTH_COLOUR  # enlarged to fit


def test_page_without_pictures_lists_the_boxes_and_says_why(tmp, split, scores):
    path = tmp / "bare.html"
    queries = phrase_page(scores, split, path, picture_loader=None, n_queries=4)
    page, raw = _parse(path), path.read_text(encoding="utf-8")
    assert not page.imgs and len(page.sections) == 4 and "not available here" in raw
    for section, q in zip(page.sections, queries):
        assert [r for r, _ in section["rows"]] == q.top
        box = split.phrase_box[q.row]
        assert "(" + ", ".join(f"{float(v):g}" for v in box) + ")" in raw  # the truth as text
    broken = tmp / "broken.html"
    phrase_page(scores, split, broken, picture_loader=lambda p: b"not a picture", n_queries=4)
    assert not _parse(broken).imgs and "4 picture(s) could not be read" in broken.read_text(encoding="utf-8")


def test_same_seed_same_page(tmp, store, split, scores):
    loader = phrase_picture_loader(split, store)
    a, b, c = (tmp / f"{n}.html" for n in "abc")
    qa = phrase_page(scores, split, a, picture_loader=loader, seed=3)
    qb = phrase_page(scores, split, b, picture_loader=loader, seed=3)
    qc = phrase_page(scores, split, c, picture_loader=loader, seed=4)
    assert qa == qb and a.read_bytes() == b.read_bytes()
    assert [q.row for q in qa] != [q.row for q in qc]


# --------------------------------------------------------------------------- the map


def test_map_draws_ground_truth_regions_and_their_phrases(tmp, split):
    g = torch.Generator().manual_seed(1)
    region_emb, phrase_emb = torch.randn(len(split.image_ids), 6, generator=g), torch.randn(len(split), 6, generator=g)
    points = phrase_map(region_emb, phrase_emb, split, tmp / "map.png", max_images=5, seed=2)
    assert (tmp / "map.png").read_bytes()[:8] == PNG
    assert len(points.image_rows) == 5 and (split.image_ids[points.image_rows] >= 0).all()
    np.testing.assert_array_equal(points.image_rows[points.caption_image], split.caption_image[points.caption_rows])
    want = np.flatnonzero(np.isin(split.caption_image, points.image_rows))
    np.testing.assert_array_equal(points.caption_rows, want)  # every phrase of the drawn regions


# --------------------------------------------------------------------------- loaders and a model


def test_loader_reads_the_source_pictures_the_store_was_built_from(store, raw_store, split):
    loader = phrase_picture_loader(split, store)
    raw_split = raw_store.split("test")
    raw_loader = phrase_picture_loader(raw_split, raw_store)
    for p in range(len(split.picture_ids)):
        path = Path(loader(p))
        assert int(path.stem.split("_")[-1]) == split.picture_ids[p]
        assert raw_loader(p) == path.read_bytes()  # the raw store's bytes are those very files


def test_loader_refuses_a_source_changed_or_gone(tmp):
    store = _prepare(tmp, "moving", raw=False)
    split = store.split("test")
    assert phrase_picture_loader(split, store) is not None
    listed = tmp / "moving" / "test.txt"
    stat = listed.stat()
    os.utime(listed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the same text, touched: not the same files
    assert phrase_picture_loader(split, store) is None
    shutil.rmtree(tmp / "moving")
    assert phrase_picture_loader(split, store) is None
    assert not (tmp / "moving").exists()  # never regenerated to draw a picture


@pytest.mark.parametrize("raw", [False, True], ids=["features", "raw"])
def test_model_pictures_write_both_files(tmp, store, raw_store, raw):
    chosen = raw_store if raw else store
    source = chosen.manifest["source"]
    towers = ["model.image_tower=convnet", "model.cnn_width=8", "model.image_size=32", "model.text_tower=textcnn",
              "model.embed_dim=16", "model.hidden_dim=32"] if raw else []
    model = build_model(*chosen.dims, load_config(None, [f"data.source={source}", *towers]).model)
    if hasattr(model.text_tower, "fit_vocabulary"):
        model.text_tower.fit_vocabulary(chosen.split("train").texts)
    folder = tmp / f"model_{raw}"
    written = model_phrase_pictures(model, chosen, "test", folder, n_queries=4)
    assert written == {MAP_FILE: folder / MAP_FILE, PAGE_FILE: folder / PAGE_FILE}
    assert (folder / MAP_FILE).read_bytes()[:8] == PNG
    page = _parse(folder / PAGE_FILE)
    assert len(page.sections) == 4 and len(page.imgs) == 4
    assert model.training  # left as it was


def test_a_picture_that_cannot_be_drawn_is_a_warning(tmp, store, caplog):
    model = build_model(*store.dims, load_config(None, [f"data.source={store.manifest['source']}"]).model)
    folder = tmp / "broken"
    folder.mkdir()
    (folder / MAP_FILE).write_bytes(b"stale")
    (folder / PAGE_FILE).write_text("stale")
    written = model_phrase_pictures(model, store, "test", folder, embeddings=(torch.zeros(3, 4), torch.zeros(2, 4)))
    assert written == {} and not (folder / MAP_FILE).exists() and not (folder / PAGE_FILE).exists()
    assert "not drawn" in caplog.text
