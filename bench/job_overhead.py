"""What a job and a Tune trial cost beyond their training (issue 13), side by side in one run, on
the Flickr8k-1k precomputed features (`configs/flickr8k_precomp.yaml`):

1. bare PyTorch: the same model, Eq. 6 objective, optimizer, neighborhood sampler and validation
   in a plain loop in this process (all cores), per-epoch wall time (train + validate);
2. the job: `python -m trainers.train --config configs/flickr8k_precomp.yaml` (MLflow on a SQLite
   file) with 2 DDP workers and with the preset's one worker on the paths below -- its steady epoch (the wall time between two consecutive
   epoch records in metrics.jsonl: training, validation, report and checkpoint) and the time
   from the command to its first training step (the first epoch record's time minus its training
   time: an upper bound, it includes epoch 1's validation);
3. the same job as the trials of a search, two in a row (`python -m tuning.search ... --num-samples
   2 --scheduler fifo --max-concurrent 1`): a trial's run (its MLflow run's start to its
   summary.json) against its own training (first step to last epoch).
Jobs run with 2 DDP workers, with 1 through Ray Train (`scaling.worker_group=always`), with 1 inside
a Ray task of the job (`scaling.worker_group=task`: trainers.job.run_job_in_task, the default where
the driver attaches to a cluster), and with 1 in the driver process without starting Ray (the
default for one worker on this machine: trainers.job.run_job_here); trials with 2
workers (a Ray Train worker group) and with one (`search.trial_workers=1`: the trial trains in its
own process, trainers/in_process.py).

Goals (issue 13): steady epoch <= 1.1x the bare loop, command -> first step <= 12 s, a trial's
overhead over its own training <= 20 %.

The bare loop's epoch moves by +-0.1 s from run to run on a shared 2-core VM, as much as the
goal's margin, so it runs three times -- first, between the jobs and the trials, last -- and the
ratios are against the median of the three (the table shows their range).

    .venv/bin/python bench/job_overhead.py [--epochs 12] [--one-worker-trials] [--thread-wait sleep,spin]
        [--tune-loggers on,off] [key=value ...]
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PRESET = "configs/flickr8k_precomp.yaml"
JOB_ALONE = "job, 1 worker in the driver, no Ray (the preset's job)"  # what a one-worker trial runs, alone
JOBS = {"job, 2 DDP workers (Ray Train)": ["scaling.num_workers=2"],
        "job, 1 worker (Ray Train, scaling.worker_group=always)": ["scaling.num_workers=1", "scaling.worker_group=always"],
        "job, 1 worker in a Ray task (scaling.worker_group=task)": ["scaling.num_workers=1", "scaling.worker_group=task"],
        JOB_ALONE: ["scaling.num_workers=1"]}


def tmp_paths(tmp: Path) -> list[str]:
    return [f"run.storage_path={tmp / 'runs'}", f"data.cache_dir={tmp / 'cache'}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlruns.db'}", f"tracking.artifact_location={tmp / 'art'}"]


def bare_loop(cfg, store) -> list[float]:
    """Per-epoch wall times of a plain loop doing the job's steps: sample, batch, forward, loss,
    backward, step; then validate."""
    from itmatch.data.batch import make_batch
    from itmatch.data.batching import NeighborhoodBatchSampler
    from itmatch.eval.evaluate import evaluate_split
    from itmatch.losses import build_objective
    from itmatch.models import build_model
    from itmatch.optim import build_optimizer, param_groups

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(cfg.train.seed)
    heads = cfg.loss.heads
    model = build_model(*store.dims, cfg.model, n_classes=len(store.split("train").image_ids) if heads else 0,
                        heads=heads).train()
    optimizer = build_optimizer(param_groups(model, cfg.optim), cfg.optim)
    objective, split, val = build_objective(cfg.loss), store.split("train"), store.split("val")
    sampler = NeighborhoodBatchSampler(split.caption_image, cfg.data.batch_size, seed=cfg.train.seed)
    prep = (model.image_tower.prepare, model.text_tower.prepare)
    times = []
    for epoch in range(cfg.train.epochs):
        start = time.perf_counter()
        model.train()
        sampler.set_epoch(epoch)
        for step, captions in enumerate(sampler):
            batch = make_batch(split, captions, *prep, train=True, rng=np.random.default_rng([0, epoch, 0, step]),
                               data=cfg.data)
            batch = objective.prepare(batch)
            out = objective(model(batch), batch, epoch=epoch)
            out["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        evaluate_split(model, val, chunk=cfg.train.eval_chunk)
        times.append(time.perf_counter() - start)
    return times


def epoch_records(folder: Path) -> list[dict]:
    """The last record of each epoch in a run folder's metrics.jsonl."""
    records = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["epoch"]] = record
    return [records[k] for k in sorted(records)]


def job_times(records: list[dict], started: float) -> dict[str, float]:
    """Steady epoch (median gap between epoch records after the first), command -> first step,
    and the training span (first step -> last epoch record), in seconds."""
    stamps = [r["timestamp"] / 1000 for r in records]
    first_step = stamps[0] - records[0]["metrics"]["epoch_time_s"]
    return {"steady_epoch": float(np.median(np.diff(stamps))), "first_step": first_step - started,
            "training": stamps[-1] - first_step, "train_only": float(np.median(
                [r["metrics"]["epoch_time_s"] for r in records[1:]]))}


def span_start(db: Path, run_id: str) -> float:
    """When a job's MLflow run started (seconds since the epoch)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{db}").get_run(run_id).info.start_time / 1000


def run_seconds(db: Path, run_id: str, summary: Path) -> float:
    """A job's span: from its MLflow run's start to its summary.json (fit, test, log_model where the
    job logs one). Not the run's end time: a search reopens its chosen trial's run to log its model."""
    return summary.stat().st_mtime - span_start(db, run_id)


def run(args: list[str], timeout: int = 3600, env: dict[str, str] | None = None) -> float:
    """Run a CLI from the repo root (with `env` added to the environment); returns the wall-clock
    time it started at."""
    started = time.time()
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-4000:])
    return started


def measure_job(tmp: Path, name: str, keys: list[str]) -> dict[str, float]:
    """A `trainers.train` run: its epoch times, command -> first step, wall time and MLflow run."""
    job_start = time.perf_counter()
    started = run(["trainers.train", "--config", PRESET, f"run.name={name}", *keys, *tmp_paths(tmp)])
    wall = time.perf_counter() - job_start
    out = job_times(epoch_records(tmp / "runs" / name), started)
    summary = json.loads((tmp / "runs" / name / "summary.json").read_text())
    return {**out, "wall": wall,
            "mlflow_run": run_seconds(tmp / "mlruns.db", summary["run_id"], tmp / "runs" / name / "summary.json")}


def measure_trial(tmp: Path, name: str, keys: list[str], trials: int = 2,
                  env: dict[str, str] | None = None) -> list[dict[str, float]]:
    """The same job as the trials of a FIFO search, `trials` of them one after the other (the later
    ones may find their actor warm): their epoch times, runs and Tune's times, in the order they ran."""
    space = tmp / "space.yaml"
    space.write_text("train.seed: {choice: [0]}\n")  # every trial the same job
    started = run(["tuning.search", "--config", PRESET, "--space", str(space), "--num-samples", str(trials),
                   "--scheduler", "fifo", "--name", name, "--max-concurrent", "1", "search.rerun_top=0",
                   "search.ensemble=false", "search.rerun_per=null", *keys, *tmp_paths(tmp)], env=env)  # the preset's section re-runs seeds
    out = []
    for row in json.loads((tmp / "runs" / name / "search.json").read_text())["trials"]:
        folder = tmp / "runs" / name / "trials" / row["trial_id"]
        times = job_times(epoch_records(folder), started)
        run_start = span_start(tmp / "mlruns.db", row["summary"]["run_id"])  # one lookup for both spans
        out.append({**times, "mlflow_run": (folder / "summary.json").stat().st_mtime - run_start,
                    "tune": row["wall_s"], "to_first_step": times["first_step"] + started - run_start})
    return sorted(out, key=lambda t: t["first_step"])


def main() -> None:
    from itmatch.config import load_config
    from itmatch.data.store import prepare

    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--one-worker-trials", action="store_true",
                        help="only the bare loop and the one-worker trials (a few minutes, not ~12)")
    parser.add_argument("--thread-wait", default="sleep",
                        help="scaling.thread_wait for the one-worker trials; comma-separated settings "
                             "(e.g. sleep,spin,sleep,spin) are measured one after the other")
    parser.add_argument("--tune-loggers", default="on",
                        help="on: Tune's default result loggers (JSON, CSV, TensorBoard) in the search driver; "
                             "off: TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1; comma-separated, paired with --thread-wait")
    parser.add_argument("overrides", nargs="*")
    opts = parser.parse_args()
    keys = [f"train.epochs={opts.epochs}", *opts.overrides]
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        os.chdir(ROOT)  # the preset's data path is relative to the repo root
        cfg = load_config(PRESET, keys)
        store = prepare(cfg.data.source, cache_dir=tmp / "cache", text_encoder=cfg.data.text_encoder,
                        image_encoder=cfg.data.image_encoder, progress=False)
        bares = [float(np.median(bare_loop(cfg, store)[1:]))]
        jobs = {} if opts.one_worker_trials else \
            {what: measure_job(tmp, f"job{k}", [*keys, *extra]) for k, (what, extra) in enumerate(JOBS.items())}
        bares.append(float(np.median(bare_loop(cfg, store)[1:])))
        waits = opts.thread_wait.split(",")
        loggers = opts.tune_loggers.split(",")
        loggers = loggers * len(waits) if len(loggers) == 1 else loggers
        waits = waits * len(loggers) if len(waits) == 1 else waits
        if len(waits) != len(loggers):
            raise SystemExit("--thread-wait and --tune-loggers pair up: give one value or as many as the other")
        sets = ([] if opts.one_worker_trials else [(2, "sleep", "on")]) + [(1, w, lg) for w, lg in zip(waits, loggers)]
        trials = {(n, k, wait, lg): measure_trial(tmp, f"trial{n}-{k}", [*keys, f"search.trial_workers={n}",
                                                                          f"scaling.thread_wait={wait}"], trials=4 - n,
                                                  env={"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"} if lg == "off" else {})
                  for k, (n, wait, lg) in enumerate(sets)}
        bares.append(float(np.median(bare_loop(cfg, store)[1:])))
    steady_bare = float(np.median(bares))
    print(f"| {PRESET}, {' '.join(keys)} | seconds | ratio | goal |")
    print("|---|---|---|---|")
    print(f"| bare loop, steady epoch (train + validate), median of 3 runs ({min(bares):.2f}-{max(bares):.2f}) | "
          f"{steady_bare:.2f} | 1.00 | |")
    for what, job in jobs.items():
        print(f"| {what}, steady epoch (record to record) | {job['steady_epoch']:.2f} | "
              f"{job['steady_epoch'] / steady_bare:.2f} | <= 1.10 |")
        print(f"| {what}, steady epoch's training alone (epoch_time_s) | {job['train_only']:.2f} | "
              f"{job['train_only'] / steady_bare:.2f} | |")
        print(f"| {what}, command -> first step | {job['first_step']:.1f} | | <= 12 s |")
        print(f"| {what}, whole command | {job['wall']:.1f} | | |")
        print(f"| {what}, its run (fit, test, log_model) vs its training {job['training']:.1f} s | "
              f"{job['mlflow_run']:.1f} | +{100 * (job['mlflow_run'] / job['training'] - 1):.0f} % | |")
    for (n, _, wait, lg), runs in trials.items():
        for k, trial in enumerate(runs):
            what = ("trial, 2 workers (Ray Train)" if n > 1 else
                    f"trial, 1 worker in its own process (thread_wait={wait}, Tune loggers {lg})") + \
                (", the first" if k == 0 else ", the next (its actor reused where in-process)")
            print(f"| {what}, steady epoch | {trial['steady_epoch']:.2f} | "
                  f"{trial['steady_epoch'] / steady_bare:.2f} | <= 1.10 |")
            print(f"| {what}, its run (fit, test; no model logged) vs its own training {trial['training']:.1f} s | "
                  f"{trial['mlflow_run']:.1f} | +{100 * (trial['mlflow_run'] / trial['training'] - 1):.0f} % | "
                  "<= +20 % |")
            print(f"| {what}, its run's start -> first step | {trial['to_first_step']:.2f} | | |")
            print(f"| {what}, Tune's time_total_s (the trial's whole span in its process) vs its own training | "
                  f"{trial['tune']:.1f} | +{100 * (trial['tune'] / trial['training'] - 1):.0f} % | |")
            alone = jobs.get(JOB_ALONE)
            if alone and n == 1:  # issue 13: "trial wall time vs the same trainers.train run alone"
                print(f"| {what}, Tune's time_total_s vs the same job run alone (its whole command, "
                      f"{alone['wall']:.1f} s) | | {trial['tune'] / alone['wall']:.2f} | |")

if __name__ == "__main__":
    main()
