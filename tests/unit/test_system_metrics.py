"""`tracking.system_metrics`: each node's CPU, memory, disk and network use reach the run while the
job trains (MLflow's system metrics monitor, started by the node's first worker and stopped when
its training ends), named by node when the job spans nodes; off, nothing is started or logged."""

from __future__ import annotations

import time

import pytest
import torch

from itmatch.config import load_config
from itmatch.data.store import prepare
from trainers import loop
from trainers.dist import WorkerContext
from trainers.loop import Trainer

BASE = ["data.source=x", "data.batch_size=24", "train.epochs=3", "model.hidden_dim=32", "model.embed_dim=16",
        "scaling.num_workers=1"]
CPU = "system/cpu_utilization_percentage"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shapes")
    return prepare(f"synthetic:{tmp / 'shapes'}?n_images=40", cache_dir=tmp / "cache", image_encoder="pixels",
                   text_encoder="hashing", splits=["train", "val", "test"], progress=False)


def _train(store, tracking: dict, *overrides: str, epoch_s: float = 0.0) -> Trainer:
    trainer = Trainer(load_config(None, [*BASE, *overrides]), store, WorkerContext(0, 1, 0, torch.device("cpu")),
                      tracking)
    trainer.fit(lambda metrics, save: time.sleep(epoch_s))
    return trainer


def test_on_a_node_its_samples_reach_the_run_while_it_trains_and_the_monitor_stops_with_it(store, mlflow_run):
    tracking, client = mlflow_run
    trainer = _train(store, tracking, "tracking.system_metrics=true", "tracking.system_metrics_interval_s=1",
                     epoch_s=1.0)  # >= 3 s of training: several 1 s samples
    metrics = client.get_run(tracking["run_id"]).data.metrics
    assert {CPU, "system/system_memory_usage_megabytes", "system/disk_usage_megabytes"} <= set(metrics)
    steps = sorted(m.step for m in client.get_metric_history(tracking["run_id"], CPU))
    assert len(steps) >= 2 and steps == list(range(len(steps)))
    assert 0 <= metrics[CPU] <= 100
    assert trainer.monitor is not None and trainer.monitor._process is None  # joined when fit ended


def test_off_by_default_nothing_is_started_or_logged(store, mlflow_run):
    tracking, client = mlflow_run
    trainer = _train(store, tracking)
    assert trainer.monitor is None
    assert not [k for k in client.get_run(tracking["run_id"]).data.metrics if k.startswith("system/")]


@pytest.mark.parametrize("ctx, node_id", [
    (WorkerContext(0, 2, 0, torch.device("cpu"), 0, 2), None),  # 2 workers on one node
    (WorkerContext(2, 4, 0, torch.device("cpu"), 1, 2), "node1"),  # the second node's first worker
    (WorkerContext(3, 4, 1, torch.device("cpu"), 1, 2), "none"),  # its second: no second monitor
])
def test_one_monitor_per_node_named_by_node_when_the_job_spans_nodes(ctx, node_id, monkeypatch):
    started = []
    monkeypatch.setattr("trainers.tracking.start_system_metrics", lambda tracking, every, node: started.append(node))
    cfg = load_config(None, [*BASE, "tracking.system_metrics=true"])
    loop._system_monitor(cfg, ctx, {"run_id": "r", "tracking_uri": "sqlite:///x.db"})
    assert started == ([] if node_id == "none" else [node_id])
