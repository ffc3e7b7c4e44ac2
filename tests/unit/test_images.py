"""Pictures of every PIL mode become the RGB image a person would see: deeper samples are scaled, not
clipped (PIL's own convert("RGB") turns a 16-bit PNG almost white), through each path that decodes
them (the store's decoder, the raw split, the tower's preprocessing, the server)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from itmatch.data.images import open_rgb, to_rgb
from itmatch.data.raw import RawSplit
from itmatch.data.store import decode_images

RAMP = np.linspace(0, 1, 48 * 40).reshape(48, 40)  # a grey ramp: every level from black to white


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def expected_rgb(levels: np.ndarray) -> np.ndarray:
    """The 8-bit grey picture of levels in [0, 1], as three equal channels."""
    grey = np.rint(levels * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: Image.open(io.BytesIO(png(Image.fromarray(np.rint(RAMP * 65535).astype(np.uint16))))),
                 id="16-bit PNG (I;16)"),
    pytest.param(lambda: Image.fromarray(np.rint(RAMP * 65535).astype(np.int32), mode="I"), id="16-bit samples in I"),
    pytest.param(lambda: Image.fromarray(RAMP.astype(np.float32), mode="F"), id="float in [0, 1] (F)"),
    pytest.param(lambda: Image.fromarray(np.rint(RAMP * 255).astype(np.int32), mode="I"), id="8-bit samples in I"),
    pytest.param(lambda: Image.fromarray(np.rint(RAMP * 255).astype(np.uint8), mode="L"), id="L"),
])
def test_deep_and_grey_pictures_keep_their_levels(make):
    got = np.asarray(to_rgb(make()))
    assert got.shape == (48, 40, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected_rgb(RAMP).astype(int)).max() <= 1


def test_plain_convert_would_have_clipped_the_16_bit_png():
    """Why the function exists: the reference above is not what PIL's convert gives."""
    image = Image.open(io.BytesIO(png(Image.fromarray(np.rint(RAMP * 65535).astype(np.uint16)))))
    assert np.asarray(image.convert("RGB")).mean() > 250 and abs(np.asarray(to_rgb(image)).mean() - 127.5) < 1


def test_rgb_is_copied_and_transparent_palettes_convert_without_warning():
    rgb = Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8))
    copy = to_rgb(rgb)
    assert copy is not rgb and np.array_equal(np.asarray(copy), np.asarray(rgb))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.info["transparency"] = b"\x00" * 8  # transparency as bytes: PIL warns on convert("RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = to_rgb(Image.open(io.BytesIO(png(palette))))
    assert np.array_equal(np.asarray(got), np.asarray(palette.convert("RGBA").convert("RGB")))


def test_every_decoding_path_scales_a_16_bit_png():
    data = png(Image.fromarray(np.rint(RAMP * 65535).astype(np.uint16)))
    want = expected_rgb(RAMP).astype(int)
    (decoded,) = decode_images([data], "image")
    split = RawSplit.__new__(RawSplit)
    split.image_bytes = pa.chunked_array([pa.array([data], type=pa.binary())])
    (raw,) = split.images_at(np.array([0]))
    for image in (decoded, raw, open_rgb(data)):
        assert image.mode == "RGB" and np.abs(np.asarray(image).astype(int) - want).max() <= 1


def test_the_tower_preprocessing_and_the_server_see_the_same_pixels():
    from itmatch.models.towers import PixelPrep
    from trainers.pyfunc_model import decode_images as server_images

    deep = Image.open(io.BytesIO(png(Image.fromarray(np.rint(RAMP * 65535).astype(np.uint16)))))
    eight = Image.fromarray(expected_rgb(RAMP))
    prep = PixelPrep(32, augment=False)
    assert (prep([deep]).int() - prep([eight]).int()).abs().max() <= 1
    (served,) = server_images([png(Image.fromarray(np.rint(RAMP * 65535).astype(np.uint16)))])
    assert np.abs(np.asarray(served).astype(int) - expected_rgb(RAMP).astype(int)).max() <= 1


def test_the_server_reads_wrapped_and_url_safe_base64():
    """`base64 FILE` wraps every 76 characters; browsers' and JWT-style clients send URL-safe base64."""
    import base64
    import textwrap

    from trainers.pyfunc_model import decode_images as server_images

    data = png(Image.fromarray((np.random.default_rng(1).random((40, 40, 3)) * 255).astype(np.uint8)))
    wrapped = "\n".join(textwrap.wrap(base64.b64encode(data).decode(), 76)) + "\n"
    url_safe = base64.urlsafe_b64encode(data).decode()
    assert ("-" in url_safe or "_" in url_safe) and "\n" in wrapped.strip()
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for text in (wrapped, url_safe, "data:image/png;base64," + wrapped):
        (image,) = server_images([text])
        assert np.array_equal(np.asarray(image), want)


@pytest.mark.parametrize("value, message", [(None, "text row 1: missing (null)"), (float("nan"), "missing (null)"),
                                            ("", "text row 1: an empty caption ''"), ("  ", "an empty caption"),
                                            (7, "expected a string, got int")])
def test_a_served_caption_that_is_missing_or_empty_is_a_client_error(value, message):
    """A null caption (NaN in pandas) was "expected a string, got float"; an empty one was embedded,
    though training refuses empty captions."""
    from mlflow.exceptions import MlflowException

    from trainers.pyfunc_model import texts

    with pytest.raises(MlflowException, match=message.replace("(", r"\(").replace(")", r"\)")):
        texts(["a dog", value])
    assert texts(["a dog", "two cats"]) == ["a dog", "two cats"]
