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
