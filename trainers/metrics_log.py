"""Per-epoch metrics that survive a flaky or stopped MLflow server, and are logged once.

Rank 0 appends every epoch's metrics to `<run folder>/metrics.jsonl` first (kept whatever happens
to MLflow), then sends what MLflow has not yet received. While the server is unreachable, the
request fails within a bounded time (MLFLOW_HTTP_REQUEST_TIMEOUT / _MAX_RETRIES are lowered
here unless set), training goes on, a warning says so once, and the epochs wait to be resent at
the next epoch; the driver sends any that are still missing when the run ends (`flush_pending`).
`mlflow_logged.json` in the run folder records the last epoch MLflow has, so epochs replayed after
a recovery (worker restart, driver re-run) are not logged twice. Each record keeps the time it was
made, and a resend carries that time: when a request failed after the server had stored it (the
server went down before answering, a timeout), the resend is an exact duplicate (key, time, step,
value) that MLflow's SQL store drops, rather than a second value at the same step.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from itmatch.files import atomic_write_text

# Bounded: MLflow's defaults (120 s timeout, 7 retries with backoff) hang ~250 s per request.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")

log = logging.getLogger("itmatch.tracking")
LOCAL_FILE = "metrics.jsonl"
MARKER = "mlflow_logged.json"
PROBE_TIMEOUT_S = 2.0


def _logged_through(folder: Path, run_id: str) -> int:
    """The last epoch this MLflow run has (0 when the marker is another run's, absent or unreadable:
    every epoch is then resent, and MLflow drops the exact duplicates)."""
    path = folder / MARKER
    try:
        marker = json.loads(path.read_text()) if path.is_file() else {}
        return int(marker["epoch"]) if marker.get("run_id") == run_id else 0
    except (ValueError, KeyError, TypeError, AttributeError):
        return 0


def _record(line: str) -> Optional[dict[str, Any]]:
    """The line's record, or None unless it is one: an int epoch and metrics of numbers (a value
    MLflow refuses was taken for the server being down, and retried every epoch)."""
    try:
        record = json.loads(line)
        metrics = record["metrics"]
        numbers = isinstance(metrics, dict) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
        return record if isinstance(record["epoch"], int) and numbers else None
    except (ValueError, KeyError, TypeError):
        return None


def _local_epochs(folder: Path, after: int) -> list[tuple[int, dict[str, Any]]]:
    """Epochs after `after` from metrics.jsonl, the last record of each epoch (a replayed epoch's).
    A line that is not a whole record (a write cut short by a kill or a full disk; its epoch was
    not checkpointed, so it is trained and recorded again) is skipped with a warning."""
    path, epochs = folder / LOCAL_FILE, {}
    if path.is_file():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            record = _record(line)
            if record is None:
                if line.strip():
                    log.warning("%s: line %d is not a whole metrics record (a write cut short?): skipped",
                                path, number)
                continue
            if record["epoch"] > after:
                epochs[record["epoch"]] = record
    return sorted(epochs.items())


def _append_line(path: Path, line: str) -> None:
    """Append one line; after a line cut short (no newline at the end) on a new line of its own."""
    with open(path, "a+b") as f:
        cut = False
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        f.write((b"\n" if cut else b"") + line.encode() + b"\n")  # "a": always at the end


class MetricsLog:
    """Rank 0's per-epoch metric writer: local file first, then MLflow, resent until received."""

    def __init__(self, tracking: dict[str, Any], client: Optional[Any] = None) -> None:
        from mlflow.tracking import MlflowClient

        self.run_id, self.folder, self.uri = tracking["run_id"], Path(tracking["folder"]), tracking["tracking_uri"]
        self.client = client or MlflowClient(tracking["tracking_uri"])
        self.folder.mkdir(parents=True, exist_ok=True)
        self.warned = False

    def __call__(self, metrics: dict[str, float], epoch: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        record = {"epoch": epoch, "timestamp": int(time.time() * 1000), "metrics": clean}
        _append_line(self.folder / LOCAL_FILE, json.dumps(record))
        self.flush()

    def flush(self) -> bool:
        """Send every epoch MLflow does not have yet, oldest first; False if MLflow is unreachable."""
        import mlflow

        if self.warned and not self._answers():
            return False  # still down: the epoch waits in metrics.jsonl, training does not
        done = _logged_through(self.folder, self.run_id)
        for epoch, record in _local_epochs(self.folder, done):
            stamp = int(record.get("timestamp") or mlflow.utils.time.get_current_time_millis())  # the record's time
            entries = [mlflow.entities.Metric(k, v, stamp, epoch) for k, v in record["metrics"].items()]
            try:
                self.client.log_batch(self.run_id, metrics=entries)
            except Exception as exc:  # noqa: BLE001 (any transport or server error: keep training)
                if not self.warned:
                    log.warning("MLflow unreachable (%s): epoch %d's metrics are kept in %s and resent when it "
                                "returns", str(exc).splitlines()[0][:200], epoch, self.folder / LOCAL_FILE)
                    self.warned = True
                return False
            atomic_write_text(self.folder / MARKER, json.dumps({"run_id": self.run_id, "epoch": epoch}))
        if self.warned:
            log.warning("MLflow reachable again: every epoch's metrics are logged")
            self.warned = False
        return True


    def _answers(self) -> bool:
        """While the server is known to be down, one short look at it (PROBE_TIMEOUT_S) instead of a
        full request: with its timeout and retries that would stall every epoch of every worker
        (they wait for rank 0) for up to ~35 s against a server that hangs. Non-HTTP stores: True."""
        if not self.uri.startswith(("http://", "https://")):
            return True
        try:
            urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            return True  # something answered
        except (urllib.error.URLError, OSError):
            return False
        return True


def flush_pending(tracking: dict[str, Any]) -> bool:
    """At the end of a run (driver): send epochs the workers could not; False (with a warning naming
    the local file) if MLflow is still unreachable."""
    if "folder" not in tracking:
        return True
    return MetricsLog(tracking).flush()


__all__ = ["MetricsLog", "flush_pending", "LOCAL_FILE", "MARKER"]
