"""Decoded pictures as the RGB images every encoder, tower, server and picture sheet takes: one home,
so that training, evaluation and serving see the same pixels for the same file.

PIL's own `convert("RGB")` clips rather than scales deeper pixels: a 16-bit PNG (mode I;16, or I in
some Pillow versions) comes out almost white, a float image (F) black. Those are rescaled to 8 bits
first. Palette images with a transparent colour go through RGBA (as PIL asks, without its warning);
alpha is dropped, as torchvision's and open_clip's loaders do. EXIF orientation is not applied,
as in those loaders (and this keeps features of existing caches unchanged).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


def _eight_bit(image: "Image.Image") -> "Image.Image":
    """A one-channel image of mode I;16*, I or F as mode L, values scaled to 0..255."""
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16") or (image.mode == "I" and 255 < top <= 65535):
        values = values * (255.0 / 65535.0)  # 16-bit samples (I: what a 16-bit PNG opens as elsewhere)
    elif image.mode == "I" and top > 65535:
        values = values * (255.0 / top)
    elif image.mode == "F" and 0.0 <= values.min() and top <= 1.0:
        values = values * 255.0  # float images in [0, 1]
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: "Image.Image") -> "Image.Image":
    """A new RGB image of `image` (a copy even when it already is RGB: callers may draw on it)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _eight_bit(image)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def open_rgb(value: Any) -> "Image.Image":
    """An RGB image from a PIL image, encoded bytes or a file path."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return to_rgb(value)
    with Image.open(io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value) as opened:
        return to_rgb(opened)
