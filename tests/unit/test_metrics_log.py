"""Per-epoch metrics through an MLflow outage: kept locally, resent in order when the server is
back, a warning once, never logged twice after a replay (trainers/metrics_log.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from trainers.metrics_log import LOCAL_FILE, MetricsLog, flush_pending


class Flaky:
    """An MLflow client whose server is down while `down` is true."""

    def __init__(self, real: MlflowClient) -> None:
        self.real, self.down, self.calls = real, False, 0

    def log_batch(self, run_id, metrics):
        self.calls += 1
        if self.down:
            raise mlflow.exceptions.MlflowException("API request to http://mlflow:5000 failed: Connection refused")
        self.real.log_batch(run_id, metrics=metrics)


def _steps(client: MlflowClient, run_id: str, key: str = "val_rsum") -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)]


def test_an_outage_keeps_training_and_every_epoch_arrives_once(mlflow_run, caplog):
    tracking, client = mlflow_run
    flaky = Flaky(client)
    logger = MetricsLog(tracking, client=flaky)
    logger({"val_rsum": 1.0}, 1)
    flaky.down = True
    with caplog.at_level(logging.WARNING, logger="itmatch.tracking"):
        logger({"val_rsum": 2.0}, 2)
        logger({"val_rsum": 3.0}, 3)
    warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1 and LOCAL_FILE in warnings[0]
    assert _steps(client, tracking["run_id"]) == [(1, 1.0)]
    flaky.down = False
    logger({"val_rsum": 4.0}, 4)
    assert _steps(client, tracking["run_id"]) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    lines = [json.loads(x) for x in (Path(tracking['folder']) / LOCAL_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]


def test_replayed_epochs_after_a_restart_are_not_logged_twice(mlflow_run):
    tracking, client = mlflow_run
    MetricsLog(tracking)({"val_rsum": 1.0}, 1)
    MetricsLog(tracking)({"val_rsum": 2.0}, 2)
    restarted = MetricsLog(tracking)  # a worker restarted from the epoch-1 checkpoint replays epoch 2
    restarted({"val_rsum": 2.0}, 2)
    restarted({"val_rsum": 3.0}, 3)
    assert [s for s, _ in _steps(client, tracking["run_id"])] == [1, 2, 3]


def test_a_record_cut_short_by_a_kill_does_not_stop_the_resumed_run(mlflow_run, caplog):
    """A kill (or a full disk) mid-append leaves a partial last line and, maybe, a torn marker: the
    resumed run skips the partial line with a warning, writes its next record on a line of its own,
    and every epoch still reaches MLflow once."""
    tracking, client = mlflow_run
    MetricsLog(tracking)({"val_rsum": 1.0}, 1)
    folder = Path(tracking["folder"])
    with open(folder / LOCAL_FILE, "a") as f:
        f.write('{"epoch": 2, "timestamp": 17, "metr')  # epoch 2's record, cut short; not checkpointed
    (folder / "mlflow_logged.json").write_text('{"run_id": "')  # a marker torn the same way
    resumed = MetricsLog(tracking)
    with caplog.at_level(logging.WARNING, logger="itmatch.tracking"):
        resumed({"val_rsum": 2.5}, 2)  # epoch 2 trained again
        resumed({"val_rsum": 3.0}, 3)
    assert _steps(client, tracking["run_id"]) == [(1, 1.0), (2, 2.5), (3, 3.0)]
    lines = (folder / LOCAL_FILE).read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines[:1] + lines[2:]] == [1, 2, 3] and lines[1].endswith('"metr')
    assert any(f"{LOCAL_FILE}: line 2 is not a whole metrics record" in r.getMessage() for r in caplog.records)


def test_a_record_holding_no_number_is_skipped_not_taken_for_an_outage(mlflow_run, caplog):
    """MLflow refused its value, which was taken for the server being down: every later epoch
    warned "MLflow unreachable" and was kept back, the run's metrics never logged again."""
    tracking, client = mlflow_run
    MetricsLog(tracking)({"val_rsum": 1.0}, 1)
    folder = Path(tracking["folder"])
    with open(folder / LOCAL_FILE, "a") as f:
        f.write(json.dumps({"epoch": 2, "timestamp": 17, "metrics": {"val_rsum": "abc"}}) + "\n")
    resumed = MetricsLog(tracking)
    with caplog.at_level(logging.WARNING, logger="itmatch.tracking"):
        resumed({"val_rsum": 2.5}, 2)
        resumed({"val_rsum": 3.0}, 3)
    assert _steps(client, tracking["run_id"]) == [(1, 1.0), (2, 2.5), (3, 3.0)] and not resumed.warned
    assert not any("unreachable" in r.getMessage() for r in caplog.records)
    assert any(f"{LOCAL_FILE}: line 2 is not a whole metrics record" in r.getMessage() for r in caplog.records)


def test_the_driver_sends_what_the_workers_could_not(mlflow_run):
    tracking, client = mlflow_run
    flaky = Flaky(client)
    flaky.down = True
    MetricsLog(tracking, client=flaky)({"val_rsum": 5.0}, 1)  # the last epoch, while MLflow is down
    assert _steps(client, tracking["run_id"]) == []
    assert flush_pending(tracking)  # the server is back when the run ends
    assert _steps(client, tracking["run_id"]) == [(1, 5.0)]


def test_while_the_server_is_down_an_epoch_costs_one_short_look_not_a_request(mlflow_run, monkeypatch):
    """A server that is down (here: nothing listens on the port) is probed with one short request
    per epoch; the full logging request, with its timeout and retries, waits until it answers."""
    import socket

    import trainers.metrics_log as ml

    tracking, client = mlflow_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connection refused
    flaky = Flaky(client)
    logger = MetricsLog({**tracking, "tracking_uri": f"http://127.0.0.1:{port}"}, client=flaky)
    flaky.down = True
    logger({"val_rsum": 1.0}, 1)  # the first failure is a real request: that is how it is found down
    assert flaky.calls == 1 and logger.warned
    logger({"val_rsum": 2.0}, 2)
    logger({"val_rsum": 3.0}, 3)
    assert flaky.calls == 1  # no more full requests while nothing answers
    flaky.down = False
    monkeypatch.setattr(ml.MetricsLog, "_answers", lambda self: True)  # the server is back
    logger({"val_rsum": 4.0}, 4)
    assert _steps(client, tracking["run_id"]) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert not logger.warned
