"""`python -m tuning.ablation TABLE` through the real path: every (row, seed) a one-worker job trained
inside its Ray task (as a one-worker search trial is) with its own folder and nested MLflow run, the
table as Markdown + JSON in the folder and the parent run.
Its second row is closed-form CCA (`model.name=cca`): one fit instead of epochs through the same
job, checkpoint, test evaluation and evaluate CLI as the trained network."""

from __future__ import annotations

import json

import pytest
import yaml
from ray_cli import ROOT, run_module

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
DEBUG_DATA = yaml.safe_load((ROOT / "configs" / "debug.yaml").read_text())["data"]["source"]  # relative to ROOT


def test_ablation_table_command(tmp_path):
    table = tmp_path / "table.yaml"
    table.write_text("config: configs/debug.yaml\nseeds: [0, 1]\noverrides: {train.epochs: 1, scaling.num_workers: 1}\n"
                     "rows:\n  full: {}\n  cca: {model.name: cca, model.embed_dim: 16}\n")
    args = [str(table), "--name", "abl", "--max-concurrent", "2", f"data.cache_dir={tmp_path / 'cache'}",
            f"run.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'ml.db'}",
            f"tracking.artifact_location={tmp_path / 'art'}"]
    done = run_module("tuning.ablation", args, ROOT, timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    folder = tmp_path / "runs" / "abl"
    result = json.loads((folder / "ablation.json").read_text())
    assert [r["row"] for r in result["rows"]] == ["full", "cca"]
    assert all(r["seeds"] == 2 and r["failed"] == 0 for r in result["rows"])
    for row in result["rows"]:  # the table's numbers are the runs' own summaries
        runs = [r for r in result["runs"] if r["trial_id"] == row["row"]]
        sums = [json.loads((folder / "runs" / r["run"] / "summary.json").read_text())["test"]["rsum"] for r in runs]
        assert row["rsum"][0] == pytest.approx(sum(sums) / 2)
    assert "| cca | `model.name=cca`, `model.embed_dim=16` | 2 |" in (folder / "ablation.md").read_text()
    cca = json.loads((folder / "runs" / "cca-seed1" / "summary.json").read_text())
    assert cca["best_epoch"] == 1 and cca["test"]["rsum"] > 100  # fitted once; far above chance on shapes
    out = tmp_path / "cca.json"
    evaluated = run_module("trainers.evaluate", ["--model", cca["best_checkpoint"], "--data", DEBUG_DATA, "--split",
                                                 "test", "--json", str(out), "--cache-dir", str(tmp_path / "cache")],
                           ROOT)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(out.read_text())["rsum"] == pytest.approx(cca["test"]["rsum"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'ml.db'}")
    runs = client.search_runs([client.get_experiment_by_name("itmatch").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("itmatch.ablation") == "abl")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert all(r.info.status == "FINISHED" for r in children)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ablation.md", "ablation.json"} <= artifacts
