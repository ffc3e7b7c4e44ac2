"""One worker without a Ray Train worker group: a job that trains in the calling process (a
standalone job's driver, its Ray task, a Tune trial's process).

A one-worker Tune trial (or seed re-run) is already a Ray actor that Tune placed with the resources
its worker needs. Starting a Ray Train controller, its helper actors and a worker process inside it
costs 15-25 s per trial on a 2-core machine, and every epoch's report waits for the controller's
poll (BENCHMARKS.md, "What a job and a trial cost"). Here the same `Trainer` runs in the caller's
process instead; what Ray Train does for it is done the same way:
- checkpoints land in the run folder (`run.storage_path/run.name/checkpoint_NNNNNN`), each written
  to a temporary folder and renamed, the newest `run.keep_checkpoints` kept;
- a restarted job resumes from the newest intact checkpoint there (trainers.loop._resume);
- every epoch's metrics (and, for PBT, its checkpoint) go to `forward`, e.g. `ray.tune.report`.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from itmatch.config import Config
from itmatch.data.store import FeatureStore
from itmatch.files import replace_folder
from itmatch.state import CHECKPOINT_PREFIX

# (metrics, checkpoint folder or None) -> None
Forward = Callable[[dict[str, Any], Optional[Path]], None]


def no_reports(metrics: dict[str, Any], checkpoint: Optional[Path]) -> None:
    """The `forward` of a job nobody follows epoch by epoch (a standalone job, a seed re-run): its
    epochs are in metrics.jsonl and MLflow, its result is its summary."""


def can_run(cfg: Config) -> bool:
    """One DDP worker: nothing to all-reduce, no process group (DeepSpeed's engine needs one), unless
    scaling.worker_group=always asks for Ray Train's worker group anyway."""
    s = cfg.scaling
    return s.num_workers == 1 and s.strategy == "ddp" and s.worker_group != "always"


def in_driver(cfg: Config) -> bool:
    """Whether a standalone one-worker job trains in the driver process itself, without starting
    Ray: scaling.worker_group=auto, no cluster to attach to (run.ray_address, RAY_ADDRESS: `ray job
    submit` sets it), and nothing else that needs Ray (data.loader, data.featurize local). Ray would
    only be a private cluster started to run one task on this machine (~8 s of the command's start
    on 2 cores); what it adds there, surviving a native crash of the training process, a re-run of
    the same command gives too (it resumes from the newest checkpoint)."""
    d = cfg.data
    attached = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    return (can_run(cfg) and cfg.scaling.worker_group == "auto" and not attached and d.loader == "local"
            and d.featurize == "local")


def held_resources(cfg: Config, cpus: float) -> Optional[dict[str, float]]:
    """What the Ray actor or task running `cfg` must hold: its one worker's CPUs (and GPU) when it
    trains in process; None when it only drives a Ray Train worker group (which must not wait for a
    CPU its own driver holds)."""
    if not can_run(cfg):
        return None
    return {"CPU": cpus, "GPU": 1 if cfg.scaling.use_gpu else 0}


@dataclass
class LocalCheckpoint:
    """What `trainers.results.best_checkpoint_folder` reads of a Ray Train Checkpoint (a local folder
    here, so a job that trains in the driver needs no `ray.train`)."""

    path: str

    @contextmanager
    def as_directory(self) -> Iterator[str]:
        yield self.path


@dataclass
class LocalResult:
    """What `trainers.job.finalize` reads of Ray Train's Result: the run folder, its last checkpoint."""

    path: str
    checkpoint: Optional[LocalCheckpoint]


def fit_in_process(cfg: Config, store: FeatureStore, tracking: Optional[dict], folder: Path, threads: int,
                   forward: Forward) -> LocalResult:
    """Train `cfg` here (resuming from `folder`'s newest checkpoint); returns the run's result."""
    from trainers.dist import local_context
    from trainers.loop import Trainer, _resume

    if not can_run(cfg):
        raise ValueError(f"in-process training needs scaling.num_workers=1, scaling.strategy=ddp and "
                         f"scaling.worker_group=auto or task, got {cfg.scaling.num_workers}, {cfg.scaling.strategy} "
                         f"and {cfg.scaling.worker_group}")
    torch.set_num_threads(max(1, threads))
    folder.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, store, local_context(cfg.scaling.use_gpu), tracking)
    _resume(trainer, None, folder)
    trainer.fit(reporter(folder, cfg.run.keep_checkpoints, forward))
    latest = newest_checkpoint(folder)
    return LocalResult(str(folder), LocalCheckpoint(str(latest)) if latest else None)


def reporter(folder: Path, keep: int, forward: Forward) -> Callable[[dict, Optional[Callable]], None]:
    """The `report(metrics, save)` that `Trainer.fit` calls after every epoch."""

    def report(metrics: dict[str, Any], save: Optional[Callable[[Path], None]]) -> None:
        path = None
        if save is not None:
            path = write_checkpoint(folder, int(metrics["epoch"]), save)
            prune(folder, keep)
        forward(metrics, path)

    return report


def write_checkpoint(folder: Path, epoch: int, save: Callable[[Path], None]) -> Path:
    """`save` into a temporary folder, then renamed into place: a crash leaves no half checkpoint
    under a checkpoint's name (a leftover `.tmp-*` folder is ignored and replaced)."""
    path = folder / f"{CHECKPOINT_PREFIX}{epoch:06d}"
    tmp = folder / f".tmp-{path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save(tmp)
    # the same epoch again (a restored run reporting its last state): the newer wins, swapped in by renames
    replace_folder(tmp, path)
    return path


def checkpoints(folder: Path) -> list[Path]:
    """This module's checkpoints in `folder`, oldest first."""
    return sorted(p for p in folder.glob(f"{CHECKPOINT_PREFIX}[0-9]*") if p.is_dir()
                  and p.name[len(CHECKPOINT_PREFIX):].isdigit())


def newest_checkpoint(folder: Path) -> Optional[Path]:
    found = checkpoints(folder)
    return found[-1] if found else None


def prune(folder: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (each carries the best weights so far, so none is lost)."""
    for old in checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["LocalCheckpoint", "LocalResult", "can_run", "in_driver", "fit_in_process", "held_resources",
           "newest_checkpoint", "no_reports", "prune", "reporter", "write_checkpoint"]
