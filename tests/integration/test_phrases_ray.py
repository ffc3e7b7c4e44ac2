"""Phrase localization through the real path: the presets' commands as written
(`python -m trainers.train --config configs/shapes_phrases[_e2e].yaml`, local Ray in-process, 2 gloo
workers, MLflow on SQLite) with tiny sizes, once per network. The embedding network (Eq. 6 with
Algorithm 1's negatives) runs end to end: its image tower learns from the region crops and its text
tower from the phrases, with Ray Data preparing the batches; the similarity network (the balanced
logistic loss) runs on cached region features. Each reaches phrase R@1 far above a random ranking
on the test split, writes the phrase metrics to summary.json and MLflow, and registers its model
under the task's own name; the second, whose inputs (cached features) the champion (raw crops)
cannot be scored on, does not take the alias; the registered end-to-end model scores the test
split again through `trainers.evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ray_cli import ROOT, run_module

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]
METRICS = {"phrase_r1", "phrase_r5", "phrase_r10", "phrase_upper", "phrase_random_r1"}
# name -> (preset, overrides, how far above a random ranking its test phrase R@1 must be)
NETWORKS = {"embedding": ("shapes_phrases_e2e.yaml", ["data.loader=ray", "train.epochs=3"], 15),
            "similarity": ("shapes_phrases.yaml", ["model.name=similarity", "loss.name=logistic", "train.epochs=4"], 25)}


def _args(tmp: Path, name: str) -> list[str]:
    preset, extra, _ = NETWORKS[name]
    return ["--config", str(ROOT / "configs" / preset), "data.source=shapes-phrases:data?n_images=60",
            "data.batch_size=40", f"run.name={name}", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both networks, run from a fresh folder as a user would (relative paths: the preset's)."""
    tmp = tmp_path_factory.mktemp("phrases")
    out = {name: run_module("trainers.train", _args(tmp, name), tmp, timeout=240) for name in NETWORKS}
    for name, proc in out.items():
        assert proc.returncode == 0, name + proc.stdout[-2000:] + proc.stderr[-4000:]
        (tmp / f"{name}.log").write_text(proc.stdout + proc.stderr)
    return tmp, {name: json.loads((tmp / "runs" / name / "summary.json").read_text()) for name in NETWORKS}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_both_networks_localize_phrases_far_above_random(runs, name):
    _, summaries = runs
    test = summaries[name]["test"]
    assert set(test) == METRICS
    assert test["phrase_r1"] > test["phrase_random_r1"] + NETWORKS[name][2], test
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
        assert run.data.params["train.metric"] == "phrase_r1"
        assert run.data.params["model.name"] == name and run.data.params["data.loader"] == ("ray" if name == "embedding" else "local")
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
    # the champion (v1, raw crops) cannot be scored on the second run's cached features: it keeps the alias
    assert summaries["embedding"]["registry"]["version"] == 1 and summaries["embedding"]["registry"]["promoted"]
    assert summaries["similarity"]["registry"]["champion_score"] == float("inf")
    assert not summaries["similarity"]["registry"]["promoted"]
    assert ("the champion takes raw pictures and text, this run's data is precomputed features of widths"
            in (tmp / "similarity.log").read_text())
    holder = client.get_model_version_by_alias("itmatch-phrases", "champion")
    assert holder.run_id == summaries["embedding"]["run_id"]


def test_the_towers_learned_from_the_crops_and_the_registered_model_scores_the_same_again(runs):
    """The end-to-end run's image tower moved from its initial weights (it learned from the crops,
    not only the heads on top), and its registered version, reloaded from the registry, scores the
    test split through `trainers.evaluate` exactly as the run did."""
    import torch

    tmp, summaries = runs
    summary = summaries["embedding"]
    kept = sorted(p for p in (tmp / "runs" / "embedding").glob("checkpoint_*") if p.is_dir())  # epochs 2 and 3
    older, newer = (torch.load(p / "state.pt", weights_only=False)["model"] for p in (kept[0], kept[-1]))
    tower = [k for k in newer if k.startswith("image_tower.") and newer[k].is_floating_point()]
    assert len(kept) == 2 and tower and any(not torch.equal(older[k], newer[k]) for k in tower)
    out = tmp / "eval.json"
    version = summary["registry"]["version"]
    evaluated = run_module("trainers.evaluate", ["--model", f"models:/itmatch-phrases/{version}", "--tracking-uri",
                                                 "sqlite:///mlruns.db", "--split", "test", "--json", str(out),
                                                 "--pictures", "pics"], tmp, timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert sorted(p.name for p in (tmp / "pics").iterdir()) == ["embedding_map.png", "queries.html"]
    again = json.loads(out.read_text())
    for key in METRICS:
        assert again[key] == pytest.approx(summary["test"][key], abs=1e-6), key
