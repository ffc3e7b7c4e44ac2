"""Train on Ray Train: `python -m trainers.train [--config PRESET.yaml] [key=value ...]`.

The driver: resolve the config, featurise the data once (cached Parquet), open the MLflow run,
fit a `TorchTrainer` (resuming the same run.name + run.storage_path from its latest checkpoint;
one DDP worker trains in this process, without starting Ray, or inside one Ray task where the driver
attaches to a cluster, without a Ray Train worker group: see scaling.worker_group and
trainers.job.run_job_here / run_job_in_task), then evaluate the best weights on the test split and
log, register and maybe promote the model.
This is exactly what `ray job submit --working-dir . -- python -m trainers.train ...` runs.
"""

from __future__ import annotations

import os

# libgomp's spin-waiting makes CPU workers that share cores 7-9x slower: Ray's processes get
# OMP_WAIT_POLICY=PASSIVE from `init_ray`'s runtime environment (`thread_wait_env`; scaling.thread_wait
# =spin lets them spin briefly). Not this process: where it trains
# one worker itself on all the cores (trainers.job.run_job_here), spinning threads are faster
# (Flickr8k-1k features, 2 cores: 0.62 s a training epoch against 0.80 s with PASSIVE).
# Ray Train's controller takes one worker report per poll (default every 2 s): no epoch could be
# shorter than the poll. The in-process cluster this driver starts passes its environment to every
# Ray process, the controller included (on an existing cluster, set it where `ray start` runs).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

from itmatch.config import Config, ConfigError, load_config  # noqa: E402
from itmatch.data.sources import DataError  # noqa: E402
from itmatch.data.raw import prepare_inputs  # noqa: E402
from itmatch.data.store import FeatureStore, stored_splits  # noqa: E402
from itmatch.files import FolderError, exclusive  # noqa: E402
from itmatch.models.towers import check_tower_names  # noqa: E402
from trainers import in_process, preflight, ray_worker  # noqa: E402
from trainers.job import (finished_summary, refuse_other_kind, restore_best_model, retry_promotion, run_dir,  # noqa: E402
                          run_job, run_job_here, run_job_in_task)
from trainers.logs import setup_logging  # noqa: E402

log = logging.getLogger("itmatch.train")
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trainers.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (only the keys it changes)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.margin=0.1 scaling.num_workers=4")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # intermixed: overrides may follow a flag (`a=1 --print-config b=2`), which plain parse_args refuses
    return parser.parse_intermixed_args(argv)


def prepare_store(cfg: Config) -> FeatureStore:
    """Featurise (or find cached) every split the run uses; `data.featurize=ray` encodes the images
    with Ray Data actors on the cluster this driver attaches to."""
    d = cfg.data
    try:
        check_tower_names(cfg.model)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    featurizer = None
    if d.featurize == "ray" and not cfg.model.raw_images:
        from trainers.featurize import ray_image_featurizer

        init_ray(cfg)
        featurizer = ray_image_featurizer(d.featurize_actors)
    # Encoder towers (end to end) read raw pixels and words, frozen features otherwise.
    return prepare_inputs(d.source, cache_dir=d.cache_dir, raw_images=cfg.model.raw_images,
                          image_encoder=d.image_encoder, text_encoder=d.text_encoder,
                          splits=sorted(stored_splits(d.train_split, d.val_split, d.test_split)),
                          image_featurizer=featurizer)


def init_ray(cfg: Config, worker_groups: Optional[bool] = None) -> None:
    """Attach to the cluster (run.ray_address, RAY_ADDRESS) or start a private one here.
    `worker_groups`: whether Ray Train worker groups will run (default: unless `cfg` trains in
    process); the private cluster's dashboard follows it unless run.ray_dashboard says."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    env = {**thread_wait_env(cfg),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if cfg.train.deterministic:  # read by cuBLAS at its first call, before any of ours
        env["CUBLAS_WORKSPACE_CONFIG"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if cfg.scaling.strategy == "deepspeed":  # read when deepspeed is first imported in a worker
        env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    for name in ("ITMATCH_FAIL_AT_EPOCH", "ITMATCH_HOLD_AT", "ITMATCH_HOLD_DIR", "ITMATCH_HOLD_TIMEOUT_S"):
        if name in os.environ:  # fault injection (trainers/loop.py), for tests and drills
            env[name] = os.environ[name]
    runtime_env = {"env_vars": env, "worker_process_setup_hook": ray_worker.HOOK}
    if address:
        attach_ray(address, "run.ray_address" if cfg.run.ray_address else "RAY_ADDRESS", runtime_env)
    else:  # a private in-process cluster on this machine; gloo over loopback
        env["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
        ray.init(address="local", runtime_env=runtime_env, include_dashboard=wants_dashboard(cfg, worker_groups))


def attach_ray(address: str, setting: str, runtime_env: dict[str, Any]) -> None:
    """ray.init on an existing cluster; an address Ray cannot parse or reach is the user's input, so
    it becomes a ConfigError naming the address and where it came from (`setting`: run.ray_address or
    the RAY_ADDRESS variable), not a traceback (an unreachable one after Ray's ~25 s of retries)."""
    import ray

    said = unreachable(address)  # at once, not after Ray's ~25 s of retries
    if said is None:
        try:
            ray.init(address=address, runtime_env=runtime_env)
            return
        except (ConnectionError, ValueError, RuntimeError) as exc:
            ray.shutdown()  # a half-made connection must not make the next ray.init a no-op
            said = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    where = " (environment variable)" if setting == "RAY_ADDRESS" else ""
    raise ConfigError(f"{setting}={address!r}{where}: cannot attach to a Ray cluster there ({said}); give the "
                      "address of a running cluster's head (HOST:6379, or auto), or unset it to start "
                      "a private cluster here")


def unreachable(address: str, timeout_s: float = 5.0) -> Optional[str]:
    """Why nothing answers at a HOST:PORT address (refused, no such host, timed out), else None.
    Other forms (auto, ray://, http://) are left to Ray, which knows what they mean."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
            return None
    except OSError as exc:  # socket.gaierror and TimeoutError are OSErrors too
        return f"nothing answers at {host}:{port}: {exc.strerror or exc}"


def thread_wait_env(cfg: Config) -> dict[str, str]:
    """libgomp's wait settings for the job's Ray processes (scaling.thread_wait). OMP_WAIT_POLICY=
    PASSIVE always, so that a process with more threads than CPUs never spins; `spin` adds
    GOMP_SPINCOUNT=300000 (which wins over the policy's spin count of 0): ~3 ms of spinning before a
    thread sleeps, libgomp's default. Not the default, nor chosen by the job's own layout: the other
    processes on a node are out of its sight (the ablation command's test, its trainers spinning,
    took 251 s against 133 s beside the unit tests), and not ACTIVE, whose ~5 minutes of spinning
    kept idle pooled Ray workers burning the cores (BENCHMARKS.md)."""
    spin = {"GOMP_SPINCOUNT": "300000"} if cfg.scaling.thread_wait == "spin" else {}
    return {"OMP_WAIT_POLICY": "PASSIVE", **spin}


def wants_dashboard(cfg: Config, worker_groups: Optional[bool] = None) -> bool:
    """Whether the private cluster starts its dashboard: where Ray Train worker groups will run
    (`worker_groups`, default: unless `cfg` trains in process), else as run.ray_dashboard says.
    Without the dashboard's State API, Ray Train's placement-group cleaner cannot tell that the
    controller is alive; seen here, it removed a healthy run's placement group mid-epoch, killing
    its workers, so run.ray_dashboard=false is refused where worker groups run."""
    groups = not in_process.can_run(cfg) if worker_groups is None else worker_groups
    if cfg.run.ray_dashboard is False and groups:
        raise ConfigError("run.ray_dashboard=false: this job runs Ray Train worker groups, whose placement-group "
                          "cleaner needs the dashboard's State API (without it a healthy run's workers were "
                          "killed); leave it unset or true")
    return groups if cfg.run.ray_dashboard is None else cfg.run.ray_dashboard


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


def warn_relative_paths(cfg: Config) -> None:
    """Under `ray job submit`, name each relative setting: it would vanish with the job's folder."""
    relative = relative_paths_in_job(cfg)
    if relative:
        log.warning("running as a Ray job with relative paths %s: they live in the job's temporary working "
                    "directory (%s) and go away with the Ray session; pass absolute paths on shared storage "
                    "(and an MLflow server or shared sqlite file) to keep checkpoints, runs and models",
                    ", ".join(relative), os.getcwd())

def exit_on_sigterm() -> None:
    """`ray job stop`, `kill` and batch schedulers send SIGTERM, on which Python dies without running
    `except`/`finally` or atexit: the MLflow run stayed RUNNING and an in-process Ray cluster's
    processes (dashboard, agents) outlived the driver. SystemExit instead ends the run KILLED and
    shuts Ray down; the same command resumes it from its last checkpoint."""
    import signal

    def stop(signum: int, frame) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    exit_on_sigterm()
    args = parse_args(argv)
    with contextlib.ExitStack() as held:
        try:
            cfg = load_config(args.config, args.overrides)
            if args.print_config:
                print(json.dumps(cfg.model_dump(), indent=2))
                return 0
            from trainers.loop import fault_injection  # the workers' module: not loaded before it is needed

            fault_injection()  # a malformed ITMATCH_* variable failed mid-run; refused before anything starts
            refuse_other_kind(run_dir(cfg), "run")  # checkpoints written into a search's folder
            cfg, store = prepare(cfg)
            # Held to the end: a second driver of the same run (a double submit, a retry by hand)
            # would interleave checkpoints and MLflow logging with this one. Taken once the checks
            # pass, so that refused input leaves nothing behind.
            held.enter_context(exclusive(run_dir(cfg), f"run {cfg.run.name!r}"))
        except (ConfigError, DataError, FolderError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            if isinstance(exc, FolderError):
                stop_ray()  # the preflight may have started it to check the cluster
            return 2
        warn_relative_paths(cfg)
        summary = finished_summary(cfg, store)
        if summary is not None:
            restore_best_model(cfg, summary)
            summary = retry_promotion(cfg, store, summary)
            log.info("%s finished already with this config and data (its summary.json follows): nothing to "
                     "train, log or register; raise train.epochs to train on, or pick a new run.name", run_dir(cfg))
        elif in_process.in_driver(cfg):  # one worker on this machine: no Ray to start
            summary = run_job_here(cfg, store)
        else:
            try:  # attached by the preflight already, unless scaling.check_resources=false skipped it
                init_ray(cfg)
            except ConfigError as exc:  # the cluster's address (run.ray_address, RAY_ADDRESS)
                print(f"error: {exc}", file=sys.stderr)
                return 2
            exit_on_sigterm()  # again: Ray's driver installs its own SIGTERM handler, which aborts
            summary = run_job_in_task(cfg, store) if in_process.can_run(cfg) else run_job(cfg, store)
    print(json.dumps(summary, indent=2, default=str))
    return promotion_exit(summary)


def promotion_exit(summary: dict) -> int:
    """1 where the trained, logged model's promotion failed (summary.json's registry.error): a job
    that a script or `ray job submit` reports SUCCEEDED would hide a model that never reached the
    registry. Re-running the command retries only the promotion (trainers.job.retry_promotion)."""
    from trainers.job import registration_error

    failed = registration_error(summary, "the model is trained and logged")
    if failed:
        print(f"error: {failed}", file=sys.stderr)
        return 1
    return 0


def stop_ray() -> None:
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


def prepare(cfg: Config) -> tuple[Config, FeatureStore]:
    """Everything checked before a job starts; raises ConfigError/DataError naming the key or file."""
    if not cfg.run.resume and run_dir(cfg).exists():
        raise ConfigError(f"run.resume=false but {run_dir(cfg)} exists: pick a new run.name or resume it")
    if cfg.run.start_from:  # the workers' working directory is not this one
        cfg = load_config(None, {**cfg.flat(), "run.start_from": str(Path(cfg.run.start_from).resolve())})
    store = prepare_store(cfg)
    preflight.check(cfg, store)
    return cfg, store


if __name__ == "__main__":
    sys.exit(main())
