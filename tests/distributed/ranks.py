"""Start one real process per rank of a worker script and wait for all of them under a hard
timeout (a rank stuck in a collective would otherwise hang the suite); and the debug-preset job
config the strategy tests give those ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[2]


def job_cfg(world: int, *extra: str, **scaling) -> dict:
    """configs/debug.yaml for `world` workers, 3 epochs of 40-caption batches with gradient clipping
    and dropout, `scaling.<key>=<value>` for each keyword, then `extra` overrides; as a plain dict."""
    from itmatch.config import load_config

    overrides = [f"scaling.{k}={v}" for k, v in scaling.items()]
    return load_config(ROOT / "configs" / "debug.yaml",
                       ["train.epochs=3", "data.batch_size=40", "optim.grad_clip=2.0", "model.dropout=0.1",
                        f"scaling.num_workers={world}", *overrides, *extra]).model_dump()


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
