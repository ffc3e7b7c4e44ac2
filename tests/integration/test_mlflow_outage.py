"""The MLflow server goes away mid-run and comes back: training goes on, warns that the metrics are
buffered (metrics.jsonl in the run folder), and in the end MLflow holds every epoch's metrics once.

Deterministic, not timing-lucky: every worker holds after the first step of epochs 2 and 3 (the
ITMATCH_HOLD_AT hook in trainers/loop.py). At the first hold epoch 1 has been logged; the test
stops the server and releases the workers, so epoch 2's metrics meet a dead server; at the second
hold that attempt is over; the test starts the server again on the same port and store and
releases them, so epoch 3's logging sends epochs 2 and 3.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fault_tools import Driver, held, hold_env, release
from mlflow_server import MlflowServer
from ray_cli import ROOT


def _logged_through(run: Path) -> int:
    marker = run / "mlflow_logged.json"
    return json.loads(marker.read_text())["epoch"] if marker.is_file() else 0


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_mlflow_server_outage_mid_run(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path / "mlflow")
    run, holds = tmp_path / "runs" / "outage", tmp_path / "holds"
    args = ["--config", str(ROOT / "configs" / "debug.yaml"),
            f"data.source=synthetic:{tmp_path / 'shapes'}?n_images=120", f"data.cache_dir={tmp_path / 'cache'}",
            f"run.storage_path={tmp_path / 'runs'}", "run.name=outage", "run.max_failures=0",
            f"tracking.tracking_uri={server.uri}", f"tracking.artifact_location={tmp_path / 'art'}",
            "tracking.registered_model=", "train.epochs=3", "scaling.num_workers=2"]
    env = {**hold_env(holds, 2, 1), "ITMATCH_HOLD_AT": "2:1,3:1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    driver = None
    try:
        print(f"mlflow server up in {server.start():.1f}s")
        driver = Driver(args, tmp_path, "outage", env_extra=env, timeout=400)
        held(holds, 2, 1, ranks=2, driver=driver)
        assert _logged_through(run) == 1  # epoch 1 is in MLflow
        server.stop()
        down = time.monotonic()
        release(holds, 2, 1)  # epoch 2 ends while the server is down
        held(holds, 3, 1, ranks=2, driver=driver)
        assert _logged_through(run) == 1  # epoch 2's metrics could not be sent ...
        assert [r["epoch"] for r in _records(run)] == [1, 2]  # ... and wait in the run folder
        print(f"mlflow server back up in {server.start():.1f}s, {time.monotonic() - down:.1f}s after it went away")
        release(holds, 3, 1)
        code = driver.wait()
        out = driver.output()
        assert code == 0, out[-6000:]
        print(f"run through the outage: {driver.seconds:.0f}s")
        assert "MLflow unreachable" in out and "metrics.jsonl" in out, out[-6000:]  # the warning: buffered
        assert "MLflow reachable again" in out, out[-6000:]
        assert _logged_through(run) == 3

        summary = json.loads((run / "summary.json").read_text())
        client = MlflowClient(server.uri)
        mlflow_run = client.get_run(summary["run_id"])
        assert mlflow_run.info.status == "FINISHED" and "test_rsum" in mlflow_run.data.metrics
        records = {r["epoch"]: r for r in _records(run)}
        assert sorted(records) == [1, 2, 3]
        for key in ("val_rsum", "train_loss", "epoch", "step"):
            history = client.get_metric_history(summary["run_id"], key)
            assert sorted(m.step for m in history) == [1, 2, 3], (key, history)  # every epoch, once
            for m in history:  # the values and times of the records, also for the two sent late
                assert (m.value, m.timestamp) == (pytest.approx(records[m.step]["metrics"][key]),
                                                  records[m.step]["timestamp"])
    finally:
        if driver is not None:
            driver.kill()
        server.stop()


class LostAnswer:
    """An MLflow client whose server stores a batch and then dies before answering, once."""

    def __init__(self, real) -> None:
        self.real, self.lose_next = real, False

    def log_batch(self, run_id, metrics):
        self.real.log_batch(run_id, metrics=metrics)
        if self.lose_next:
            self.lose_next = False
            import mlflow

            raise mlflow.exceptions.MlflowException("API request failed: Connection aborted (RemoteDisconnected)")


def test_a_batch_stored_but_never_acknowledged_is_not_logged_twice(tmp_path: Path):
    """The resend after a lost answer carries the record's own time: MLflow's store sees an exact
    duplicate and drops it, instead of a second value at the same step."""
    from mlflow.tracking import MlflowClient

    from trainers.metrics_log import MetricsLog

    real = MlflowClient(f"sqlite:///{tmp_path / 'ml.db'}")
    experiment = real.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    run_id = real.create_run(experiment).info.run_id
    client = LostAnswer(real)
    log = MetricsLog({"tracking_uri": "unused", "run_id": run_id, "folder": str(tmp_path / "run")}, client=client)
    log({"val_rsum": 1.0, "epoch_time_s": 0.5}, 1)
    client.lose_next = True
    log({"val_rsum": 2.0, "epoch_time_s": 0.6}, 2)  # stored, but the client saw an error
    time.sleep(0.01)  # the resend happens at a later millisecond
    log({"val_rsum": 3.0, "epoch_time_s": 0.7}, 3)  # resends epoch 2, then sends 3
    for key in ("val_rsum", "epoch_time_s"):
        assert sorted(m.step for m in real.get_metric_history(run_id, key)) == [1, 2, 3], key
