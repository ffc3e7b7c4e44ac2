"""A Tune search over dotted keys where every trial is a 2-worker Ray Train job, end to end:
trials report per epoch, run their own test evaluation, log nested MLflow runs, and the best
trial is registered and takes the alias."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ray_cli import ROOT, run_module

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def _args(tmp: Path, space: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "debug.yaml"), "--space", str(space), "--name", "s1",
            "--num-samples", "1", "--scheduler", "fifo",
            f"data.source=synthetic:{tmp / 'shapes'}?n_images=120", f"data.cache_dir={tmp / 'cache'}",
            f"run.storage_path={tmp / 'runs'}", f"tracking.tracking_uri=sqlite:///{tmp / 'ml.db'}",
            f"tracking.artifact_location={tmp / 'art'}", "tracking.registered_model=itm-tune", *extra]


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    space = tmp / "space.yaml"
    space.write_text("loss.margin: {grid: [0.1, 0.4]}\n")
    done = run_module("tuning.search", _args(tmp, space), tmp, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return tmp, done


def test_every_trial_trains_and_the_best_is_registered(search):
    from mlflow.tracking import MlflowClient

    tmp, done = search
    result = json.loads((tmp / "runs" / "s1" / "search.json").read_text())
    trials = result["trials"]
    assert sorted(t["params"]["loss.margin"] for t in trials) == [0.1, 0.4]
    assert all(t["summary"] and t["epochs"] == 2 for t in trials)
    scores = {t["trial_id"]: t["summary"]["val_rsum"] for t in trials}
    assert result["best"]["trial_id"] == max(scores, key=scores.get)

    client = MlflowClient(f"sqlite:///{tmp / 'ml.db'}")
    runs = client.search_runs([client.get_experiment_by_name("itmatch").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "s1")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(float(r.data.params["loss.margin"]) for r in children) == [0.1, 0.4]
    assert all(r.info.status == "FINISHED" for r in [parent, *children])
    assert parent.data.tags["itmatch.best_trial"] == result["best"]["trial_id"]
    champion = client.get_model_version_by_alias("itm-tune", "champion")
    assert float(champion.tags["val_score"]) == pytest.approx(max(scores.values()))
    assert len(client.search_model_versions("name='itm-tune'")) == 1  # only the best trial
    assert "| best |" in done.stdout


def test_rerun_restores_the_finished_search_without_registering_again(search):
    from mlflow.tracking import MlflowClient

    tmp, first = search
    space = tmp / "space.yaml"
    again = run_module("tuning.search", _args(tmp, space), tmp, timeout=600)
    assert again.returncode == 0, again.stderr[-5000:]
    assert "resuming the search" in again.stdout + again.stderr  # Tuner.restore, no new trials
    result = json.loads((tmp / "runs" / "s1" / "search.json").read_text())
    assert len(result["trials"]) == 2 and all(t["summary"] for t in result["trials"])
    client = MlflowClient(f"sqlite:///{tmp / 'ml.db'}")
    assert len(client.search_model_versions("name='itm-tune'")) == 1


def test_bad_space_fails_before_ray(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("loss.margn: {uniform: [0.1, 0.2]}\n")
    done = run_module("tuning.search", _args(tmp_path, space), tmp_path, timeout=120)
    assert done.returncode == 2 and "loss.margn" in done.stderr and str(space) in done.stderr
    assert not (tmp_path / "runs").exists()
