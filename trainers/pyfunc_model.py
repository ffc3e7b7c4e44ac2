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

A bad request raises `MlflowException(INVALID_PARAMETER_VALUE)` with a one-line message, which the
scoring server turns into a 400 instead of a 500 with a stack trace.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path
from typing import Any, Optional

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

INPUTS = ("text", "text_feature", "image", "image_feature")
EXAMPLE_CAPTION = "a red disc on the left"
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def invalid(message: str) -> MlflowException:
    """A client error: the scoring server answers 400 with this one line."""
    return MlflowException(" ".join(message.split()), error_code=INVALID_PARAMETER_VALUE)


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


def _is_file(value: str) -> bool:
    try:
        return len(value) < 4096 and Path(value).is_file()
    except (OSError, ValueError):  # a long base64 string is no file name ("File name too long")
        return False


def _image_bytes(value: Any, row: int) -> bytes | str:
    """Bytes as given, a path on the server as a path, any other string decoded from base64."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, str):
        raise invalid(f"image row {row}: expected bytes, a path or a base64 string, got {type(value).__name__}")
    if _is_file(value):
        return value
    # `base64 FILE` wraps its output every 76 characters, and web clients often send URL-safe base64
    text = _SPACE.sub("", _DATA_URL.sub("", value.strip()))
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"image row {row}: neither a file on the server nor base64-encoded image bytes") from None


def decode_images(values: list) -> list:
    """PIL RGB images from bytes, server paths or base64 strings; undecodable ones are client errors."""
    from PIL import Image, UnidentifiedImageError

    from itmatch.data.images import to_rgb

    images = []
    for row, value in enumerate(values):
        data = _image_bytes(value, row)
        try:
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
                images.append(to_rgb(image))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise invalid(f"image row {row}: cannot decode the image ({type(exc).__name__})") from None
    return images


def texts(values: list) -> list[str]:
    """Caption strings, none missing or blank (training refuses empty captions: an embedding of
    nothing would be served as if it were one)."""
    for row, value in enumerate(values):
        if value is None or (isinstance(value, float) and value != value):  # pandas' missing value is NaN
            raise invalid(f"text row {row}: missing (null): every row needs a caption")
        if not isinstance(value, str):
            raise invalid(f"text row {row}: expected a string, got {type(value).__name__}")
        if not value.strip():
            raise invalid(f"text row {row}: an empty caption {value!r}")
    return list(values)


def features(column: str, values: list, width: int) -> np.ndarray:
    """Feature rows as float32 [N, width]; ragged, wrong-width or non-finite rows are client errors."""
    try:
        rows = [np.asarray(v, dtype=np.float32).reshape(-1) for v in values]
        feats = np.stack(rows)
    except (TypeError, ValueError):
        raise invalid(f"{column}: every row must be a list of {width} numbers") from None
    if feats.shape[1] != width:
        raise invalid(f"{column}: rows have {feats.shape[1]} values, this model takes {width}")
    bad = np.flatnonzero(~np.isfinite(feats).all(axis=1))
    if bad.size:
        raise invalid(f"{column}: row {int(bad[0])} has NaN or infinite values")
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

    def _end_to_end(self, column: str, values: list) -> np.ndarray:
        """Raw images and captions through the model's own (fine-tuned) towers."""
        if column == "text":
            return self.model.embed_texts(self.model.text_tower.prepare(texts(values))).numpy()
        return self.model.embed_images(self.model.image_tower.prepare(decode_images(values))).numpy()

    def _encode(self, column: str, values: list) -> np.ndarray:
        """Raw input through the frozen encoder the training features came from."""
        from itmatch.data.encoders import IMAGE_ENCODERS, TEXT_ENCODERS, build_image_encoder, build_text_encoder

        if column == "text":
            if self.text_encoder_name not in TEXT_ENCODERS:
                raise invalid(f"this model was trained on precomputed caption features "
                              f"({self.text_encoder_name}): pass 'text_feature'")
            return build_text_encoder(self.text_encoder_name).encode(texts(values))
        if (self.image_encoder_name or "").partition(":")[0] not in IMAGE_ENCODERS:
            raise invalid(f"this model was trained on precomputed image features "
                          f"({self.image_encoder_name}): pass 'image_feature'")
        return build_image_encoder(self.image_encoder_name).encode(decode_images(values))

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
            return list(values[0])
        return values

    # The DataFrame hint is one MLflow takes without converting the input (and without its warning
    # that `predict` has no type hints, printed at every load)
    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict[str, Any]] = None) -> np.ndarray:
        column = self._column(model_input)
        values = self._values(model_input, column)
        raw = column.removesuffix("_feature")
        if self.end_to_end(raw):
            if column != raw:
                raise invalid(f"this model embeds {raw}s with its own encoder tower: pass '{raw}' (raw), "
                              f"not '{column}'")
            return self._end_to_end(column, values)
        feats = features(column, values, self._tower(column).out_dim) if column != raw \
            else self._encode(column, values)
        embed = self.model.embed_texts if raw == "text" else self.model.embed_images
        with torch.no_grad():
            return embed(torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))).numpy()
