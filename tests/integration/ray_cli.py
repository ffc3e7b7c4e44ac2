"""Run a project CLI the way a user does: a subprocess from the repo's modules, under a hard
timeout (a failed Ray worker start can retry forever), with gloo on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 300


def run_module(module: str, args: list[str], cwd: Path, env_extra: dict | None = None,
               timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)  # always a private local cluster
    if "MLFLOW_TRACKING_URI" not in (env_extra or {}):  # set by an mlflow.set_tracking_uri in this process
        env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
