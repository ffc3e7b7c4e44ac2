"""One rank running the real Trainer under each backend, without Ray (tests/distributed/test_strategies.py).

    python tests/distributed/strategy_worker.py RANK WORLD_SIZE PG_STORE FEATURE_STORE JOBS.json OUT_DIR

For every job: build the Trainer from the job's config, optionally restore a checkpoint folder,
fit with a `report` that writes every rank's checkpoint files into one folder per epoch (what
Ray Train's merge of the workers' folders produces), then save the final consolidated weights.
An injected failure (ITMATCH_FAIL_AT_EPOCH) ends that job on every rank and the next job runs;
`nan_on_ranks` + `nan_at_calls` make the objective's loss NaN at those calls on those ranks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from itmatch.config import validate
from itmatch.data.store import FeatureStore
from trainers.dist import WorkerContext
from trainers.loop import Trainer


def run_job(job: dict, rank: int, world: int, store: FeatureStore, out: Path) -> None:
    folder = out / job["name"]
    cfg = validate(job["cfg"])
    trainer = Trainer(cfg, store, WorkerContext(rank, world, 0, torch.device("cpu")), None)
    if job.get("resume_from"):
        trainer.restore(out / job["resume_from"])
    if rank in job.get("nan_on_ranks", ()):
        poison(trainer, set(job["nan_at_calls"]))

    def report(metrics: dict, save) -> None:
        target = folder / f"epoch{metrics['epoch']}"
        if save is not None:
            target.mkdir(parents=True, exist_ok=True)
            save(target)
        dist.barrier()

    if job.get("fail_at"):
        os.environ["ITMATCH_FAIL_AT_EPOCH"] = str(job["fail_at"])
    try:
        trainer.fit(report)
    except RuntimeError as err:
        if "injected failure" not in str(err):
            raise
        return
    finally:
        os.environ.pop("ITMATCH_FAIL_AT_EPOCH", None)
    weights = trainer.strategy.full_state_dict(trainer.model)
    if rank == 0:
        torch.save({"weights": weights, "history": trainer.state.history}, folder / "final.pt")
    dist.barrier()


def poison(trainer: Trainer, calls: set[int]) -> None:
    """Make the objective's loss NaN at these calls (0-based) (train.nonfinite tests)."""
    objective, seen = trainer.objective, []

    class Poisoned:
        def __getattr__(self, name):
            return getattr(objective, name)

        def __call__(self, *args, **kwargs):
            out = objective(*args, **kwargs)
            if len(seen) in calls:
                out["loss"] = out["loss"] * float("nan")
            seen.append(1)
            return out

    trainer.objective = Poisoned()


def main() -> None:
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    pg_store, feature_store, jobs_path, out = sys.argv[3], sys.argv[4], sys.argv[5], Path(sys.argv[6])
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{pg_store}", rank=rank, world_size=world)
    store = FeatureStore.open(feature_store)
    jobs = json.loads(Path(jobs_path).read_text())
    only = os.environ.get("ITMATCH_TEST_JOB")  # debug one job by name
    for job in jobs:
        if not only or job["name"] == only:
            run_job(job, rank, world, store, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
