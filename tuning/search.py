"""Ray Tune over the dotted config keys; every trial is a distributed Ray Train job.

    python -m tuning.search --config configs/flickr8k_precomp.yaml --space configs/search/eq6.yaml \\
        --num-samples 16 --scheduler asha [key=value ...]

The space file maps dotted keys (the same as the CLI's) to a distribution:
`{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}`, `{randint: [lo, hi]}`, `{choice: [a, b, ...]}`,
`{grid: [a, b, ...]}`. Every key and every bound is checked against the config before Ray starts.
The data is featurised once; each trial then trains with `trainers.train.fit` (its own run folder
and checkpoints; re-running the same command restores the Tune experiment with Tuner.restore),
reports every epoch to Tune, evaluates its best epoch on the test split and logs an MLflow run nested under the
search's run. At the end the best trial by validation score is registered and takes the alias
only if it beats the holder (re-scored on the same validation split).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see trainers/train.py)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

import yaml  # noqa: E402

from itmatch.config import Config, ConfigError, load_config  # noqa: E402
from itmatch.data.sources import DataError  # noqa: E402
from itmatch.data.store import FeatureStore  # noqa: E402
from trainers.logs import setup_logging  # noqa: E402

log = logging.getLogger("itmatch.tune")
KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
SUMMARY = "summary.json"


def load_space(path: str | Path, base: Config, preset: Optional[str], overrides: list[str]) -> dict[str, dict]:
    """The search space file, each entry checked: known kind, and every value it can take (both
    bounds, every choice) accepted by the config on top of the base settings."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the search space: {exc}") from exc
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected a mapping of dotted keys to distributions, got {raw!r}")
    for key, spec in raw.items():
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in KINDS):
            raise ConfigError(f"{path}: {key}: expected one of {{{', '.join(KINDS)}: [...]}}, got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values or (kind in ("uniform", "loguniform", "randint")
                                                          and len(values) != 2):
            raise ConfigError(f"{path}: {key}.{kind}: expected a list ({'[low, high]' if kind not in ('choice', 'grid') else 'of values'}), got {values!r}")
        for value in values:
            try:
                load_config(preset, [*overrides, f"{key}={json.dumps(value)}"])
            except ConfigError as exc:
                raise ConfigError(f"{path}: {key}: value {value!r} is not valid: {exc}") from exc
    return raw


def to_tune(space: dict[str, dict]) -> dict[str, Any]:
    from ray import tune

    makers = {"uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
              "randint": lambda v: tune.randint(*v), "choice": tune.choice, "grid": tune.grid_search}
    return {key: makers[kind](values) for key, spec in space.items() for kind, values in spec.items()}


def trial_config(setup: dict, params: dict[str, Any], trial_id: str) -> Config:
    """The trial's resolved config: preset, search overrides, sampled params, its own run and no
    registration (the search registers its best trial once)."""
    sampled = [f"{k}={json.dumps(v)}" for k, v in params.items()]
    return load_config(setup["preset"], [*setup["overrides"], *sampled, f"run.name={json.dumps(trial_id)}",
                                         f"run.storage_path={setup['trials_dir']}", "tracking.registered_model="])


def run_trial(config: dict) -> None:
    """Tune function trainable: one Ray Train job with the sampled params."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainers import train

    setup_logging()
    setup, trial_id = config["setup"], tune.get_context().get_trial_id()
    cfg = trial_config(setup, config["params"], trial_id)
    store = FeatureStore.open(setup["store"])
    folder = train.run_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    tracking = None
    if cfg.tracking.enabled:
        from trainers.tracking import start_run

        tags = {"mlflow.parentRunId": setup["parent_run_id"], "itmatch.search": setup["name"]}
        tracking = start_run(cfg, str(folder), store, tags=tags)
    result = train.fit(cfg, store, tracking, callbacks=[TuneReportCallback()])
    summary = train.finalize(cfg, store, result, tracking)
    summary["params"] = config["params"]
    (folder / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))


def _scheduler(name: str, cfg: Config):
    if name == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # Per-epoch validation score; stops the weakest trials at epochs grace, grace*3, ...
    return ASHAScheduler(time_attr="epoch", metric=f"val_{cfg.train.metric}", mode="max",
                         max_t=cfg.train.epochs, grace_period=max(1, cfg.train.epochs // 8), reduction_factor=3)


def run_search(args: argparse.Namespace, cfg: Config, space: dict[str, dict], store: FeatureStore,
               search_dir: Path) -> list[dict]:
    from ray import tune

    from trainers import train

    parent = None
    if cfg.tracking.enabled:
        from trainers.tracking import start_run

        parent = start_run(cfg, str(search_dir), store, tags={"itmatch.search": args.name})
    setup = {"preset": args.config, "overrides": list(args.overrides), "store": str(store.root.resolve()),
             "trials_dir": str(search_dir / "trials"), "name": args.name,
             "parent_run_id": parent["run_id"] if parent else None}
    train.init_ray(cfg)
    # The trial only drives its Ray Train workers: it must not hold a CPU they need, and Tune refuses
    # an empty request, so it asks for one byte of memory.
    trainable = tune.with_resources(run_trial, {"cpu": 0, "memory": 1})
    path = str(search_dir / "tune")
    if tune.Tuner.can_restore(path):
        log.info("resuming the search in %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space={"setup": setup, "params": to_tune(space)},
            tune_config=tune.TuneConfig(num_samples=args.num_samples, max_concurrent_trials=args.max_concurrent,
                                        scheduler=_scheduler(args.scheduler, cfg)),
            run_config=tune.RunConfig(name="tune", storage_path=str(search_dir), verbose=1))
    grid = tuner.fit()
    rows = [_row(r, search_dir) for r in grid]
    _finish(cfg, store, rows, parent, search_dir)
    return rows


def _row(result, search_dir: Path) -> dict:
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id") or Path(result.path).name
    summary_path = search_dir / "trials" / trial_id / SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return {"trial_id": trial_id, "params": result.config["params"], "epochs": metrics.get("epoch"),
            "best_val": metrics.get("best_metric"), "error": str(result.error)[:300] if result.error else None,
            "summary": summary}


def _finish(cfg: Config, store: FeatureStore, rows: list[dict], parent: Optional[dict], search_dir: Path) -> None:
    """Close trials Tune stopped early, pick the best finished trial, register it, write the table."""
    done = [r for r in rows if r["summary"]]
    best = max(done, key=lambda r: r["summary"][f"val_{cfg.train.metric}"], default=None)
    if parent:
        _close_stopped_trials(parent, rows)
    previous = _previous_registry(search_dir, best)
    if previous:  # a re-run of a finished search: its best trial is registered already
        best["registry"] = previous
    elif best and parent and cfg.tracking.registered_model:
        from trainers.train import promote

        s = best["summary"]
        best["registry"] = promote({**parent, "run_id": s["run_id"]}, cfg, store, s["model_uri"],
                                   s[f"val_{cfg.train.metric}"])
    (search_dir / "search.json").write_text(json.dumps({"best": best, "trials": rows}, indent=2, default=str))
    if parent:
        _log_parent(parent, rows, best, cfg, search_dir)
    print(_table(rows, cfg, best))


def _previous_registry(search_dir: Path, best: Optional[dict]) -> Optional[dict]:
    path = search_dir / "search.json"
    if best is None or not path.is_file():
        return None
    before = (json.loads(path.read_text()).get("best") or {})
    return before.get("registry") if before.get("trial_id") == best["trial_id"] else None


def _close_stopped_trials(parent: dict, rows: list[dict]) -> None:
    """A trial stopped by the scheduler never reaches its own end_run; mark its MLflow run KILLED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(parent["tracking_uri"])
    running = client.search_runs([parent["experiment_id"]], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent['run_id']}' and attributes.status = 'RUNNING'"))
    for run in running:
        client.set_terminated(run.info.run_id, status="KILLED")


def _log_parent(parent: dict, rows: list[dict], best: Optional[dict], cfg: Config, search_dir: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(parent["tracking_uri"])
    if best:
        client.log_metric(parent["run_id"], f"best_val_{cfg.train.metric}", best["summary"][f"val_{cfg.train.metric}"])
        client.set_tag(parent["run_id"], "itmatch.best_trial", best["trial_id"])
        for key, value in best["params"].items():
            client.set_tag(parent["run_id"], f"best.{key}", str(value))
    client.log_artifact(parent["run_id"], str(search_dir / "search.json"))
    client.set_terminated(parent["run_id"], status="FINISHED" if best else "FAILED")


def _table(rows: list[dict], cfg: Config, best: Optional[dict]) -> str:
    metric = cfg.train.metric
    keys = sorted({k for r in rows for k in r["params"]})
    lines = ["| trial | " + " | ".join(keys) + f" | epochs | best val {metric} | test {metric} | |",
             "|---" * (len(keys) + 5) + "|"]
    order = sorted(rows, key=lambda r: -(r["best_val"] or float("-inf")))
    for r in order:
        test = r["summary"]["test"][metric] if r["summary"] else None
        status = "best" if best and r["trial_id"] == best["trial_id"] else ("error" if r["error"] else
                                                                            "" if r["summary"] else "stopped")
        values = " | ".join(_fmt(r["params"].get(k)) for k in keys)
        lines.append(f"| {r['trial_id']} | {values} | {r['epochs']} | {_fmt(r['best_val'])} | {_fmt(test)} | {status} |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tuning.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset for every trial")
    parser.add_argument("--space", required=True, help="YAML: dotted key -> {uniform|loguniform|randint|choice|grid: [...]}")
    parser.add_argument("--name", default="search", help="search folder under run.storage_path; re-run to resume")
    parser.add_argument("--num-samples", type=int, default=8, help="samples (each grid point repeated this often)")
    parser.add_argument("--max-concurrent", type=int, default=1, help="trials at once (each is N Ray Train workers)")
    parser.add_argument("--scheduler", choices=["asha", "fifo"], default="asha")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every trial")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    from trainers import train

    setup_logging()
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, [*args.overrides, f"run.name={args.name}"])  # the search's own run
        space = load_space(args.space, cfg, args.config, args.overrides)
        store = train.prepare_store(cfg)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    search_dir = Path(cfg.run.storage_path).resolve() / args.name
    search_dir.mkdir(parents=True, exist_ok=True)
    rows = run_search(args, cfg, space, store, search_dir)
    return 0 if any(r["summary"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
