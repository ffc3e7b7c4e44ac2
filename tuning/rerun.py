"""Seed re-runs of the search's top trials (`search.rerun_top`, `search.rerun_seeds`).

Each re-run is a normal job (`trainers.job.run_job`) on the trial's resolved config with another
`train.seed`: its own folder `<search>/reruns/<trial id>-seed<k>` (config.yaml, checkpoints,
summary.json) and an MLflow run nested under the search's run, tagged with the trial it repeats.
Re-runs are Ray tasks on the search's cluster, at most `search.max_concurrent` at once; like trials
they hold no CPU themselves and their Ray Train workers queue for their placement groups, except a
one-worker re-run, which trains inside its task (trainers/in_process.py) and holds its worker's
CPUs. A re-run whose summary.json exists (a killed search run again) is read back, never run twice.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

from itmatch.config import Config, load_config

log = logging.getLogger("itmatch.tune")
RERUN_OF_TAG = "itmatch.rerun_of"  # the trial id a re-run repeats
RERUN_TAG = "itmatch.rerun"  # the re-run's own name, `<trial id>-seed<k>`


def name(trial_id: str, seed: int) -> str:
    return f"{trial_id}-seed{seed}"


def trial_seed(setup: dict, params: dict[str, Any]) -> int:
    """The trial's own train.seed: searched, or the base config's."""
    return int(params.get("train.seed", setup["base"]["train.seed"]))


def plan(top: list[dict], setup: dict, extra: int) -> list[dict[str, Any]]:
    """Every (trial, seed) to re-run: seeds trial seed + 1 .. + extra, in trial order; a trial the
    scheduler stopped (no summary; search.rerun_per) also its own seed, trained to the end."""
    return [{"trial_id": r["trial_id"], "params": r["params"], "seed": trial_seed(setup, r["params"]) + k,
             "run": name(r["trial_id"], trial_seed(setup, r["params"]) + k)}
            for r in top for k in range(0 if not r["summary"] else 1, extra + 1)]


def rerun_config(setup: dict, item: dict[str, Any]) -> Config:
    """The trial's config (driver-resolved, absolute paths; an item's own `config`, a refit's, over
    it) with the re-run's seed, folder, no registration, no logged model and no plots (the search
    logs, draws and registers its one choice)."""
    return load_config(None, {**setup["base"], **item["params"], **item.get("config", {}),
                              "train.seed": item["seed"], "run.name": item["run"],
                              "run.storage_path": setup["reruns_dir"], "tracking.registered_model": None,
                              "tracking.log_model": False, "eval.plots": False})


def run_all(items: list[dict], setup: dict, max_concurrent: int) -> list[dict[str, Any]]:
    """Run every planned re-run (finished ones are read back); returns one record per item with
    status `finished` or `failed`, its summary and wall time."""
    records, pending = {}, {}
    todo = []
    for item in items:
        done = _summary(rerun_config(setup, item))
        if done is not None:
            log.info("re-run %s finished before: reading its summary", item["run"])
            records[item["run"]] = _record(item, done, None, None)
        else:
            todo.append(item)
    for item in todo:
        if len(pending) >= max_concurrent:
            _collect(pending, records)
        pending[_remote(setup, rerun_config(setup, item)).remote(setup, item)] = item
    while pending:
        _collect(pending, records)
    return [records[item["run"]] for item in items]


def _remote(setup: dict, cfg: Config):
    """A re-run of one worker trains inside its Ray task, which holds that worker's CPUs (and GPU);
    otherwise the task only drives its Ray Train workers and holds nothing they need."""
    import ray

    from trainers.in_process import held_resources
    from trainers.job import cpus_per_worker

    # the re-run's own config decides (an ablation's setup, unlike a search's, names no worker CPUs)
    held = held_resources(cfg, cpus_per_worker(cfg)) or {"CPU": 0, "GPU": 0}
    return ray.remote(num_cpus=held["CPU"], num_gpus=held["GPU"])(_rerun_task)


def _collect(pending: dict, records: dict) -> None:
    """Wait for one running re-run and record it; an error fails that re-run only."""
    import ray

    (ref,), _ = ray.wait(list(pending), num_returns=1)
    item = pending.pop(ref)
    try:
        summary, wall = ray.get(ref)
        records[item["run"]] = _record(item, summary, None, wall)
    except Exception as exc:  # its MLflow run is already FAILED (run_job); the search goes on
        log.error("re-run %s failed: %s", item["run"], reason(exc))
        records[item["run"]] = _record(item, None, reason(exc), None)


def reason(exc: BaseException) -> str:
    """What failed, in one line: a Ray task error's text starts with the task's traceback and its
    last line, the error itself, was cut off; its `cause` is the task's own exception."""
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {cause}"[:500]


def _record(item: dict, summary, error, wall) -> dict[str, Any]:
    return {**item, "status": "finished" if summary else "failed", "summary": summary, "error": error,
            "wall_s": wall}


def _summary(cfg: Config) -> Optional[dict[str, Any]]:
    """The summary of a re-run that finished before; None where there is none, or where it is damaged
    (not a JSON object): the re-run then goes again, and its job's finalization rewrites it."""
    from trainers.job import SUMMARY_FILE, run_dir, usable_summary

    return usable_summary(run_dir(cfg) / SUMMARY_FILE, cfg.train.metric, "running it again")


def _rerun_task(setup: dict, item: dict[str, Any]) -> tuple[dict, float]:
    """One re-run in a Ray task: the same job path as `trainers.train` and every trial."""
    from itmatch.data.raw import open_store
    from trainers.in_process import can_run, no_reports
    from trainers.job import run_job
    from trainers.logs import setup_logging
    from tuning import report

    setup_logging()
    start = time.perf_counter()
    tags = {"mlflow.parentRunId": setup["parent_run_id"], "itmatch.search": setup["name"],
            RERUN_OF_TAG: item["trial_id"], RERUN_TAG: item["run"],
            "itmatch.seed": str(item["seed"])} if setup["parent_run_id"] else None
    cfg = rerun_config(setup, item)
    summary = run_job(cfg, open_store(setup["store"]), tags=tags,
                      run_name=report.run_name(setup["name"], item["run"], item["params"]),
                      forward=no_reports if can_run(cfg) else None)
    return summary, time.perf_counter() - start


def folder(search_dir: Path) -> Path:
    return search_dir / "reruns"
