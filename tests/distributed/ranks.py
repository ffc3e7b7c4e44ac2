"""Start one real process per rank of a worker script and wait for all of them under a hard
timeout (a rank stuck in a collective would otherwise hang the suite)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[2]


def run_ranks(worker: Path, world: int, args_for: Callable[[int], list[str]], *, timeout: float,
              env_extra: Optional[dict] = None, cwd: Optional[Path] = None) -> list[str]:
    """Run `python worker *args_for(rank)` for every rank at once; returns each rank's output and
    fails (with the tail of every log) unless all exit 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    procs = [subprocess.Popen([sys.executable, str(worker), *args_for(rank)], env=env, cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-6000:]
    return logs
