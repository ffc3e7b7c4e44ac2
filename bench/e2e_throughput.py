"""End-to-end training throughput, measured side by side in one run (images/s: the training split's
images, each with its captions, per second of an epoch; an image whose captions fall into several
batches still counts once per epoch):

1. bare PyTorch: the same towers, branches and Eq. 6 loss in a plain loop in this process, batches
   prepared in process (decode, augment, tokenise), one process using every core;
2. the training job: `python -m trainers.train` with the same config through Ray Train (2 DDP
   workers sharing the machine), its steady epochs (the first, which pays start-up, left out);
3. the Ray Data input pipeline alone (`data.loader=ray`, no training): how fast it prepares batches.

    .venv/bin/python bench/e2e_throughput.py [--images 120] [--epochs 3] [key=value ...]

On a GPU machine pass scaling.use_gpu=true with scaling.num_workers at most its GPUs (the bare loop
then runs on cuda:0, in bf16 autocast as the job does with scaling.precision=bf16; its timings
synchronise the GPU first).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "flickr8k-1k"
CONFIG = ["model.image_tower=efficientnet_lite0", "model.text_tower=minilm", "data.batch_size=100",
          "model.image_train_last=3", "model.text_train_last=2", "model.image_size=160", "train.log_every=1000"]


def subset(tmp: Path, n_train: int) -> str:
    images = json.loads((DATA / "dataset_flickr8k_1k.json").read_text())["images"]
    keep = [im for split, n in (("train", n_train), ("val", 20), ("test", 20))
            for im in [i for i in images if i["split"] == split][:n]]
    (tmp / "data.json").write_text(json.dumps({"dataset": "flickr8k", "images": keep}))
    return f"karpathy:{tmp / 'data.json'}:{DATA / 'images'}"


def bare_loop(cfg, store, epochs: int) -> float:
    """Images/s of a plain loop: sampler, batch preparation, forward, loss, backward, step."""
    from itmatch.data.batch import make_batch
    from itmatch.data.batching import NeighborhoodBatchSampler
    from itmatch.losses import build_objective
    from itmatch.models import build_model
    from itmatch.optim import build_optimizer, param_groups

    device = torch.device("cuda" if cfg.scaling.use_gpu else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    model = build_model(0, 0, cfg.model).to(device).train()
    optimizer = build_optimizer(param_groups(model, cfg.optim), cfg.optim)
    objective, split = build_objective(cfg.loss), store.split("train")
    sampler = NeighborhoodBatchSampler(split.caption_image, cfg.data.batch_size, seed=0)
    prep = (model.image_tower.prepare, model.text_tower.prepare)
    bf16 = cfg.scaling.precision == "bf16"  # the job's strategy autocasts the forward (trainers/strategies.py)
    start = None
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        if epoch == 1:  # the first epoch warms up (allocator, first-call costs): not timed
            start = _now(device)
        for step, captions in enumerate(sampler):
            batch = make_batch(split, captions, *prep, train=True, rng=np.random.default_rng([0, epoch, 0, step]))
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = objective(model(batch), batch)
            out["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return len(split.image_ids) * (epochs - 1) / (_now(device) - start)


def _now(device: torch.device) -> float:
    """The time once the GPU's queued work is done (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def training_job(tmp: Path, source: str, epochs: int, extra: list[str]) -> float:
    """Images/s of the job's steady epochs (epoch_time_s from its history)."""
    args = [sys.executable, "-m", "trainers.train", f"data.source={source}", *CONFIG, f"train.epochs={epochs}",
            f"run.storage_path={tmp / 'runs'}", "run.name=bench", f"data.cache_dir={tmp / 'cache'}",
            "tracking.enabled=false", *extra]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-4000:])
    from itmatch.state import load_checkpoint

    latest = sorted(p for p in (tmp / "runs" / "bench").glob("checkpoint_*") if p.is_dir())[-1]
    history = load_checkpoint(latest)[0]["train_state"].history
    images = json.loads(Path(source.split(":")[1]).read_text())["images"]
    n_train = sum(im["split"] == "train" for im in images)
    steady = [h["epoch_time_s"] for h in history[1:]]
    return n_train / (sum(steady) / len(steady))


def ray_pipeline(cfg, store, epochs: int) -> float:
    """Images/s of the Ray Data loader alone, draining the batches of `epochs` epochs."""
    import ray

    from itmatch.data.batching import NeighborhoodBatchSampler
    from itmatch.models import build_model
    from trainers.input_pipeline import ray_batches

    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    model = build_model(0, 0, cfg.model)
    split = store.split("train")
    sampler = NeighborhoodBatchSampler(split.caption_image, cfg.data.batch_size, seed=0)
    start = time.perf_counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        plan = [(sampler.state.offset - 1, c) for c in sampler]
        for _ in ray_batches(str(store.root), "train", plan, (model.image_tower.prepare, model.text_tower.prepare),
                             seed=0, epoch=epoch, rank=0, actors=cfg.data.loader_actors,
                             prefetch=cfg.data.prefetch_batches):
            pass
    elapsed = time.perf_counter() - start
    ray.shutdown()
    return len(split.image_ids) * epochs / elapsed


def _layout(cfg) -> str:
    from trainers.in_process import can_run, in_driver

    if in_driver(cfg):
        return "1 worker in its driver, no Ray"
    if can_run(cfg):
        return "1 worker in a Ray task"
    return f"Ray Train, {cfg.scaling.num_workers} {dict(ddp='DDP', deepspeed='DeepSpeed')[cfg.scaling.strategy]} workers"


def main() -> None:
    from itmatch.config import load_config
    from itmatch.data.raw import prepare_raw

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=120, help="training images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        source = subset(tmp, args.images)
        cfg = load_config(None, [f"data.source={source}", *CONFIG, *args.overrides])
        store = prepare_raw(source, cache_dir=tmp / "cache")
        rows = [("bare PyTorch loop (1 process, all cores)", bare_loop(cfg, store, args.epochs)),
                (f"training job (trainers.train, {_layout(cfg)})",
                 training_job(tmp, source, args.epochs, args.overrides))]
        rows.append(("Ray Data input pipeline alone (data.loader=ray)", ray_pipeline(cfg, store, args.epochs)))
    bare = rows[0][1]
    print(f"| {args.images} training images, {' '.join(CONFIG + args.overrides)} | images/s | vs bare loop |")
    print("|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.2f} | {rate / bare:.2f} |")


if __name__ == "__main__":
    main()
