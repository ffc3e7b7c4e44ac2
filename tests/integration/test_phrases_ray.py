"""Phrase localization through the real path: the preset's command as written
(`python -m trainers.train --config configs/shapes_phrases.yaml`, local Ray in-process, 2 gloo
workers, MLflow on SQLite) with tiny sizes, once per network (embedding: Eq. 6 with Algorithm 1's
negatives; similarity: the balanced logistic loss). Each reaches phrase R@1 far above a random
ranking on the test split, writes the phrase metrics to summary.json and MLflow, and registers its
model under the task's own name; the second run is compared with the first as the champion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ray_cli import ROOT, run_module

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
METRICS = {"phrase_r1", "phrase_r5", "phrase_r10", "phrase_upper", "phrase_random_r1"}
NETWORKS = {"embedding": [], "similarity": ["model.name=similarity", "loss.name=logistic"]}


def _args(tmp: Path, name: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "shapes_phrases.yaml"), "data.source=shapes-phrases:data?n_images=60",
            "data.batch_size=40", "train.epochs=4", f"run.name={name}", *NETWORKS[name]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both networks, run from a fresh folder as a user would (relative paths: the preset's)."""
    tmp = tmp_path_factory.mktemp("phrases")
    out = {name: run_module("trainers.train", _args(tmp, name), tmp, timeout=150) for name in NETWORKS}
    for name, proc in out.items():
        assert proc.returncode == 0, name + proc.stdout[-2000:] + proc.stderr[-4000:]
    return tmp, {name: json.loads((tmp / "runs" / name / "summary.json").read_text()) for name in NETWORKS}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_both_networks_localize_phrases_far_above_random(runs, name):
    _, summaries = runs
    test = summaries[name]["test"]
    assert set(test) == METRICS
    assert test["phrase_r1"] > test["phrase_random_r1"] + 25, test
    assert test["phrase_r1"] <= test["phrase_r5"] <= test["phrase_r10"] <= test["phrase_upper"] == 100.0
    assert summaries[name]["val_phrase_r1"] > 0 and summaries[name]["best_epoch"] >= 1


def test_mlflow_holds_the_phrase_metrics_and_the_registered_models(runs):
    from mlflow.tracking import MlflowClient

    tmp, summaries = runs
    client = MlflowClient(f"sqlite:///{tmp / 'mlruns.db'}")
    for name, summary in summaries.items():
        run = client.get_run(summary["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.params["data.source"] == "shapes-phrases:data?n_images=60"
        assert run.data.params["train.metric"] == "phrase_r1" and run.data.params["model.name"] == name
        for key in METRICS:
            assert run.data.metrics[f"test_{key}"] == pytest.approx(summary["test"][key])
        assert "val_phrase_r1" in run.data.metrics and "train_loss" in run.data.metrics
        assert summary["registry"]["name"] == "itmatch-phrases"
        # the pictures: example phrases with their boxes drawn, and the region-phrase map
        logged = {a.path for a in client.list_artifacts(summary["run_id"], "pictures")}
        assert logged == {"pictures/embedding_map.png", "pictures/queries.html"}
        page = (tmp / "runs" / name / "pictures" / "queries.html").read_text()
        assert page.count('<section class="query phrase"') == 12 and page.count("data:image/jpeg;base64,") == 12
    versions = client.search_model_versions("name='itmatch-phrases'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    # the second run was measured against the first on the same validation split
    assert summaries["similarity"]["registry"]["champion_score"] is not None
    holder = client.get_model_version_by_alias("itmatch-phrases", "champion")
    best = max(summaries, key=lambda n: (summaries[n]["val_phrase_r1"], n == "embedding"))
    assert holder.run_id == summaries[best]["run_id"]


def test_towers_trained_on_crops_through_ray_data_and_reloaded_from_the_registry(tmp_path):
    """The end-to-end preset as a user runs it, with Ray Data preparing the batches (crops of each
    batch's regions decoded and augmented on its actors) for 2 DDP workers: the image tower learns
    from the crops, the run registers, and the registered model (its own fine-tuned towers) scores
    the test split again through `trainers.evaluate` exactly as the run did."""
    args = ["--config", str(ROOT / "configs" / "shapes_phrases_e2e.yaml"), "data.source=shapes-phrases:data?n_images=60",
            "data.batch_size=40", "train.epochs=3", "data.loader=ray", "run.name=e2e"]
    proc = run_module("trainers.train", args, tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "runs" / "e2e" / "summary.json").read_text())
    test = summary["test"]
    assert test["phrase_r1"] > test["phrase_random_r1"] + 15, test
    out = tmp_path / "eval.json"
    evaluated = run_module("trainers.evaluate", ["--model", "models:/itmatch-phrases@champion", "--tracking-uri",
                                                 "sqlite:///mlruns.db", "--split", "test", "--json", str(out),
                                                 "--pictures", "pics"], tmp_path, timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["embedding_map.png", "queries.html"]
    again = json.loads(out.read_text())
    for key in METRICS:
        assert again[key] == pytest.approx(test[key], abs=1e-6), key
