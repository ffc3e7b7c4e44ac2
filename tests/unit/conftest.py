"""Fixtures the unit tests share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from itmatch.data.raw import RawStore, prepare_raw

FLICKR8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "flickr8k-1k"


@pytest.fixture(scope="session")
def flickr8k_raw(tmp_path_factory) -> RawStore:
    """A raw store of the first 8 train, 3 val and 3 test images of ../shared/data/flickr8k-1k (5
    captions each); the tests that take it skip where that data is absent."""
    tmp = tmp_path_factory.mktemp("f8k")
    images = json.loads((FLICKR8K / "dataset_flickr8k_1k.json").read_text())["images"]
    keep = [im for split, n in (("train", 8), ("val", 3), ("test", 3))
            for im in [i for i in images if i["split"] == split][:n]]
    (tmp / "data.json").write_text(json.dumps({"dataset": "flickr8k", "images": keep}))
    return prepare_raw(f"karpathy:{tmp / 'data.json'}:{FLICKR8K / 'images'}", cache_dir=tmp / "cache")


def write_small_precomp(folder: Path, n_train: int = 40, seed: int = 0) -> str:
    """Small VSE++-style features with a shared signal (image 24-d, captions 12-d, 5 a image;
    `train`, `dev`, `test`) written to `folder`: a `precomp:` source whose CCA fits in milliseconds.
    Caption features are read as data.text_encoder=hashing. Returns the source string."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("dev", 10), ("test", 10)):
        z = rng.normal(size=(n, 4))
        np.save(folder / f"{split}_ims.npy", (z @ rng.normal(size=(4, 24)) + rng.normal(size=(n, 24))).astype("f4"))
        caps = np.repeat(z, 5, axis=0) @ rng.normal(size=(4, 12)) + rng.normal(size=(5 * n, 12))
        np.save(folder / f"{split}_caps_hashing.npy", caps.astype("f4"))
        (folder / f"{split}_caps.txt").write_text("".join(f"caption {i}\n" for i in range(5 * n)))
    return f"precomp:{folder}"


@pytest.fixture
def small_precomp(tmp_path) -> str:
    """`write_small_precomp` in this test's tmp_path/data."""
    (tmp_path / "data").mkdir()
    return write_small_precomp(tmp_path / "data")


@pytest.fixture
def mlflow_run(tmp_path):
    """A RUNNING MLflow run on a fresh SQLite store: (the job's `tracking` dict, a client on the store)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    return {"tracking_uri": uri, "run_id": run_id, "folder": str(tmp_path / "run")}, client
