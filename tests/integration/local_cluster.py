"""A multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`), for fault tests.

The head has no CPUs: the driver attaches to it (a driver prefers the head among nodes on its
host) and Ray Train's controller and synchronisation actor follow the driver's node and need no
CPU, so no training worker ever lands there. Each worker node has `worker_cpus` CPUs (default 1),
so with one CPU per training worker each worker gets a node of its own, and removing a node (all
its processes killed, as when a machine is lost) kills exactly one training worker. Every node
runs from this venv with gloo on loopback and `env` in its raylet's environment, which the
training workers it starts inherit (fault-injection hooks).

    with local_cluster(env=...) as cluster:      # head + 2 worker nodes
        driver = Driver(args, tmp, "run", address=cluster.address)
        cluster.remove(cluster.workers[0])       # a node is lost
        cluster.add()                            # the replacement joins
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ray_cli import ROOT
from ray_head import _free_ports

NODE_ENV = {"GLOO_SOCKET_IFNAME": "lo", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}


class LocalCluster:
    def __init__(self, cluster, worker_cpus: int, env: dict[str, str], temp_dir: str) -> None:
        self.cluster, self.worker_cpus, self.env, self.temp_dir = cluster, worker_cpus, env, temp_dir
        self.workers: list = []

    @property
    def address(self) -> str:
        return self.cluster.address  # the GCS address: RAY_ADDRESS for a driver

    def add(self):
        node = self.cluster.add_node(num_cpus=self.worker_cpus, env_vars=self.env, temp_dir=self.temp_dir)
        self.workers.append(node)
        return node

    def remove(self, node) -> list[int]:
        """Lose a node as when its machine dies: every process the raylet started (its workers and
        agents) and the raylet itself are SIGKILLed at once, then the node's other daemons. (Ray's
        own `remove_node` kills only the daemons; orphaned workers would linger until they notice.)
        Returns the pids of the raylet's children that were killed."""
        import psutil

        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        doomed = [raylet, *raylet.children(recursive=True)]
        for proc in doomed:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(doomed, timeout=10)
        self.workers.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)
        return [p.pid for p in doomed[1:]]

    def alive_nodes(self) -> int:
        return len(self.cluster.global_state._live_node_ids())

    def log_marks(self) -> dict[str, int]:
        """How far each of Ray's worker log files has got (for `worker_logs(since=...)`)."""
        return {str(f): f.stat().st_size for f in Path(self.temp_dir).glob("session_*/logs/worker-*")}

    def worker_logs(self, since: Optional[dict[str, int]] = None) -> str:
        """What Ray's worker processes on every node (they share this temp dir) wrote after `since`,
        straight from their log files: the copy forwarded to the driver can miss lines."""
        since = since or {}
        out = []
        for f in sorted(Path(self.temp_dir).glob("session_*/logs/worker-*")):
            with open(f, "rb") as fh:
                fh.seek(since.get(str(f), 0))
                out.append(fh.read().decode(errors="replace"))
        return "".join(out)


@contextmanager
def local_cluster(workers: int = 2, worker_cpus: int = 1, env: Optional[dict[str, str]] = None,
                  head_cpus: int = 0) -> Iterator[LocalCluster]:
    from ray.cluster_utils import Cluster

    env = {**NODE_ENV, **(env or {})}
    temp = tempfile.mkdtemp(prefix="raymn", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS",)}
    os.environ.pop("RAY_ADDRESS", None)
    cluster = None
    try:
        # Every head port explicit and free: Ray's defaults (GCS 6379, dashboard agent 52365, ...)
        # collide with any other Ray on this machine. Worker nodes pick their own.
        # The dashboard serves the State API, which Ray Train's placement-group cleaner polls (without
        # it, it warns every second and never exits).
        ports = dict(zip(("gcs_server_port", "dashboard_port", "dashboard_agent_listen_port", "metrics_export_port",
                          "runtime_env_agent_port", "ray_client_server_port"), _free_ports(6)))
        cluster = Cluster(initialize_head=True, connect=False, head_node_args={
            "num_cpus": head_cpus, "env_vars": env, "temp_dir": temp, "include_dashboard": True,
            "dashboard_host": "127.0.0.1", **ports})
        local = LocalCluster(cluster, worker_cpus, env, temp)
        for _ in range(workers):
            local.add()
        cluster.wait_for_nodes(timeout=60)
        yield local
    finally:
        if cluster is not None:
            cluster.shutdown()
        for key, value in saved.items():
            if value is not None:
                os.environ[key] = value
        shutil.rmtree(temp, ignore_errors=True)
