"""A private `ray start --head` cluster for Ray Jobs tests.

Every port is explicit and free (two clusters on one machine collide on the default agent ports:
"No available agent to submit job"), the session lives in its own temp dir, `python` on the
cluster's PATH is the venv's (a job's entrypoint runs whatever `python` Ray was started with), and
job submission needs no token (RAY_AUTH_MODE=disabled: the dashboard binds 127.0.0.1 only) unless
`auth_token` is given: then the cluster runs with RAY_AUTH_MODE=token and that RAY_AUTH_TOKEN.
Teardown kills the cluster's own process group rather than `ray stop`, which stops every Ray
process of this user on the machine, other people's clusters included.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from fault_tools import kill_group
from ray_cli import ROOT

BIN = Path(sys.executable).parent
PORT_FLAGS = ("--port", "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--metrics-export-port", "--runtime-env-agent-port", "--ray-client-server-port",
              "--node-manager-port", "--object-manager-port")


@dataclass
class Head:
    address: str  # the dashboard (job submission) address
    env: dict

    def ray(self, *args: str, timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextmanager
def ray_head(num_cpus: int = 2, timeout: float = 120, auth_token: Optional[str] = None) -> Iterator[Head]:
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS))))
    temp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled",
           "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    if auth_token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=auth_token)
    cmd = [str(BIN / "ray"), "start", "--head", f"--num-cpus={num_cpus}", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp}",
           *(f"{flag}={port}" for flag, port in ports.items())]
    # A new session: every daemon ray start launches (and every worker) stays in this process group.
    start = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = start.communicate(timeout=timeout)
        if start.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{out[-3000:]}")
        yield Head(address=f"http://127.0.0.1:{ports['--dashboard-port']}", env=env)
    finally:
        start.kill() if start.poll() is None else None
        _kill_group(start.pid)
        shutil.rmtree(temp, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    kill_group(pgid, grace=15)
