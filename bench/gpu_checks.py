"""The GPU checks, prepared to run in one short call on a lent device machine (one GPU; its Python
has torch but no Ray, MLflow or DeepSpeed, and nothing can be fetched there): the trainer's own loop
(`trainers.loop.Trainer`, as a one-worker job runs it in its driver) on CUDA in fp32 and bf16
autocast, heads on frozen features and towers trained end to end from pixels and words, against the
same runs on the CPU where they are cheap. Prints a table; writes it as JSON to $OUT when set.

    make gpu-wheels        # here, once: the wheels the device machine lacks (pydantic's) into .whl/
    # then through the device tool's `run`, carry [".whl"], timeout_s 600:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
        PYTHONPATH=/tmp/site:. python3 bench/gpu_checks.py && python3 bench/mined_loss.py --device cuda && \\
        python3 bench/retrieval_speed.py --device cuda --repeats 3

    .venv/bin/python bench/gpu_checks.py --device cpu --quick   # the script itself, on a CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from itmatch.config import load_config  # noqa: E402
from trainers.dist import local_context  # noqa: E402
from trainers.loop import Trainer  # noqa: E402
from trainers.train import prepare  # noqa: E402

# name -> (overrides, epochs, epochs with --quick): heads on the synthetic shapes' cached features;
# towers from pixels and words (a CNN and a text CNN from scratch: no weights to fetch)
CASES = {
    "heads on features": (["data.source=synthetic:{tmp}/shapes?n_images=1200", "data.batch_size=200",
                           "model.hidden_dim=1024", "model.embed_dim=512"], 10, 2),
    "towers end to end": (["data.source=synthetic:{tmp}/shapes?n_images=600", "data.batch_size=100",
                           "model.image_tower=convnet", "model.image_size=64", "model.text_tower=textcnn",
                           "model.hidden_dim=512", "model.embed_dim=256"], 4, 1),
}
COMMON = ["data.image_encoder=pixels", "data.text_encoder=hashing", "data.cache_dir={tmp}/cache",
          "run.storage_path={tmp}/runs", "tracking.enabled=false", "scaling.num_workers=1", "eval.pictures=false"]


def train(case: str, device: str, precision: str, tmp: Path, quick: bool) -> dict:
    """One run of `case` in this process: val rsum of the last epoch, its steady epoch time, the
    training loss's first and last values, peak GPU memory."""
    overrides, epochs, few = CASES[case]
    keys = [k.format(tmp=tmp) for k in [*COMMON, *overrides]]
    cfg = load_config(None, [*keys, f"train.epochs={few if quick else epochs}", f"scaling.precision={precision}",
                             f"scaling.use_gpu={device == 'cuda'}"])
    cfg, store = prepare(cfg)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer, records = Trainer(cfg, store, local_context(device == "cuda"), None), []
    trainer.fit(lambda metrics, save: records.append({**metrics, "at": time.perf_counter()}))
    steady = [b["at"] - a["at"] for a, b in zip(records, records[1:])] or [records[0]["epoch_time_s"]]
    losses = [r["train_loss"] for r in records]
    return {"case": case, "device": device, "precision": precision, "epochs": len(records),
            "val_rsum": round(records[-1]["val_rsum"], 1), "steady_epoch_s": round(sorted(steady)[len(steady) // 2], 3),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
            "finite": all(math.isfinite(v) for v in losses), "falls": losses[-1] < losses[0],
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="an epoch or two a run: checks the script, not the GPU")
    p.add_argument("--no-cpu-reference", action="store_true", help="skip the CPU runs beside the CUDA ones")
    args = p.parse_args()
    if args.device == "cuda":
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        for case in CASES:
            for precision in ("fp32", "bf16"):
                rows.append(train(case, args.device, precision, tmp, args.quick))
                print(json.dumps(rows[-1]), flush=True)
            if args.device == "cuda" and not args.no_cpu_reference and case == "heads on features":
                rows.append(train(case, "cpu", "fp32", tmp, args.quick))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| case | device | precision | epochs | val rsum | steady epoch, s | loss first -> last | peak GPU MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['device']} | {r['precision']} | {r['epochs']} | {r['val_rsum']} | "
              f"{r['steady_epoch_s']} | {r['loss_first']} -> {r['loss_last']} | {r['peak_gpu_mib'] or '-'} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_checks.json").write_text(json.dumps(rows, indent=2))
    bad = [r for r in rows if not r["finite"]]
    print("non-finite losses: " + (", ".join(f"{r['case']} {r['device']} {r['precision']}" for r in bad) or "none"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
