"""Real-data check: train the preset on Flickr8k-1k precomputed features through the real CLI
(the preset's one worker, trained in the driver), then print the test metrics beside CCA: the data README's number and the
project's CCA (model.name=cca) measured in the same run.

    .venv/bin/python bench/flickr8k_precomp.py [--seeds 0 1 2] [extra key=value overrides]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CCA = {"i2t_r1": 41.0, "i2t_r5": 67.0, "i2t_r10": 82.0, "t2i_r1": 35.2, "t2i_r5": 71.6, "t2i_r10": 86.0, "rsum": 382.8}
KEYS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]


def run(name: str, overrides: list[str], tmp: Path) -> tuple[dict, float]:
    args = [sys.executable, "-m", "trainers.train", "--config", "configs/flickr8k_precomp.yaml",
            f"run.storage_path={tmp / 'runs'}", f"run.name={name}", f"data.cache_dir={tmp / 'cache'}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlruns.db'}", f"tracking.artifact_location={tmp / 'art'}",
            *overrides]
    start = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-4000:])
    return json.loads((tmp / "runs" / name / "summary.json").read_text()), elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        # The README's CCA re-measured through the same CLI (model.name=cca: fitted, not trained)
        summary, elapsed = run("bench-cca", ["model.name=cca", "model.embed_dim=128", "model.cca_ridge=0.3"],
                               Path(folder))
        rows.append(("CCA, itmatch (model.name=cca, 128 dims, ridge 0.3)", summary["test"], elapsed))
        for seed in args.seeds:
            summary, elapsed = run(f"bench-seed{seed}", [f"train.seed={seed}", *args.overrides], Path(folder))
            rows.append((f"two-branch, seed {seed} (best epoch {summary['best_epoch']})", summary["test"], elapsed))
    cca_here = rows[0][1]["rsum"]
    print("| method (test split, 100 images / 500 captions) | i2t R@1/5/10 | t2i R@1/5/10 | rsum "
          "| rsum / CCA (README) | rsum / CCA (this run) | wall time |")
    print("|---|---|---|---|---|---|---|")
    print(f"| CCA (data README) | {CCA['i2t_r1']}/{CCA['i2t_r5']}/{CCA['i2t_r10']} | "
          f"{CCA['t2i_r1']}/{CCA['t2i_r5']}/{CCA['t2i_r10']} | {CCA['rsum']} | 1.000 | - | - |")
    for name, m, elapsed in rows:
        print(f"| {name} | {m['i2t_r1']:.1f}/{m['i2t_r5']:.1f}/{m['i2t_r10']:.1f} | "
              f"{m['t2i_r1']:.1f}/{m['t2i_r5']:.1f}/{m['t2i_r10']:.1f} | {m['rsum']:.1f} | "
              f"{m['rsum'] / CCA['rsum']:.3f} | {m['rsum'] / cca_here:.3f} | {elapsed:.0f} s |")


if __name__ == "__main__":
    main()
