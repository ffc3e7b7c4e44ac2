"""The MLflow pyfunc wrapper of a trained checkpoint: embeds images and captions.

`predict(df)` takes a DataFrame with exactly one of these columns and returns an [N, d] array of
unit-norm embeddings in the shared space:
    text           caption strings (encoded with the run's frozen text encoder)
    text_feature   caption feature vectors (as the model was trained on)
    image          image bytes or file paths (encoded with the run's frozen image encoder)
    image_feature  image feature vectors
A modality whose tower is an encoder trained with the model (end to end) is embedded from raw
`text` / `image` by that tower (its preprocessing included) and takes no feature column.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

INPUTS = ("text", "text_feature", "image", "image_feature")


class EmbeddingModel(mlflow.pyfunc.PythonModel):
    def __init__(self, image_encoder: str, text_encoder: str) -> None:
        self.image_encoder_name, self.text_encoder_name = image_encoder, text_encoder
        self.model: Any = None

    def load_context(self, context) -> None:
        from itmatch.state import load_model

        self.model, self.cfg = load_model(Path(context.artifacts["checkpoint"]))

    def _end_to_end(self, column: str, values: list) -> np.ndarray:
        """Raw images and captions through the model's own (fine-tuned) towers."""
        from PIL import Image

        if column == "text":
            return self.model.embed_texts(self.model.text_tower.prepare([str(v) for v in values])).numpy()
        images = [Image.open(io.BytesIO(v) if isinstance(v, (bytes, bytearray)) else v).convert("RGB") for v in values]
        return self.model.embed_images(self.model.image_tower.prepare(images)).numpy()

    def _encode(self, column: str, values: list) -> np.ndarray:
        if column == "text":
            from itmatch.data.encoders import build_text_encoder

            return build_text_encoder(self.text_encoder_name).encode([str(v) for v in values])
        from PIL import Image

        from itmatch.data.encoders import build_image_encoder

        if self.image_encoder_name == "precomputed":
            raise ValueError("this model was trained on precomputed image features: pass 'image_feature'")
        images = [Image.open(io.BytesIO(v) if isinstance(v, (bytes, bytearray)) else v).convert("RGB") for v in values]
        return build_image_encoder(self.image_encoder_name).encode(images)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        present = [c for c in INPUTS if c in model_input.columns]
        if len(present) != 1:
            raise ValueError(f"input needs exactly one of the columns {INPUTS}, got {list(model_input.columns)}")
        column = present[0]
        values = model_input[column].tolist()
        from itmatch.models.towers import FeatureTower

        tower = self.model.text_tower if column.startswith("text") else self.model.image_tower
        if not isinstance(tower, FeatureTower):  # an encoder trained with the model reads raw inputs
            if column.endswith("_feature"):
                raise ValueError(f"this model embeds {column.removesuffix('_feature')}s with its own encoder tower: "
                                 f"pass '{column.removesuffix('_feature')}' (raw), not '{column}'")
            return self._end_to_end(column, values)
        feats = np.stack([np.asarray(v, dtype=np.float32) for v in values]) if column.endswith("_feature") \
            else self._encode(column, values)
        embed = self.model.embed_texts if column.startswith("text") else self.model.embed_images
        return embed(torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))).numpy()
