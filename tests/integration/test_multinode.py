"""Faults on a multi-node Ray cluster on one machine: a head (driver, Ray Train's controller) and
two worker nodes of one CPU each, so each of the run's 2 training workers has a node of its own.

Both faults strike mid-epoch 2, after epoch 1's checkpoint was reported: every worker holds right
after epoch 2's first optimizer step (the ITMATCH_HOLD_AT hook in trainers/loop.py) until the test
has struck. A worker node is lost (all its processes SIGKILLed) and a replacement joins, or one
training worker is SIGKILLed. Ray Train (run.max_failures=1) restarts the worker group, which
resumes from epoch 1's checkpoint within the same command, and the run ends with the weights and
per-epoch metrics of an uninterrupted run with the same seed on the same cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from fault_tools import Driver, held, hold_env, pid_alive, release, wait_until
from local_cluster import local_cluster
from ray_cli import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
EPOCH, STEP = 2, 1  # the hold: right after epoch 2's first optimizer step (of 11)
# Ray Train's controller polls workers every 2 s by default: each epoch's report and the detection
# of a dead worker wait for that poll. Faster polls change nothing in the numbers, only the wall time.
FAST_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def _args(tmp: Path, name: str) -> list[str]:
    return [
        "--config", str(ROOT / "configs" / "debug.yaml"),
        f"data.source=synthetic:{tmp / 'shapes'}?n_images=120", f"data.cache_dir={tmp / 'cache'}",
        f"run.storage_path={tmp / 'runs'}", f"run.name={name}", "run.max_failures=1",
        "tracking.enabled=false", "train.epochs=3", "scaling.num_workers=2",
    ]


def _final_state(run: Path) -> dict:
    checkpoints = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    return torch.load(checkpoints[-1] / "state.pt", weights_only=False)


def _metrics(state: dict) -> list[dict]:
    """The checkpoint's per-epoch metrics history, without wall-clock times."""
    return [{k: v for k, v in h.items() if not k.endswith("_time_s")} for h in state["train_state"]["history"]]


def _assert_same_run(run: Path, reference: dict) -> None:
    state = _final_state(run)
    assert state["train_state"]["epoch"] == 3 and state["train_state"]["step"] == reference["train_state"]["step"]
    got, want = _metrics(state), _metrics(reference)
    assert [h["epoch"] for h in got] == [1, 2, 3]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (g["epoch"], key)
    for key, value in reference["model"].items():
        torch.testing.assert_close(state["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def _ray_lists_epoch(run: Path, epoch: int) -> bool:
    """Ray Train's checkpoint manager has registered the checkpoint of `epoch` (it registers a
    report asynchronously, at the controller's next poll)."""
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False
    return any(r["metrics"].get("epoch") == epoch for r in snapshot.get("checkpoint_results", []))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multinode")


@pytest.fixture(scope="module")
def cluster(tmp):
    start = time.monotonic()
    with local_cluster(workers=2, env=hold_env(tmp / "holds", EPOCH, STEP)) as c:
        print(f"cluster of {c.alive_nodes()} nodes up in {time.monotonic() - start:.0f}s")
        yield c


def _holds(tmp: Path, released: bool = False) -> Path:
    """The cluster's hold folder, emptied (armed for the next run) or released in advance."""
    folder = tmp / "holds"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    if released:
        release(folder, EPOCH, STEP)
    return folder


@pytest.fixture(scope="module")
def reference(tmp, cluster) -> dict:
    """The uninterrupted run: the same command on the same cluster, the hold released in advance."""
    _holds(tmp, released=True)
    driver = Driver(_args(tmp, "straight"), tmp, "straight", env_extra=FAST_POLL, address=cluster.address)
    try:
        assert driver.wait() == 0, driver.tail()
    finally:
        driver.kill()
    print(f"uninterrupted run: {driver.seconds:.0f}s")
    return _final_state(tmp / "runs" / "straight")


def _finish(driver: Driver, cluster, marks: dict, what: str) -> str:
    """Wait for the command; it must succeed, its workers having resumed from epoch 1's checkpoint
    (a restart from scratch would end with the same weights too: the log tells them apart)."""
    try:
        code = driver.wait()
    finally:
        driver.kill()
    log = driver.output()
    assert code == 0, log[-6000:]
    workers = cluster.worker_logs(since=marks)
    for rank in (0, 1):  # both ranks of the new group
        assert f"rank {rank} resumed at epoch 1, step 11," in workers, workers[-6000:]
    print(f"{what}: {driver.seconds:.0f}s")
    return workers


def test_node_lost_mid_epoch_and_replaced_resumes_exactly(tmp, reference, cluster):
    holds, run = _holds(tmp), tmp / "runs" / "node-lost"
    marks = cluster.log_marks()
    driver = Driver(_args(tmp, "node-lost"), tmp, "node-lost", env_extra=FAST_POLL, address=cluster.address)
    try:
        pids = held(holds, EPOCH, STEP, ranks=2, driver=driver)
        wait_until(lambda: _ray_lists_epoch(run, 1), "epoch 1's checkpoint registered by Ray Train", 60, driver)
        killed = cluster.remove(cluster.workers[0])  # the machine is gone, with the training worker on it
        lost = [rank for rank, pid in pids.items() if pid in killed]
        assert len(lost) == 1 and not pid_alive(pids[lost[0]]), f"one training worker per node: {pids}, {killed}"
        cluster.add()  # the replacement (an autoscaler's job on a real cluster)
        release(holds, EPOCH, STEP)
    except BaseException:
        driver.kill()
        raise
    workers = _finish(driver, cluster, marks, "node lost and replaced")
    assert "newer than or in place of the checkpoint Ray lists" not in workers  # Ray's own checkpoint
    _assert_same_run(run, reference)


def test_worker_sigkilled_mid_epoch_resumes_exactly(tmp, reference, cluster):
    holds = _holds(tmp)
    marks = cluster.log_marks()
    driver = Driver(_args(tmp, "sigkill"), tmp, "sigkill", env_extra=FAST_POLL, address=cluster.address)
    try:
        pids = held(holds, EPOCH, STEP, ranks=2, driver=driver)
        os.kill(pids[0], signal.SIGKILL)  # rank 0, the one that writes checkpoints, mid-epoch
        wait_until(lambda: not pid_alive(pids[0]), "end of the killed worker", 30)
        release(holds, EPOCH, STEP)
    except BaseException:
        driver.kill()
        raise
    # No wait for Ray to register epoch 1's report here: whether the controller had polled it or
    # not before the kill, the restarted workers resume from it (from the run folder if Ray lists none).
    _finish(driver, cluster, marks, "worker SIGKILLed")
    _assert_same_run(tmp / "runs" / "sigkill", reference)


def test_a_one_worker_job_holds_one_nodes_cpus(tmp, cluster):
    """A one-worker job trains in one Ray task. It asked for the cluster's CPUs (2, over two nodes)
    in that one task, which no node holds: Ray waited forever. Now it asks for one node's."""
    _holds(tmp, released=True)
    args = [a for a in _args(tmp, "one-worker") if a != "scaling.num_workers=2"] + ["scaling.num_workers=1",
                                                                                     "train.epochs=1"]
    driver = Driver(args, tmp, "one-worker", address=cluster.address, timeout=240)
    try:
        code = driver.wait()
    finally:
        driver.kill()
    assert code == 0, driver.tail()
    assert (tmp / "runs" / "one-worker" / "summary.json").is_file()
