"""The MLflow pyfunc wrapper of a trained checkpoint: embeds images and captions.

Logged as MLflow "models from code": `trainers/pyfunc_entry.py` is the model file and calls
`mlflow.models.set_model(EmbeddingModel())`; the frozen encoders' names come from the logged
`model_config` and the weights from the `checkpoint` artifact, both read in `load_context`.

`predict(df)` takes a DataFrame with exactly one of these columns and returns an [N, d] float32
array of unit-norm embeddings in the shared space:
    text           caption strings (encoded with the run's frozen text encoder)
    text_feature   caption feature vectors (as the model was trained on)
    image          image bytes, a path on the server, or base64 image bytes (a `data:image/...;base64,`
                   prefix allowed; any string that is not an existing file is read as base64)
    image_feature  image feature vectors
A modality whose tower is an encoder trained with the model (end to end) is embedded from raw
`text` / `image` by that tower (its preprocessing included) and takes no feature column.

Rows are embedded CHUNK_ROWS at a time, so a large request holds one chunk's decoded images or
token tensors, not the whole batch's; each row's embedding is the one it gets alone.

A bad request raises `MlflowException(INVALID_PARAMETER_VALUE)` with a one-line message naming the
column, the row and the value, which the scoring server turns into a 400 instead of a 500 with a
stack trace: a missing (null), blank or non-Unicode caption; a feature row that is not a flat list
of the model's width of finite numbers (strings and booleans are not numbers); an image that does
not decode or declares more pixels than PIL's decompression-bomb limit (refused from its header,
before decoding); and a row the model cannot embed (its embedding is not a finite unit vector,
e.g. features so large that float32 overflows), which would otherwise be served as a zero vector.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path
from typing import Any, Callable, Optional

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

INPUTS = ("text", "text_feature", "image", "image_feature")
EXAMPLE_CAPTION = "a red disc on the left"
# Rows embedded at a time, whatever a request's length: decoded images stay full size until the
# encoder resizes them (8 at PIL's pixel limit are ~2 GB), MiniLM's attention grows with the batch
# (128 is its frozen encoder's batch), a branch's hidden layer is small.
CHUNK_ROWS = {"text": 128, "text_feature": 1024, "image": 8, "image_feature": 1024}
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def invalid(message: str) -> MlflowException:
    """A client error: the scoring server answers 400 with this one line."""
    return MlflowException(" ".join(message.split()), error_code=INVALID_PARAMETER_VALUE)


def shown(value: Any, limit: int = 60) -> str:
    """A short repr of a request's value for a message (a 4 MB base64 string is not echoed back)."""
    text = repr(value[: limit + 1] if isinstance(value, (str, bytes, bytearray)) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def missing(value: Any) -> bool:
    """None, NaN, pd.NA or NaT: what JSON null and pandas give for an absent cell."""
    return value is None or value is pd.NA or value is pd.NaT or (
        isinstance(value, (float, np.floating)) and bool(np.isnan(value)))


def input_schema():
    """The four input columns, each optional (a request carries exactly one of them)."""
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    # `image` is a string, not binary: MLflow would base64-decode a binary column before predict and
    # break paths; here a string is a path or base64 and Python callers may still pass bytes.
    return Schema([ColSpec(DataType.string, "text", required=False),
                   ColSpec(Array(DataType.double), "text_feature", required=False),
                   ColSpec(DataType.string, "image", required=False),
                   ColSpec(Array(DataType.double), "image_feature", required=False)])


def signature(dim: int):
    """Inputs: the four optional columns; output: float32 embeddings [-1, dim]."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=input_schema(), outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]))


def _server_path(value: str) -> Optional[Path]:
    """The existing path `value` names on the server, else None."""
    try:
        # "" would be the working directory
        return Path(value) if value.strip() and len(value) < 4096 and Path(value).exists() else None
    except (OSError, ValueError):  # a long base64 string is no file name ("File name too long"), nor is "a\0b"
        return None


def _image_bytes(value: Any, row: int) -> bytes | str:
    """Bytes as given, a path on the server as a path, any other string decoded from base64."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if missing(value):
        raise invalid(f"image row {row}: missing (null): every row needs an image")
    if not isinstance(value, str):
        raise invalid(f"image row {row}: expected bytes, a path or a base64 string, got {type(value).__name__} "
                      f"{shown(value)}")
    path = _server_path(value)
    if path is not None:
        if path.is_file():
            return value
        # a folder or a device: read as base64 it would only fail later, as "not an image"
        raise invalid(f"image row {row}: {shown(value, 240)} is on the server but is no image file")
    head = value.lstrip()[:40]
    if head[:5].lower() == "data:" and not _DATA_URL.match(head):
        raise invalid(f"image row {row}: a data URL must start with data:image/<type>;base64, got {shown(head)}")
    # `base64 FILE` wraps its output every 76 characters, and web clients often send URL-safe base64
    text = _SPACE.sub("", _DATA_URL.sub("", value.strip()))
    try:
        data = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        data = b""
    if not data:
        raise invalid(f"image row {row}: neither a file on the server nor base64-encoded image bytes: {shown(value)}")
    return data


def _check_pixels(image: Any, row: int) -> None:
    """Refuse from the header alone an image over PIL's decompression-bomb limit: PIL itself only
    warns up to twice that limit and decodes it (a 300 KB PNG can declare 100 M pixels, 300 MB)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        raise invalid(f"image row {row}: {image.width}x{image.height} pixels, more than the {limit} this server "
                      "decodes")


def _decode(value: Any, row: int) -> Any:
    """One request row as a PIL RGB image."""
    from PIL import Image, UnidentifiedImageError

    from itmatch.data.images import to_rgb

    data = _image_bytes(value, row)
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            _check_pixels(image, row)
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise invalid(f"image row {row}: cannot decode the image ({type(exc).__name__}): {shown(value)}") from None


def decode_images(values: list, first: int = 0) -> list:
    """PIL RGB images from bytes, server paths or base64 strings; undecodable ones are client errors.
    `first`: the request row of values[0] (a chunk's offset), for messages."""
    return [_decode(value, row) for row, value in enumerate(values, first)]


def texts(values: list) -> list[str]:
    """Caption strings, none missing, blank or unencodable (training refuses blank captions: an
    embedding of nothing would be served as if it were one)."""
    from itmatch.data.readers import is_blank

    for row, value in enumerate(values):
        if missing(value):
            raise invalid(f"text row {row}: missing (null): every row needs a caption")
        if not isinstance(value, str):
            raise invalid(f"text row {row}: expected a string, got {type(value).__name__} {shown(value)}")
        # zero-width, control and format characters only ('\u200b', '\x00') count as blank, as in training
        if is_blank(value):
            raise invalid(f"text row {row}: an empty caption {shown(value)}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\udc80" in JSON): tokenizers raise TypeError on it
            raise invalid(f"text row {row}: not valid Unicode text (a lone surrogate): {shown(value)}") from None
    return list(values)


def _is_number(x: Any) -> bool:
    return missing(x) or (isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_)))


def _numbers(value: Any) -> np.ndarray:
    """`value` as a numeric array; an object array of numbers (Python ints and floats, nulls as
    NaN) is converted, any other object array stays object (refused by the caller)."""
    array = np.asarray(value)
    if array.dtype == object and all(_is_number(x) for x in array.flat):
        array = np.array([np.nan if missing(x) else float(x) for x in array.flat]).reshape(array.shape)
    return array


_KINDS = {"b": "booleans", "U": "strings", "S": "bytes", "c": "complex numbers", "O": "values that are not numbers"}


def _feature_row(column: str, row: int, value: Any, width: int) -> np.ndarray:
    """One feature row as float32 [width]: a flat list of numbers. numpy would read "1.5" and True
    as numbers and flatten a nested list; the served schema refuses them, so a Python caller does too."""
    if missing(value):
        raise invalid(f"{column} row {row}: missing (null): every row needs a list of {width} numbers")
    try:
        array = _numbers(value)
    except OverflowError:  # a JSON integer of 400 digits
        raise invalid(f"{column} row {row}: a value beyond float's range: {shown(value)}") from None
    except (TypeError, ValueError):  # ragged nesting
        raise invalid(f"{column} row {row}: not a flat list of {width} numbers: {shown(value)}") from None
    if array.dtype.kind not in "iuf":
        raise invalid(f"{column} row {row}: expected {width} numbers, got {_KINDS.get(array.dtype.kind, array.dtype)}: "
                      f"{shown(value)}")
    if array.ndim != 1:
        raise invalid(f"{column} row {row}: expected a flat list of {width} numbers, got "
                      f"{'a single number' if array.ndim == 0 else f'a nested list of shape {array.shape}'}")
    if array.shape[0] != width:
        raise invalid(f"{column}: rows have {array.shape[0]} values, this model takes {width} (row {row})")
    with np.errstate(over="ignore"):  # beyond float32's range is inf, refused by `features`
        return array.astype(np.float32)


def features(column: str, values: list, width: int) -> np.ndarray:
    """Feature rows as float32 [N, width]; a row that is not a flat list of `width` finite numbers
    (in float32, the model's precision: 1e39 is inf there) is a client error naming it."""
    rows = [_feature_row(column, row, value, width) for row, value in enumerate(values)]
    feats = np.stack(rows) if rows else np.zeros((0, width), np.float32)
    bad = np.flatnonzero(~np.isfinite(feats).all(axis=1))
    if bad.size:
        row = int(bad[0])
        col = int(np.flatnonzero(~np.isfinite(feats[row]))[0])
        raise invalid(f"{column}: row {row} has NaN or infinite values (value {col} is "
                      f"{float(_numbers(values[row])[col])!r}; float32 holds up to 3.4e38)")
    return feats


class EmbeddingModel(mlflow.pyfunc.PythonModel):
    def __init__(self) -> None:
        self.model: Any = None
        self.cfg: Any = None
        self.image_encoder_name: Optional[str] = None
        self.text_encoder_name: Optional[str] = None

    def load_context(self, context) -> None:
        from itmatch.state import load_model

        config = context.model_config or {}
        self.image_encoder_name, self.text_encoder_name = config.get("image_encoder"), config.get("text_encoder")
        self.model, self.cfg = load_model(Path(context.artifacts["checkpoint"]))

    def _tower(self, column: str):
        return self.model.text_tower if column.startswith("text") else self.model.image_tower

    def end_to_end(self, modality: str) -> bool:
        """True when `modality`'s tower is an encoder trained with the model (it reads raw input)."""
        from itmatch.models.towers import FeatureTower

        return not isinstance(self._tower(modality), FeatureTower)

    def embeds_raw_text(self) -> bool:
        from itmatch.data.encoders import TEXT_ENCODERS

        return self.end_to_end("text") or self.text_encoder_name in TEXT_ENCODERS

    def _frozen_encoder(self, raw: str):
        """The frozen encoder the training features of `raw` came from (it embeds raw input)."""
        from itmatch.data.encoders import IMAGE_ENCODERS, TEXT_ENCODERS, build_image_encoder, build_text_encoder

        if raw == "text":
            if self.text_encoder_name not in TEXT_ENCODERS:
                raise invalid(f"this model was trained on precomputed caption features "
                              f"({self.text_encoder_name}): pass 'text_feature'")
            return build_text_encoder(self.text_encoder_name)
        if (self.image_encoder_name or "").partition(":")[0] not in IMAGE_ENCODERS:
            raise invalid(f"this model was trained on precomputed image features "
                          f"({self.image_encoder_name}): pass 'image_feature'")
        return build_image_encoder(self.image_encoder_name)

    def _embedder(self, column: str) -> Callable[[Any, int], np.ndarray]:
        """embed(rows, first) -> [len(rows), d] for one chunk of `column`'s (checked) rows, `first`
        being the request row of rows[0]: raw input through the model's own encoder tower (end to
        end) or through the frozen encoder its features came from, features straight to the branch."""
        raw = column.removesuffix("_feature")
        embed = self.model.embed_texts if raw == "text" else self.model.embed_images
        load = decode_images if column == "image" else (lambda rows, first: rows)
        if column != raw:
            return lambda rows, first: embed(torch.from_numpy(np.ascontiguousarray(rows))).numpy()
        if self.end_to_end(raw):
            prepare = self._tower(raw).prepare
            return lambda rows, first: embed(prepare(load(rows, first))).numpy()
        encoder = self._frozen_encoder(raw)
        return lambda rows, first: embed(torch.from_numpy(
            np.ascontiguousarray(encoder.encode(load(rows, first)), dtype=np.float32))).numpy()

    def _column(self, model_input) -> str:
        columns = list(getattr(model_input, "columns", []))
        present = [c for c in INPUTS if c in columns]
        if len(present) != 1:
            got = ", ".join(map(str, columns)) or "none of them"  # the signature already dropped unknown ones
            raise invalid(f"input needs exactly one of the columns {', '.join(INPUTS)}; got {got}")
        if len(model_input) == 0:
            raise invalid(f"column {present[0]!r} has no rows")
        return present[0]

    def _values(self, model_input, column: str) -> list:
        values = model_input[column].tolist()
        # MLflow's schema enforcement turns `{"inputs": {"text": [...]}}` (and `instances`) into one row
        # holding the whole list; for raw columns a list cell can only mean that.
        if column in ("text", "image") and len(values) == 1 and isinstance(values[0], (list, np.ndarray)):
            values = list(values[0])
        if not values:  # `{"inputs": {"text": []}}` was answered with an empty list of embeddings
            raise invalid(f"column {column!r} has no rows")
        return values

    def _checked(self, column: str, values: Any, embeddings: np.ndarray) -> np.ndarray:
        """The embeddings if each is a finite unit vector (an ensemble's: before its hubness columns).
        float32 overflow inside the network (features far beyond the training data's scale) comes
        out of L2 normalisation as the zero vector: a row like that is refused, not served."""
        core = getattr(self.model, "core_dim", None) or embeddings.shape[1]
        norms = np.linalg.norm(embeddings[:, :core].astype(np.float64), axis=1)
        bad = np.flatnonzero(~(np.abs(norms - 1.0) < 1e-3))  # NaN fails too
        if bad.size:
            row = int(bad[0])
            value = f"its largest |value| is {np.abs(values[row]).max():.3g}" if column.endswith("_feature") \
                else shown(values[row])
            raise invalid(f"{column} row {row}: the model cannot embed it (its embedding has norm {norms[row]:.3g}, "
                          f"not 1): {value}")
        return np.ascontiguousarray(embeddings, dtype=np.float32)

    # The DataFrame hint is one MLflow takes without converting the input (and without its warning
    # that `predict` has no type hints, printed at every load)
    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict[str, Any]] = None) -> np.ndarray:
        column = self._column(model_input)
        values = self._values(model_input, column)
        raw = column.removesuffix("_feature")
        if self.end_to_end(raw) and column != raw:
            raise invalid(f"this model embeds {raw}s with its own encoder tower: pass '{raw}' (raw), "
                          f"not '{column}'")
        embed = self._embedder(column)
        # every caption and feature row is checked before any is embedded; images as they decode
        if column == "text":
            values = texts(values)
        elif column != raw:
            values = features(column, values, self._tower(column).out_dim)
        step = CHUNK_ROWS[column]
        with torch.no_grad():
            parts = [embed(values[start:start + step], start) for start in range(0, len(values), step)]
        return self._checked(column, values, np.concatenate(parts))
