"""Image featurisation spread over a Ray cluster with Ray Data (`data.featurize=ray`).

Pixels are decoded and encoded by a pool of actors, each holding the frozen encoder once; a row
index travels with every image so the features come back in the table's order whatever order
Ray Data finishes the blocks in. The result is the same Parquet feature store the local path
writes (tests compare them), so training, evaluation and MLflow are unchanged.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import pyarrow as pa

from itmatch.data.store import ImageFeaturizer, decode_images, pixel_column

log = logging.getLogger("itmatch.featurize")


class _EncodeBatch:
    """A Ray Data actor: builds the encoder once, then encodes batches of encoded images or paths."""

    def __init__(self, encoder: str, column: str) -> None:
        import torch

        from itmatch.data.encoders import build_image_encoder

        torch.set_num_threads(1)  # one core per actor; parallelism comes from the actor pool
        self.encoder, self.column = build_image_encoder(encoder), column

    def __call__(self, batch: dict) -> dict:
        values = batch[self.column].tolist()
        features = self.encoder.encode(decode_images(values, self.column), progress=False)
        return {"row": batch["row"], "feature": np.asarray(features, dtype=np.float32)}


def ray_image_featurizer(actors: Optional[int] = None, batch_size: int = 64) -> ImageFeaturizer:
    """A `prepare(image_featurizer=...)` that runs on the connected Ray cluster."""

    def featurize(images: pa.Table, encoder: str, progress: bool) -> np.ndarray:
        import ray

        column = pixel_column(images)
        table = pa.table({"row": np.arange(len(images)), column: images.column(column)})
        pool = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
        log.info("featurising %d images with %s on %d Ray Data actors", len(images), encoder, pool)
        ds = ray.data.from_arrow(table).map_batches(
            _EncodeBatch, fn_constructor_kwargs={"encoder": encoder, "column": column},
            batch_size=batch_size, concurrency=pool, num_cpus=1, batch_format="numpy")
        rows, feats = [], []
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            rows.append(batch["row"])
            feats.append(batch["feature"])
        order = np.argsort(np.concatenate(rows), kind="stable")
        return np.concatenate(feats)[order]

    return featurize


__all__ = ["ray_image_featurizer"]
