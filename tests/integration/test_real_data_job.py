"""The README's real-data job as written: `python -m trainers.train --config
configs/flickr8k_precomp.yaml` from the repo root, with the preset's relative
`precomp:../shared/data/flickr8k-1k/precomp` and its one worker trained in the driver (no Ray
started); only where it writes goes to tmp. It must learn (an untrained model scores ~30 test rsum
here; CCA 382.8, the data README's reference; the network ~400, BENCHMARKS.md), keep every epoch's
record, and register its model with the alias."""

from __future__ import annotations

import json

import pytest
from ray_cli import ROOT, run_module

DATA = ROOT.parent / "shared" / "data" / "flickr8k-1k" / "precomp"
pytestmark = [pytest.mark.timeout(600), pytest.mark.skipif(not DATA.is_dir(), reason=f"needs {DATA}")]


def test_the_readmes_real_data_job_trains_in_its_driver_and_learns(tmp_path):
    from mlflow.tracking import MlflowClient

    writes = [f"run.storage_path={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}",
              f"tracking.tracking_uri=sqlite:///{tmp_path / 'ml.db'}", f"tracking.artifact_location={tmp_path / 'art'}"]
    done = run_module("trainers.train", ["--config", "configs/flickr8k_precomp.yaml", *writes], ROOT, timeout=500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "Started a local Ray" not in done.stdout + done.stderr  # one worker: trained in the driver
    run = tmp_path / "runs" / "flickr8k-precomp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["rsum"] > 360 and 1 <= summary["best_epoch"] <= 30, summary
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 31))
    client = MlflowClient(f"sqlite:///{tmp_path / 'ml.db'}")
    holder = client.get_model_version_by_alias("itmatch-embedding", "champion")
    assert holder.run_id == summary["run_id"]
