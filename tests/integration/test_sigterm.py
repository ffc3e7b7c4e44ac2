"""SIGTERM to the driver (`ray job stop`, `kill`, a batch scheduler) mid-epoch: the MLflow run ends
KILLED (not RUNNING forever) and the in-process Ray cluster the driver started goes down with it
(no dashboard or agents left behind). For a Ray Train worker group (2 workers), for one worker
training inside the job's Ray task, and for one worker training in the driver (no Ray at all)."""

from __future__ import annotations

import os
import signal

import psutil
import pytest
from fault_tools import Driver, held, hold_env, pid_alive, release, wait_until
from ray_cli import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


@pytest.mark.parametrize("workers, group", [(2, "auto"), (1, "task"), (1, "auto")])
def test_sigterm_ends_the_run_killed_and_takes_its_ray_down(tmp_path, workers, group):
    holds = tmp_path / "holds"
    args = ["--config", str(ROOT / "configs" / "debug.yaml"), f"data.source=synthetic:{tmp_path / 'shapes'}?n_images=120",
            f"data.cache_dir={tmp_path / 'cache'}", f"run.storage_path={tmp_path / 'runs'}", "run.name=term",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'ml.db'}", f"tracking.artifact_location={tmp_path / 'art'}",
            "tracking.registered_model=", "train.epochs=3", f"scaling.num_workers={workers}", "run.max_failures=0",
            f"scaling.worker_group={group}"]
    driver = Driver(args, tmp_path, "term", env_extra=hold_env(holds, 2, 1), timeout=300)
    try:
        held(holds, 2, 1, ranks=workers, driver=driver)  # mid-epoch 2: the workers wait at a known step
        started = [p.pid for p in psutil.Process(driver.proc.pid).children(recursive=True)]
        os.kill(driver.proc.pid, signal.SIGTERM)
        code = driver.wait()
        wait_until(lambda: not any(pid_alive(pid) for pid in started), "the driver's Ray processes to exit", 60)
    finally:
        release(holds, 2, 1)
        if driver.alive():
            driver.kill()
    assert code != 0, driver.tail()  # (Ray's worker-side exit handling reports 1, not 143)
    # it had started its own Ray (raylet, GCS, dashboard, workers), except one worker in the driver
    assert bool(started) is not (workers == 1 and group == "auto")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'ml.db'}")
    runs = client.search_runs([client.get_experiment_by_name("itmatch").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]
    assert (tmp_path / "runs" / "term" / "metrics.jsonl").is_file()  # epoch 1 was kept
