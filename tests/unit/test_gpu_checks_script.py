"""bench/gpu_checks.py is prepared for a lent GPU machine whose Python has torch but no Ray, MLflow
or DeepSpeed: it must run there as written. Checked here on the CPU with those three unimportable,
every case shrunk to a few images and one epoch: each run trains, reports finite losses and its row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHRUNK = """
import re, sys
for name in ("ray", "mlflow", "deepspeed"):
    sys.modules[name] = None  # as on the device machine: an import of any of them fails
sys.path.insert(0, "bench")
import gpu_checks
tiny = lambda o: re.sub(r"n_images=\\d+", "n_images=40", re.sub(r"batch_size=\\d+", "batch_size=20", o))
gpu_checks.CASES = {k: ([tiny(o) for o in v[0]], 1, 1) for k, v in gpu_checks.CASES.items()}
sys.argv = ["gpu_checks.py", "--device", "cpu", "--quick"]
sys.exit(gpu_checks.main())
"""


def test_the_gpu_checks_run_without_ray_mlflow_or_deepspeed(tmp_path):
    done = subprocess.run([sys.executable, "-c", SHRUNK], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "OUT": str(tmp_path),
                               "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_checks.json").read_text())
    assert [(r["case"], r["precision"]) for r in rows] == [(c, p) for c in ("heads on features", "towers end to end")
                                                           for p in ("fp32", "bf16")]
    assert all(r["finite"] and r["epochs"] == 1 and r["val_rsum"] > 0 for r in rows)
    assert "| heads on features | cpu | bf16 |" in done.stdout
