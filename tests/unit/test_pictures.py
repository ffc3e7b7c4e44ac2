"""The pictures a run leaves (itmatch/eval/pictures.py): the embedding map's points, and the queries
page checked against a brute-force ranking, parsed as HTML, self-contained and escaped."""

from __future__ import annotations

import base64
import io
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from itmatch.data.store import SplitRows
from itmatch.eval import pictures
from itmatch.eval.pictures import (embedding_map, map_points, model_pictures, query_page, split_image_loader,
                                   write_pictures)

EVIL = '<script>alert(1)</script> & "quotes"'
PNG = b"\x89PNG\r\n\x1a\n"


def _data(n_images: int = 30, per: int = 3, dim: int = 8, noise: float = 0.4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n_images, dim, generator=g), dim=1)
    txt_img = torch.arange(n_images).repeat_interleave(per)
    txt = F.normalize(img[txt_img] + noise * torch.randn(len(txt_img), dim, generator=g), dim=1)
    texts = [f"caption {c} of image {int(i)} {EVIL}" for c, i in enumerate(txt_img)]
    return img, txt, txt_img, texts


def _loader(row: int) -> Image.Image:
    return Image.new("RGB", (40 + row, 30), (5 * row % 256, 120, 60))


class _Queries(HTMLParser):
    """Each query section: kind, query row, the ranked results (row, correct) and the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.queries: list[dict] = []
        self.imgs: list[str] = []
        self.scripts = 0
        self._ol = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "script":
            self.scripts += 1
        elif tag == "section" and "query" in classes:
            kind = "t2i" if "t2i" in classes else "i2t"
            self.queries.append({"kind": kind, "row": int(a["data-query"]), "rank": int(a["data-rank"]),
                                 "truth": int(a["data-truth"]) if "data-truth" in a else None,
                                 "results": [], "truth_tile": None})
        elif tag == "ol" and "results" in classes:
            self._ol = True
        elif tag == "li" and self._ol:
            self.queries[-1]["results"].append((int(a["data-row"]), a["data-correct"] == "1", "hit" in classes))
        elif tag == "div" and "truth" in classes:
            self.queries[-1]["truth_tile"] = int(a["data-row"])
        elif tag == "img":
            self.imgs.append(a["src"])

    def handle_endtag(self, tag):
        if tag == "ol":
            self._ol = False


def _parse(path: Path) -> _Queries:
    parser = _Queries()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def _brute_top(query: torch.Tensor, gallery: torch.Tensor, k: int, score=None) -> tuple[list[int], list[int]]:
    """(top-k rows, the full order) by a per-item loop: highest score first, ties by row."""
    scores = [float(score(j) if score else query @ gallery[j]) for j in range(len(gallery))]
    order = sorted(range(len(gallery)), key=lambda j: (-scores[j], j))
    return order[:k], order


# --------------------------------------------------------------------------- the map


def test_map_png_and_its_points(tmp_path):
    img, txt, txt_img, _ = _data()
    path = tmp_path / "pics" / "embedding_map.png"
    points = embedding_map(img, txt, txt_img, path, max_images=20, seed=3)
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 5000
    assert len(points.image_rows) == 20 and len(set(points.image_rows.tolist())) == 20
    # every caption of the drawn images, and only those
    want = np.flatnonzero(np.isin(txt_img.numpy(), points.image_rows))
    np.testing.assert_array_equal(points.caption_rows, want)
    assert points.image_xy.shape == (20, 2) and points.caption_xy.shape == (60, 2)
    assert np.isfinite(points.image_xy).all() and np.isfinite(points.caption_xy).all()
    # caption_image links each caption point to its own image point
    np.testing.assert_array_equal(points.image_rows[points.caption_image], txt_img.numpy()[points.caption_rows])
    expected = "t-SNE" if _has_sklearn() else "PCA"
    assert points.method == expected


def test_map_is_deterministic_by_seed():
    img, txt, txt_img, _ = _data()
    a = map_points(img, txt, txt_img, max_images=12, seed=1)
    b = map_points(img, txt, txt_img, max_images=12, seed=1)
    np.testing.assert_array_equal(a.image_rows, b.image_rows)
    np.testing.assert_array_equal(a.image_xy, b.image_xy)
    np.testing.assert_array_equal(a.caption_xy, b.caption_xy)
    c = map_points(img, txt, txt_img, max_images=12, seed=2, method="pca")
    assert c.method == "PCA" and not np.array_equal(a.image_rows, c.image_rows)


def test_map_falls_back_to_pca_without_sklearn(monkeypatch):
    img, txt, txt_img, _ = _data(n_images=10)
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # import fails
    points = map_points(img, txt, txt_img, max_images=10)
    assert points.method == "PCA" and points.image_xy.shape == (10, 2)
    with pytest.raises(ImportError):
        map_points(img, txt, txt_img, method="tsne")


def _has_sklearn() -> bool:
    try:
        import sklearn.manifold  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- the page


def test_page_marks_ground_truth_like_a_brute_force_ranking(tmp_path):
    img, txt, txt_img, texts = _data()
    path = tmp_path / "queries.html"
    t2i, _ = query_page(img, txt, txt_img, texts, path, image_loader=_loader, n_queries=7, k=5, seed=4)
    page = _parse(path)
    shown = {kind: [q for q in page.queries if q["kind"] == kind] for kind in ("t2i", "i2t")}
    assert len(shown["t2i"]) == 7 and len(shown["i2t"]) == 7
    assert [q["row"] for q in shown["t2i"]] == [q.row for q in t2i]
    for q in shown["t2i"]:
        top, order = _brute_top(txt[q["row"]], img, 5)
        truth = int(txt_img[q["row"]])
        assert [r for r, _, _ in q["results"]] == top
        assert [c for _, c, _ in q["results"]] == [r == truth for r in top]
        assert [h for _, _, h in q["results"]] == [r == truth for r in top]  # the green mark
        assert q["truth"] == truth and q["rank"] == order.index(truth) + 1
        assert q["truth_tile"] == (None if truth in top else truth)
    for q in shown["i2t"]:
        top, order = _brute_top(img[q["row"]], txt, 5)
        own = [c for c in range(len(txt)) if int(txt_img[c]) == q["row"]]
        assert [r for r, _, _ in q["results"]] == top
        assert [c for _, c, _ in q["results"]] == [r in own for r in top]
        assert q["rank"] == min(order.index(c) for c in own) + 1
    # both kinds of marks occur (the test data is neither perfect nor hopeless)
    marks = [c for q in page.queries for _, c, _ in q["results"]]
    assert any(marks) and not all(marks)


def test_page_is_self_contained_and_escaped(tmp_path):
    img, txt, txt_img, texts = _data()
    path = tmp_path / "queries.html"
    query_page(img, txt, txt_img, texts, path, image_loader=_loader, n_queries=4, k=3,
               image_ids=np.arange(500, 530), title=f"test {EVIL}")
    text = path.read_text(encoding="utf-8")
    page = _parse(path)
    assert page.scripts == 0 and "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quotes&quot;" in text
    assert page.imgs and all(src.startswith("data:image/jpeg;base64,") for src in page.imgs)
    for src in set(page.imgs):
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.format == "JPEG" and im.width > 0
    assert "http" not in text and 'src="' not in text.replace('src="data:', "")  # nothing fetched
    assert "image 5" in text  # labelled by image id


def test_page_without_pixels_shows_ids(tmp_path):
    img, txt, txt_img, texts = _data(n_images=12)
    path = tmp_path / "queries.html"
    query_page(img, txt, txt_img, texts, path, image_loader=None, image_ids=np.arange(100, 112), n_queries=3)
    text = path.read_text(encoding="utf-8")
    assert "<img" not in text and "shown by id" in text and 'class="ph">image 1' in text
    assert len(_parse(path).queries) == 6


def test_unreadable_image_is_shown_by_id(tmp_path):
    img, txt, txt_img, texts = _data(n_images=12)

    def loader(row):
        if row % 2:
            raise OSError("cannot identify image file")
        return _loader(row)

    path = tmp_path / "queries.html"
    query_page(img, txt, txt_img, texts, path, image_loader=loader, n_queries=6)
    text = path.read_text(encoding="utf-8")
    assert "could not be read" in text and "<img" in text


def test_page_ranks_by_the_models_pair_score(tmp_path):
    """A learned pair score (the similarity network) ranks the page, not the cosine."""
    img, txt, txt_img, texts = _data(n_images=15)
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))

    def score_fn(i, t):
        return (i @ w) @ t.T

    path = tmp_path / "queries.html"
    query_page(img, txt, txt_img, texts, path, image_loader=None, n_queries=5, k=4, score_fn=score_fn)
    for q in _parse(path).queries:
        row = q["row"]
        if q["kind"] == "t2i":
            top, _ = _brute_top(None, img, 4, score=lambda j, row=row: score_fn(img[j:j + 1], txt[row:row + 1]))
        else:
            top, _ = _brute_top(None, txt, 4, score=lambda j, row=row: score_fn(img[row:row + 1], txt[j:j + 1]))
        assert [r for r, _, _ in q["results"]] == top


def test_page_is_deterministic_by_seed(tmp_path):
    img, txt, txt_img, texts = _data()
    a, b, c = (tmp_path / n for n in ("a.html", "b.html", "c.html"))
    for path, seed in ((a, 5), (b, 5), (c, 6)):
        query_page(img, txt, txt_img, texts, path, image_loader=_loader, n_queries=4, seed=seed)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


# --------------------------------------------------------------------------- a run's folder


def _split(txt_img, texts, n_images):
    return SplitRows(image_ids=np.arange(n_images) + 1000, caption_ids=np.arange(len(texts)),
                     caption_image=np.asarray(txt_img), texts=texts)


def test_write_pictures_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    img, txt, txt_img, texts = _data(n_images=12)
    folder = tmp_path / "pictures"
    folder.mkdir()
    (folder / "embedding_map.png").write_bytes(b"stale")

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(pictures, "embedding_map", broken)
    written = write_pictures(img, txt, _split(txt_img, texts, 12), folder, image_loader=_loader, n_queries=3)
    assert list(written) == ["queries.html"] and (folder / "queries.html").is_file()
    assert not (folder / "embedding_map.png").exists()  # no stale picture logged as this run's
    assert "embedding_map.png not drawn: RuntimeError: no display" in caplog.text


def _feature_store(tmp_path, n_images=40):
    from itmatch.data.store import prepare

    source = f"synthetic:{tmp_path / 'shapes'}?n_images={n_images}&image_size=32"
    store = prepare(source, cache_dir=tmp_path / "cache", image_encoder="pixels", text_encoder="hashing",
                    splits=["test"], progress=False)
    return source, store


def test_model_pictures_from_a_synthetic_feature_store(tmp_path):
    """The debug preset's kind of data: features for the model, the source's image files for the page."""
    from itmatch.config import load_config
    from itmatch.models import build_model

    source, store = _feature_store(tmp_path)
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "debug.yaml", {"data.source": source})
    torch.manual_seed(0)
    model = build_model(*store.dims, cfg.model).eval()
    written = model_pictures(model, store, "test", tmp_path / "pictures", n_queries=3, k=2, max_images=4)
    assert sorted(written) == ["embedding_map.png", "queries.html"]
    assert written["embedding_map.png"].read_bytes()[:8] == PNG
    page = _parse(written["queries.html"])
    assert len(page.queries) == 3 + min(3, len(store.split("test").image_ids)) and page.imgs
    assert all(src.startswith("data:image/jpeg;base64,") for src in page.imgs)


def test_split_image_loader_sources(tmp_path, monkeypatch):
    """A raw split's own bytes and a feature split's source files give the same picture per row;
    precomputed features, or source files that are no longer the store's, give none."""
    import os

    from itmatch.data.raw import prepare_raw
    from itmatch.data.store import FeatureStore

    source, store = _feature_store(tmp_path, n_images=20)
    raw = prepare_raw(source, cache_dir=tmp_path / "cache", splits=["test"]).split("test")
    features = store.split("test")
    np.testing.assert_array_equal(raw.image_ids, features.image_ids)
    from_raw, from_files = split_image_loader(raw, None), split_image_loader(features, store)
    assert len(raw.image_ids) >= 2
    for row in range(len(raw.image_ids)):
        with Image.open(io.BytesIO(from_raw(row))) as a, Image.open(from_files(row)) as b:
            assert a.convert("RGB").tobytes() == b.convert("RGB").tobytes()
    precomp = FeatureStore(tmp_path, {"source": "precomp:/nonexistent/dir"})
    assert split_image_loader(features, precomp) is None
    # the store's files changed since: no pictures (they may be other pictures now)
    json_path = next((tmp_path / "shapes").glob("*.json"))
    os.utime(json_path, ns=(json_path.stat().st_atime_ns, json_path.stat().st_mtime_ns + 10**9))
    assert split_image_loader(features, store) is None
    # a relative synthetic location seen from another folder is not generated there
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    relative = FeatureStore(store.root, {**store.manifest, "source": "synthetic:shapes-missing?n_images=20"})
    monkeypatch.chdir(elsewhere)
    assert split_image_loader(features, relative) is None and not (elsewhere / "shapes-missing").exists()
