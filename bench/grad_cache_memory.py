"""Gradient caching on the towers (train.grad_cache_chunk): peak memory and time of one training
step (forward + backward) against the chunk size, side by side in one run, on real Flickr8k
images through the end-to-end towers (EfficientNet-lite0 + MiniLM, both trained).

    .venv/bin/python bench/grad_cache_memory.py [--images 32] [--chunks 0 16 8 4] [key=value ...]

Chunk 0 is the one-pass step (no caching). Peak memory is the peak of live tensor storage made
during the step (torch.cuda.max_memory_allocated on a GPU; on a CPU the same quantity, tracked by
bench/mined_loss.py's dispatch mode), the batch excluded. The gradients are the same at every
chunk size (tests/unit/test_grad_cache.py, tests/distributed); this shows what they cost.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from mined_loss import TensorMemory  # noqa: E402  (one definition of the CPU memory tracker)

CONFIG = ["model.image_tower=efficientnet_lite0", "model.text_tower=minilm", "model.image_size=160"]


def step(model, batch, objective, chunk: int) -> None:
    from itmatch.accumulate import cached_step

    if chunk:
        cached_step(model, batch, objective, chunk=chunk)
    else:
        objective(model(batch), batch)["loss"].backward()
    model.zero_grad(set_to_none=True)


def measure(model, batch, objective, chunk: int, device: torch.device) -> tuple[float, float]:
    step(model, batch, objective, chunk)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        step(model, batch, objective, chunk)
        torch.cuda.synchronize()
        return time.perf_counter() - start, (torch.cuda.max_memory_allocated() - base) / 2**20
    start = time.perf_counter()
    step(model, batch, objective, chunk)
    elapsed = time.perf_counter() - start
    with TensorMemory() as tracker:
        step(model, batch, objective, chunk)
    return elapsed, tracker.peak / 2**20


def main() -> None:
    from itmatch.config import load_config
    from itmatch.data.batch import make_batch
    from itmatch.data.raw import prepare_raw
    from itmatch.losses import build_objective
    from itmatch.models import build_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 16, 8, 4])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(None, [*CONFIG, *args.overrides])
    device = torch.device("cuda" if cfg.scaling.use_gpu else "cpu")
    torch.manual_seed(0)
    model = build_model(0, 0, cfg.model).to(device).train()
    with tempfile.TemporaryDirectory() as tmp:
        store = prepare_raw(f"karpathy:{ROOT.parent / 'shared/data/flickr8k-1k/dataset_flickr8k_1k.json'}",
                            cache_dir=tmp, splits=["train"])
        split = store.split("train")
        captions = np.flatnonzero(split.caption_image < args.images)
        batch = make_batch(split, captions, model.image_tower.prepare, model.text_tower.prepare, train=True,
                           rng=np.random.default_rng(0)).to(device)
    objective = build_objective(cfg.loss)
    print(f"| {args.images} images, {len(captions)} captions, {' '.join(CONFIG + args.overrides)}, {device} "
          "| step time (s) | peak memory (MiB) | memory vs one pass |")
    print("|---|---|---|---|")
    base = None
    for chunk in args.chunks:
        elapsed, peak = measure(model, batch, objective, chunk, device)
        base = base or peak
        name = "one pass (no caching)" if chunk == 0 else f"grad_cache_chunk={chunk}"
        print(f"| {name} | {elapsed:.2f} | {peak:.0f} | {peak / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
