"""The core library must run without a cluster: importing all of it pulls in no ray/mlflow/deepspeed."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_core_imports_no_cluster_libraries():
    code = (
        "import importlib, pkgutil, sys, itmatch\n"
        "for m in pkgutil.walk_packages(itmatch.__path__, 'itmatch.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('ray', 'mlflow', 'deepspeed', 'trainers'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"core pulled in: {out.stdout}"
