"""A standalone one-worker job trains without a Ray Train worker group: by default (`scaling.
worker_group=auto`) in the driver process itself, Ray not even started; with `scaling.worker_group=
task` (the default where the driver attaches to a cluster) inside one Ray task of the job. Either
way: the same weights as the Ray Train job, and the same fault handling -- a failed attempt is
retried (run.max_failures) and resumes from its newest checkpoint in the same MLflow run; out of
retries, the command fails with the error and the run ends FAILED."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ray_cli import ROOT, run_module

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _args(tmp: Path, name: str, *extra: str) -> list[str]:
    return ["--config", "configs/debug.yaml", f"data.source=synthetic:{tmp / 'shapes'}?n_images=120",
            f"data.cache_dir={tmp / 'cache'}", f"run.storage_path={tmp / 'runs'}", f"run.name={name}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'ml.db'}", f"tracking.artifact_location={tmp / 'art'}",
            "tracking.registered_model=", "train.epochs=3", "scaling.num_workers=1", *extra]


def _mlflow_run(tmp: Path, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'ml.db'}")
    runs = client.search_runs([client.get_experiment_by_name("itmatch").experiment_id],
                              filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def _weights(tmp: Path, name: str) -> dict:
    return torch.load(tmp / "runs" / name / "best_model" / "state.pt", weights_only=False)["model"]


def test_failed_attempt_is_retried_resumes_and_matches_the_ray_train_job(tmp_path):
    ray_train = run_module("trainers.train", _args(tmp_path, "rt", "scaling.worker_group=always"), ROOT, timeout=300)
    assert ray_train.returncode == 0, ray_train.stdout[-2000:] + ray_train.stderr[-4000:]
    for name, group in (("task", "task"), ("driver", "auto")):
        done = run_module("trainers.train", _args(tmp_path, name, "run.max_failures=1", f"scaling.worker_group={group}"),
                          ROOT, {"ITMATCH_FAIL_AT_EPOCH": "2"}, timeout=300)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-5000:]
        assert "injected failure after epoch 2" in out and "resumed at epoch 2" in out
        assert "TorchTrainer" not in out and "controller" not in out  # no Ray Train worker group
        assert ("Started a local Ray instance" in out) is (group == "task"), out[-3000:]  # the driver: no Ray
        for key, value in _weights(tmp_path, "rt").items():
            torch.testing.assert_close(_weights(tmp_path, name)[key], value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
        client, run = _mlflow_run(tmp_path, name)  # one run across both attempts
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_rsum")] == [1, 2, 3]
    # The finished run's command again: its summary, nothing trained, logged or registered again
    again = run_module("trainers.train", _args(tmp_path, "driver", "run.max_failures=1", "scaling.worker_group=auto"),
                       ROOT, timeout=300)
    out = again.stdout + again.stderr
    assert again.returncode == 0 and "finished already with this config and data" in out, out[-3000:]
    assert '"best_epoch"' in out and "epoch 1/3" not in out and "test (best epoch" not in out, out[-3000:]
    client, run = _mlflow_run(tmp_path, "driver")
    assert run.info.status == "FINISHED" and len(client.get_metric_history(run.info.run_id, "test_rsum")) == 1


@pytest.mark.parametrize("group", ["auto", "task"])
def test_out_of_retries_the_command_fails_and_the_run_ends_failed(tmp_path, group):
    done = run_module("trainers.train", _args(tmp_path, "fails", "run.max_failures=0", f"scaling.worker_group={group}"),
                      ROOT, {"ITMATCH_FAIL_AT_EPOCH": "2"}, timeout=300)
    assert done.returncode != 0 and "injected failure after epoch 2" in done.stdout + done.stderr
    _, run = _mlflow_run(tmp_path, "fails")
    assert run.info.status == "FAILED"
    assert not (tmp_path / "runs" / "fails" / "summary.json").exists()
    assert (tmp_path / "runs" / "fails" / "checkpoint_000002" / "state.pt").is_file()  # what it had is kept
