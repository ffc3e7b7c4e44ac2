"""A real `mlflow server` (sqlite store, local artifacts) on a private port, that a test can stop
and start again on the same port and store. Each start runs in its own process group; stopping
kills that group (the server and its uvicorn workers) and waits until the port refuses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from fault_tools import kill_group
from ray_head import _free_ports

BIN = Path(sys.executable).parent


class MlflowServer:
    def __init__(self, folder: Path, port: Optional[int] = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_ports(1)[0]
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> float:
        """Start (again) on the same port and store; returns once /health answers (seconds taken)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        log = open(self.folder / f"server-{self.starts}.log", "w")
        began = time.monotonic()
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            cwd=self.folder, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server not healthy within {timeout:g}s:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        return time.monotonic() - began

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def refuses(self) -> bool:
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", self.port)) != 0

    def stop(self, timeout: float = 30) -> None:
        """Kill the server's process group; returns once nothing listens on the port."""
        if self.proc is None:
            return
        kill_group(self.proc.pid, grace=5)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while not self.refuses():
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {self.port} still answers after the server was stopped")
            time.sleep(0.1)

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.folder.glob("server-*.log")))
