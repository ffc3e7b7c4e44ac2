"""Train on Ray Train: `python -m trainers.train [--config PRESET.yaml] [key=value ...]`.

The driver: resolve the config, featurise the data once (cached Parquet), open the MLflow run,
fit a `TorchTrainer` (resuming the same run.name + run.storage_path from its latest checkpoint),
then evaluate the best weights on the test split and log, register and maybe promote the model.
This is exactly what `ray job submit --working-dir . -- python -m trainers.train ...` runs.
"""

from __future__ import annotations

import os

# Before torch loads: libgomp's spin-waiting makes CPU workers that share cores 7-9x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

from itmatch.config import Config, ConfigError, load_config, save_config  # noqa: E402
from itmatch.data.sources import DataError  # noqa: E402
from itmatch.data.store import FeatureStore, prepare  # noqa: E402
from trainers import preflight  # noqa: E402
from trainers.logs import setup_logging  # noqa: E402

log = logging.getLogger("itmatch.train")
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trainers.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (only the keys it changes)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.margin=0.1 scaling.num_workers=4")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def prepare_store(cfg: Config) -> FeatureStore:
    """Featurise (or find cached) every split the run uses; `data.featurize=ray` encodes the images
    with Ray Data actors on the cluster this driver attaches to."""
    d = cfg.data
    featurizer = None
    if d.featurize == "ray":
        from trainers.featurize import ray_image_featurizer

        init_ray(cfg)
        featurizer = ray_image_featurizer(d.featurize_actors)
    return prepare(d.source, cache_dir=d.cache_dir, image_encoder=d.image_encoder, text_encoder=d.text_encoder,
                   splits=sorted({d.train_split, d.val_split, d.test_split}), image_featurizer=featurizer)


def init_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    env = {"OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if cfg.scaling.strategy == "deepspeed":  # read when deepspeed is first imported in a worker
        env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    if "ITMATCH_FAIL_AT_EPOCH" in os.environ:
        env["ITMATCH_FAIL_AT_EPOCH"] = os.environ["ITMATCH_FAIL_AT_EPOCH"]
    if address:
        ray.init(address=address, runtime_env={"env_vars": env})
    else:  # a private in-process cluster on this machine; gloo over loopback
        env["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
        ray.init(address="local", runtime_env={"env_vars": env})


def relative_paths_in_job(cfg: Config) -> list[str]:
    """Settings that resolve inside a Ray job's temporary working directory (deleted with the
    Ray session) when this driver runs under `ray job submit`."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # set by Ray Jobs for the entrypoint
        return []
    uri = cfg.tracking.tracking_uri
    paths = {"run.storage_path": cfg.run.storage_path, "data.cache_dir": cfg.data.cache_dir,
             "tracking.artifact_location": cfg.tracking.artifact_location,
             "tracking.tracking_uri": uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else "/"}
    return [f"{key}={value!r}" for key, value in paths.items() if "://" not in value and not os.path.isabs(value)]


def _cpus_per_worker(cfg: Config) -> float:
    import ray

    if cfg.scaling.cpus_per_worker:
        return cfg.scaling.cpus_per_worker
    return max(1.0, float(int(ray.cluster_resources().get("CPU", 1)) // cfg.scaling.num_workers))


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.storage_path).resolve() / cfg.run.name


def fit(cfg: Config, store: FeatureStore, tracking: Optional[dict], callbacks: Optional[list] = None):
    """Build and fit the TorchTrainer; returns Ray's Result. `callbacks`: Ray Train user callbacks
    (a Tune trial passes the one that forwards every report to Tune)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainers.loop import train_loop_per_worker

    cpus = _cpus_per_worker(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "store": str(store.root.resolve()),
                           "threads": max(1, int(cpus)), "tracking": tracking},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=str(Path(cfg.run.storage_path).resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            logging_config=ray.train.LoggingConfig(log_level=cfg.run.ray_log_level),
            callbacks=callbacks or []),
    )
    return trainer.fit()


def finalize(cfg: Config, store: FeatureStore, result, tracking: Optional[dict]) -> dict[str, Any]:
    """Evaluate the best weights on the test split; log, register and maybe promote them."""
    from trainers.results import best_checkpoint_folder, evaluate_folder

    best = best_checkpoint_folder(result, run_dir(cfg) / "best_model")
    plots = run_dir(cfg) / "plots"
    test = evaluate_folder(best, store.split(cfg.data.test_split), cfg, plots_dir=plots)
    val_score = test.pop("_val_score")
    summary: dict[str, Any] = {"best_checkpoint": str(best), "best_epoch": test.pop("_best_epoch"),
                               f"val_{cfg.train.metric}": val_score, "test": test}
    log.info("test (best epoch %s): %s", summary["best_epoch"], _fmt(test))
    if tracking:
        from trainers import tracking as tr

        client_metrics = {f"test_{k}": v for k, v in test.items()}
        tr.epoch_logger(tracking)(client_metrics, summary["best_epoch"])
        tr.log_folder(tracking, plots, "plots")
        info = tr.log_model(tracking, best, store)
        summary["model_uri"] = info.model_uri
        summary["run_id"] = tracking["run_id"]
        if cfg.tracking.registered_model:
            summary["registry"] = promote(tracking, cfg, store, info.model_uri, val_score)
        tr.end_run(tracking)
    return summary


def promote(tracking: dict, cfg: Config, store: FeatureStore, model_uri: str, val_score: float) -> dict[str, Any]:
    """Register the model; it takes the alias only if it beats the holder re-scored on this val split."""
    from trainers import tracking as tr

    champion_score = _score_on_val(tr.load_champion(tracking, cfg), store, cfg)
    return tr.register(tracking, cfg, model_uri, val_score, champion_score)


def _score_on_val(model, store: FeatureStore, cfg: Config) -> Optional[float]:
    """The alias holder's score on this run's validation split (None when there is no holder)."""
    if model is None:
        return None
    from itmatch.eval.evaluate import evaluate_split

    if tuple(getattr(model, "dims", ())) != tuple(store.dims):
        log.warning("champion takes features of width %s, this data has %s: it cannot be compared, keeping it",
                    getattr(model, "dims", None), store.dims)
        return float("inf")
    return evaluate_split(model, store.split(cfg.data.val_split), chunk=cfg.train.eval_chunk)[cfg.train.metric]


def _fmt(metrics: dict[str, float]) -> str:
    from itmatch.eval.retrieval import format_metrics

    return format_metrics(metrics)


def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(json.dumps(cfg.model_dump(), indent=2))
            return 0
        if not cfg.run.resume and run_dir(cfg).exists():
            raise ConfigError(f"run.resume=false but {run_dir(cfg)} exists: pick a new run.name or resume it")
        store = prepare_store(cfg)
        preflight.check(cfg, store)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    relative = relative_paths_in_job(cfg)
    if relative:
        log.warning("running as a Ray job with relative paths %s: they live in the job's temporary working "
                    "directory (%s) and go away with the Ray session; pass absolute paths on shared storage "
                    "(and an MLflow server or shared sqlite file) to keep checkpoints, runs and models",
                    ", ".join(relative), os.getcwd())
    run_dir(cfg).mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir(cfg) / "config.yaml")
    tracking = None
    if cfg.tracking.enabled:
        from trainers.tracking import start_run

        tracking = start_run(cfg, str(run_dir(cfg)), store)
    init_ray(cfg)
    try:
        result = fit(cfg, store, tracking)
    except Exception:
        if tracking:
            from trainers.tracking import end_run

            end_run(tracking, "FAILED")
        raise
    summary = finalize(cfg, store, result, tracking)
    (run_dir(cfg) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
