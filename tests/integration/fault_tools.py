"""Drive a training command while a test breaks things under it.

`Driver` runs `python -m trainers.train ...` in its own process group with its output in a file
(readable while it runs) and a hard deadline; `wait_until` polls a condition and fails at once,
with the driver's output, if the driver has exited. `held` / `release` talk to the workers'
ITMATCH_HOLD_AT hook (trainers/loop.py): every worker stops right after a given step of a given
epoch, writes its pid, and goes on once the test writes the point's .go file — so "mid-epoch 2"
is a fact the test waits for, not a moment it hopes to hit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ray_cli import ROOT


def hold_env(folder: Path, epoch: int, step: int) -> dict[str, str]:
    """Worker environment that holds every worker after `step` of `epoch` until released."""
    return {"ITMATCH_HOLD_AT": f"{epoch}:{step}", "ITMATCH_HOLD_DIR": str(folder), "ITMATCH_HOLD_TIMEOUT_S": "300"}


class Driver:
    """One `trainers.train` command as a subprocess in its own session (so its local Ray, if it
    starts one, dies with it). `address`: attach to that Ray cluster (RAY_ADDRESS); else a private
    local Ray."""

    def __init__(self, args: list[str], cwd: Path, name: str, env_extra: Optional[dict] = None,
                 address: Optional[str] = None, timeout: float = 300) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", **(env_extra or {})}
        env.pop("RAY_ADDRESS", None)
        if address:
            env["RAY_ADDRESS"] = address
        self.log_path = Path(cwd) / f"{name}.log"
        self.deadline = time.monotonic() + timeout
        self.started = time.monotonic()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "trainers.train", *args], cwd=cwd, env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 6000) -> str:
        return self.output()[-n:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self) -> int:
        """The exit status; past the hard deadline the command is killed and the test fails."""
        try:
            return self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.proc.args[3:]} ran past its deadline:\n{self.tail()}") from None

    def kill(self) -> None:
        kill_group(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


def kill_group(pgid: int, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL, one process group (ours: started with start_new_session)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def wait_until(condition: Callable[[], bool], what: str, timeout: float, driver: Optional[Driver] = None,
               interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if driver is not None and not driver.alive():
            raise AssertionError(f"the driver exited ({driver.proc.returncode}) before {what}:\n{driver.tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:g}s" + (f":\n{driver.tail()}" if driver else ""))
        time.sleep(interval)


def held(folder: Path, epoch: int, step: int, ranks: int, driver: Driver, timeout: float = 180) -> dict[int, int]:
    """Wait until every rank holds after `step` of `epoch`; returns {rank: pid}."""
    files = [folder / f"hold-{epoch}-{step}.rank{r}.pid" for r in range(ranks)]
    wait_until(lambda: all(f.is_file() for f in files), f"hold at epoch {epoch} step {step}", timeout, driver)
    return {r: int(f.read_text()) for r, f in enumerate(files)}


def release(folder: Path, epoch: int, step: int) -> None:
    (folder / f"hold-{epoch}-{step}.go").touch()


def pid_alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as dead)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
