"""Driver-side checks that run after the data is prepared and before anything of the run is written
or any worker starts: each refusal is one line naming the key, file or value at fault.

Order matters: the cheap, local checks come first; the cluster check attaches to (or starts) Ray,
so it runs last. Data-level checks (files, encodings, widths, NaN rows, undecodable images) live
where the data is read: itmatch/data/readers.py and store.py.

Keys that may change when a run is resumed (everything else must equal the run's saved config):
where and how loudly it runs (run.max_failures, run.ray_address, run.ray_log_level,
run.keep_checkpoints, run.checkpoint_every, run.resume, scaling.cpus_per_worker,
scaling.check_resources), what is logged (train.log_every, tracking.*, search.*), how features are
found or made (data.cache_dir, data.featurize, data.featurize_actors: the features are the same),
evaluation chunking
(train.eval_chunk), what the final test evaluation adds (eval.region_phrase_model,
eval.region_phrase_data, eval.eq8_alpha: 001 Eq. 8, computed once after training), and
train.epochs when it grows under a schedule that does not depend on the run's length (constant,
step): a longer cosine schedule would change the learning rate of the epochs already planned.
"""

from __future__ import annotations

import contextlib
import logging
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Callable

import yaml

from itmatch.config import ENV_TRACKING_URI, Config, ConfigError, read_saved_config
from itmatch.data.batching import NeighborhoodBatchSampler, shards_per_rank
from itmatch.data.sources import DataError
from itmatch.data.store import FeatureStore, stored_splits
from itmatch.files import read_problem
from itmatch.state import CONFIG_FILE, checkpoint_candidates, checkpoint_dims
from trainers import in_process

log = logging.getLogger("itmatch.preflight")

RESUMABLE_KEYS = frozenset({
    "run.name", "run.storage_path",  # they found this run folder (relative or absolute alike)
    "run.max_failures", "run.ray_address", "run.ray_log_level", "run.keep_checkpoints", "run.resume",
    "run.checkpoint_every", "run.ray_dashboard",
    "scaling.worker_group",  # one worker either way; both resume from the run folder's checkpoints
    "scaling.thread_wait",  # how idle CPU threads wait: speed only
    "train.deterministic",  # which kernels: on a GPU the last bits of a sum, not what is trained
    "run.start_from",  # read only by a run without checkpoints of its own
    "scaling.cpus_per_worker", "scaling.check_resources", "train.log_every", "train.eval_chunk",
    "data.cache_dir", "data.featurize", "data.featurize_actors",
    "eval.region_phrase_model", "eval.region_phrase_data", "eval.eq8_alpha",  # only the final test metrics
})
RESUMABLE_SECTIONS = ("tracking.", "search.")
TRACKING_TIMEOUT_S = 5.0


def check(cfg: Config, store: FeatureStore) -> None:
    """Raise ConfigError/DataError (one line) if this run cannot start or must not resume."""
    check_resume_config(cfg)
    check_start_from(cfg)
    check_checkpoint_dims(cfg, store)
    check_batch(cfg, store)
    check_model_size(cfg, store)
    check_cca(cfg, store)
    check_tracking(cfg)
    check_eq8(cfg, store)
    warn_in_sample(cfg)
    warn_test_in_sample(cfg)
    check_cluster(cfg)  # last: it attaches to or starts Ray


def warn_in_sample(cfg: Config) -> bool:
    """A training split that holds the validation split (`train+val`) makes validation in-sample:
    said once, since the best epoch is then picked on training data (search.refit sets
    train.keep=last for that). Returns whether it warned."""
    d = cfg.data
    if d.val_split not in stored_splits(d.train_split) or cfg.train.keep == "last":
        return False
    log.warning("data.train_split=%s holds the validation split %r: validation scores are in-sample and "
                "train.keep=best picks the epoch on training data (train.keep=last keeps the last)",
                d.train_split, d.val_split)
    return True


def warn_test_in_sample(cfg: Config) -> bool:
    """A test split that is also trained on or validated on: its scores are not held-out ones
    (`data.val_split=test` picks the best epoch and the champion on the test split). Said, not
    refused: a smoke run may mean it. Returns whether it warned."""
    d = cfg.data
    test = set(stored_splits(d.test_split))
    used = [(key, name) for key, name in (("data.train_split", d.train_split), ("data.val_split", d.val_split))
            if test & set(stored_splits(name))]
    for key, name in used:
        log.warning("%s=%s holds the test split %r: the test scores are not held out", key, name, d.test_split)
    return bool(used)


# ---------------------------------------------------------------------------- resume


def resumable(key: str) -> bool:
    """Whether a key may change when a run resumes (train.epochs: only upwards, see changed_keys)."""
    return key in RESUMABLE_KEYS or key.startswith(RESUMABLE_SECTIONS)


def changed_keys(saved: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every key that may not change on resume."""
    old, now = saved.flat(), new.flat()
    out = []
    for key, value in now.items():
        if old.get(key) == value or resumable(key):
            continue
        if key == "train.epochs" and value > old[key] and new.optim.scheduler != "cosine":
            continue  # training longer on a schedule that does not depend on the total length
        out.append((key, old.get(key), value))
    return out


def check_resume_config(cfg: Config) -> None:
    """A run that has a checkpoint resumes with the config it was started with, or not at all."""
    folder = Path(cfg.run.storage_path).resolve() / cfg.run.name  # Ray Train's folder of this run
    checkpoints = checkpoint_candidates(None, folder)  # newest first
    if not checkpoints:
        return  # nothing to resume: a fresh start may use any config
    # the run's own, else (deleted, lost) the config the newest checkpoint was written with
    saved_path = next((p for p in [folder, *checkpoints] if (p / CONFIG_FILE).is_file()), folder) / CONFIG_FILE
    if not saved_path.is_file():
        return
    try:
        saved = read_saved_config(saved_path)
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:  # bytes that are not text: a traceback before
        raise ConfigError(f"{saved_path}: cannot read the run's saved config ({read_problem(exc)})") from exc
    diffs = changed_keys(saved, cfg)
    if diffs:
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diffs)
        raise ConfigError(f"{folder} was started with a different config and would resume mixing both; "
                          f"changed: {listed} (re-run with the saved values, or pick a new run.name)")


# ---------------------------------------------------------------------------- data vs config


# model.* keys that leave the weights' shapes alone: a run may start from a checkpoint with other values.
START_FROM_FREE = frozenset({"model.dropout", "model.input_dropout", "model.augment", "model.tta_flip",
                             "model.position_shift"})


def shapes_weights(key: str) -> bool:
    """Whether a config key shapes the network or its optimizer: a checkpoint of one value cannot be
    loaded with another (run.start_from, PBT's clones)."""
    return (key.startswith("model.") and key not in START_FROM_FREE) or \
        key in ("optim.name", "data.image_encoder", "data.text_encoder")


def check_start_from(cfg: Config) -> None:
    """run.start_from names a checkpoint folder (its files' integrity is checked when it is loaded)
    of the same network and optimizer: other shapes failed to load in the workers, after start-up."""
    folder = cfg.run.start_from
    if not folder:
        return
    if not (Path(folder) / "state.pt").is_file():
        raise ConfigError(f"run.start_from = {folder!r}: not a checkpoint folder (no state.pt there)")
    path = Path(folder) / CONFIG_FILE
    try:
        saved = read_saved_config(path).flat()
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"run.start_from = {folder!r}: cannot read its {CONFIG_FILE} ({read_problem(exc)})") from exc
    now = cfg.flat()
    shaped = [k for k in now if shapes_weights(k)]
    diffs = [f"{k}: {saved.get(k)!r} there, {now[k]!r} here" for k in shaped if saved.get(k) != now[k]]
    if diffs:
        raise ConfigError(f"run.start_from = {folder!r} holds another network or optimizer, whose weights cannot "
                          f"be loaded into this one: {'; '.join(diffs)} (use the checkpoint's values)")


def check_checkpoint_dims(cfg: Config, store: FeatureStore) -> None:
    """The checkpoint a run resumes (its newest) or starts from takes features as wide as the data's:
    features of another width (the source's files replaced, another encoder's) failed to load in
    the workers, retried run.max_failures times, with a size-mismatch traceback."""
    folder = Path(cfg.run.storage_path).resolve() / cfg.run.name
    newest = next((p for p in checkpoint_candidates(None, folder) if (p / "state.pt").is_file()), None)
    for what, checkpoint in (("resumes", newest), ("run.start_from", cfg.run.start_from)):
        dims = checkpoint_dims(checkpoint) if checkpoint else None
        if dims is not None and dims != tuple(store.dims):
            raise DataError(f"{checkpoint}: takes features {dims[0]} (image) x {dims[1]} (caption) wide, but "
                            f"{cfg.data.source} gives {store.dims[0]} x {store.dims[1]} "
                            f"({'the run ' + what + ' it' if what == 'resumes' else what}): the same data, or "
                            f"{'a new run.name' if what == 'resumes' else 'another checkpoint'}")


def check_batch(cfg: Config, store: FeatureStore) -> None:
    """At least one full global batch of data.batch_size training pairs, shardable over the workers
    (the workers' own sampler, built here on the training captions' image ids)."""
    d, workers = cfg.data, cfg.scaling.num_workers
    groups, shards = store.caption_groups(d.train_split)  # phrases: grouped by region, sharded by picture
    where = f"{store.manifest['source']} split {d.train_split!r}"
    if d.batch_size > len(groups):
        raise DataError(f"data.batch_size={d.batch_size} is larger than the {len(groups)} training captions of "
                        f"{where}: lower data.batch_size")
    def batches(size: int) -> int:
        return len(NeighborhoodBatchSampler(groups, size, rank=0, world_size=workers, seed=cfg.train.seed,
                                            neighborhood=d.neighborhood_sampling, drop_last=d.drop_last,
                                            shard_by=shards, shards_per_rank=shards_per_rank(d.task)))

    try:
        full = batches(d.batch_size)
    except ValueError as exc:  # fewer images than workers
        raise DataError(f"{where}: {exc} (scaling.num_workers={workers})") from exc
    if full == 0:
        raise DataError(f"data.batch_size={d.batch_size} leaves no full batch of {len(groups)} training captions "
                        f"in {where} over scaling.num_workers={workers} (a batch takes a few captions of each "
                        f"image): the largest that does is {_largest(batches, d.batch_size)}")


# fp32 bytes a parameter costs a worker: weights, gradient, Adam's two moments, and the epoch's and
# the best epoch's consolidated copies (trainers/loop.py)
TRAINING_BYTES_PER_PARAMETER = 24


def check_model_size(cfg: Config, store: FeatureStore) -> None:
    """A network whose training state cannot fit this machine's memory (`model.hidden_dim=100000000`
    typed for 1000) failed as an allocator traceback in a worker, or was killed by the kernel while it
    was built: counted here on the meta device (no memory), refused in one line. Only where the job
    trains on this machine (no cluster address) and on its CPUs; ZeRO shards it, so not under DeepSpeed;
    and for heads on features only: a tower is of a fixed size, and building one (MiniLM's) takes seconds."""
    import os

    s, m = cfg.scaling, cfg.model
    if s.use_gpu or s.strategy == "deepspeed" or cfg.run.ray_address or os.environ.get("RAY_ADDRESS") or \
            (m.image_tower, m.text_tower) != ("features", "features"):
        return
    count = _parameters(cfg, store)
    have = _memory_bytes()
    need = (count or 0) * TRAINING_BYTES_PER_PARAMETER * s.num_workers  # every DDP worker holds a copy
    if have is None or need <= have:
        return
    raise ConfigError(f"the network has {count:,} parameters (model.hidden_dim={m.hidden_dim}, model.embed_dim="
                      f"{m.embed_dim}): training it on {s.num_workers} worker(s) takes ~{need / 2**30:,.0f} GiB for "
                      f"weights, gradients and optimizer state, over this machine's {have / 2**30:,.0f} GiB of "
                      "memory; lower model.hidden_dim or model.embed_dim")


def _parameters(cfg: Config, store: FeatureStore) -> int | None:
    """The network's parameter count, built on the meta device (no memory, no init); None where it
    cannot be built there (a tower that loads its weights as it is made: of a fixed size anyway)."""
    import numpy as np
    import torch

    from itmatch.models import build_model

    # one class a training image (an estimate on phrase data); from the ids alone, not the features
    n_classes = len(np.unique(store.caption_groups(cfg.data.train_split)[0])) if cfg.loss.heads else 0
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. a state dict copied into meta tensors: nothing for the user
            model = build_model(*store.dims, cfg.model, n_classes=n_classes, heads=cfg.loss.heads)
    except Exception:  # noqa: BLE001 (whatever a model's construction does on meta tensors)
        return None
    return sum(p.numel() for p in model.parameters())


def _memory_bytes() -> int | None:
    """This machine's physical memory, where the system says."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _largest(batches: Callable[[int], int], too_big: int) -> int:
    """The largest batch size below `too_big` that `batches` gives a full batch for (bisection:
    a smaller batch never gives fewer), 0 if none."""
    low, high = 0, too_big  # batches(low) > 0 or low == 0; batches(high) == 0
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if batches(mid) > 0 else (low, mid)
    return low


def check_cca(cfg: Config, store: FeatureStore) -> None:
    """CCA keeps at most as many canonical dimensions as the narrower feature set has: say so here,
    naming the key, rather than in a Ray worker after start-up."""
    if cfg.model.name == "cca":
        check_cca_dim(store, cfg.model.embed_dim, "model.embed_dim", " with model.name='cca'")


def check_cca_dim(store: FeatureStore, dim: int, key: str, context: str = "") -> None:
    """`dim` canonical dimensions fit `store`'s features, else a ConfigError naming `key`: an
    ensemble's CCA member (--cca-dim, search.ensemble_cca_dim) was refused only after its members
    were staged, or at the end of a whole search, and a dim beyond 64 bits was a torch traceback."""
    widest = min(store.dims)
    if dim > widest:
        raise ConfigError(f"{key}={dim}{context}: at most {widest} canonical dimensions (features of "
                          f"{store.manifest['source']} are {store.dims[0]}-d image, {store.dims[1]}-d text); "
                          f"lower {key}")


def check_eq8(cfg: Config, store: FeatureStore) -> None:
    """eval.region_phrase_model (001 Eq. 8 at the end of the run): the model loads and is a
    region-phrase model, its data holds the test split (featurised now, cached for the end), and
    that split's pictures and phrases are the test split's images and sentences: refused here, not
    after training."""
    if not cfg.eval.region_phrase_model:
        return
    from itmatch.eval.eq8 import align
    from trainers.results import eq8_setup

    setup = eq8_setup(cfg.eval, cfg.data.test_split, tracking_uri=cfg.tracking.tracking_uri,
                      cache_dir=cfg.data.cache_dir)
    align(store.split(cfg.data.test_split), setup.phrases, f"data.source = {cfg.data.source!r} against {setup.where}")


# ---------------------------------------------------------------------------- tracking


def check_tracking(cfg: Config, timeout: float = TRACKING_TIMEOUT_S) -> None:
    """The MLflow store can be reached: a sqlite file's folder exists, an http server answers
    (any HTTP status counts) within `timeout` seconds, a database's driver imports, any other URI
    builds as an MLflow store; and MLflow takes the experiment, model and alias names."""
    if cfg.tracking.enabled:
        uri = cfg.tracking.tracking_uri
        from_env = " (from MLFLOW_TRACKING_URI)" if uri == ENV_TRACKING_URI else ""
        check_tracking_uri(uri, timeout, key="tracking.tracking_uri" + from_env)
        check_tracking_names(cfg)


def check_tracking_names(cfg: Config) -> None:
    """The experiment, registered model and alias are names MLflow takes: it refuses them only when
    it uses them, a registration at the very end of a run's training (an alias `v1` or `latest`,
    a model name with '/')."""
    from mlflow.exceptions import MlflowException

    t = cfg.tracking
    checks = [("tracking.experiment", t.experiment, ("_validate_experiment_name",))]
    if t.registered_model:
        checks += [("tracking.registered_model", t.registered_model, ("_validate_model_name",)),
                   ("tracking.alias", t.alias, ("_validate_model_alias_name", "_validate_model_alias_name_reserved"))]
    for key, value, names in checks:
        for name in names:
            check = _mlflow_validator(name)
            try:
                check(value)
            except MlflowException as exc:
                raise ConfigError(f"{key} = {value!r}: MLflow refuses it ({exc.message.splitlines()[0]})") from None


def _mlflow_validator(name: str):
    """One of MLflow's own name checks (private helpers: a version without it checks nothing here)."""
    from mlflow.utils import validation

    return getattr(validation, name, lambda value: None)


def check_tracking_uri(uri: str, timeout: float = TRACKING_TIMEOUT_S, key: str = "tracking URI") -> None:
    """One bounded look at a tracking URI; ConfigError naming `key` and the URI if it cannot work."""
    if uri.startswith("sqlite:"):
        if not uri.startswith("sqlite:///") or uri == "sqlite:///":
            raise ConfigError(f"{key} = {uri!r}: an SQLite store is sqlite:///relative/path.db or "
                              "sqlite:////absolute/path.db")
        db = Path(uri[len("sqlite:///"):]).resolve()
        if not db.parent.is_dir():
            raise ConfigError(f"{key} = {uri!r}: folder {db.parent} does not exist")
        _check_sqlite_file(db, uri, key, timeout)
    elif not uri.startswith(("http://", "https://")):
        _check_store_kind(uri, key)
    else:
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            return  # something answered
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(f"{key} = {uri!r}: no answer within {timeout:g}s ({reason}); "
                              "start the MLflow server or set tracking.enabled=false") from exc


def _check_sqlite_file(path: Path, uri: str, key: str, timeout: float) -> None:
    """An existing SQLite store opens and reads (read-only: nothing is created or migrated here). A
    file that is not a database, or one another process keeps locked, failed the run's first attempt
    after featurisation and its retries, with an SQLAlchemy traceback."""
    import sqlite3

    if not path.is_file() or path.stat().st_size == 0:  # none yet, or empty: MLflow creates its tables
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=timeout)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc):
            raise ConfigError(f"{key} = {uri!r}: {path} cannot be read ({exc})") from None
        raise ConfigError(f"{key} = {uri!r}: {path} is locked by another process (still after {timeout:g} s); "
                          "wait for it to end, or stop it") from None
    except sqlite3.Error as exc:  # DatabaseError: "file is not a database"
        raise ConfigError(f"{key} = {uri!r}: {path} is not an SQLite database ({exc}); point tracking.tracking_uri "
                          "at the MLflow database, or move the file aside") from None


# ---------------------------------------------------------------------------- cluster


def _check_store_kind(uri: str, key: str) -> None:
    """A database URI's driver imports (no connection is made); anything else is built as MLflow
    would build it (a folder: MLflow 3's file store refuses itself unless MLFLOW_ALLOW_FILE_STORE;
    an unknown scheme). Either would otherwise fail the run's first attempt, after featurization."""
    from urllib.parse import urlparse

    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    scheme = urlparse(uri).scheme.split("+")[0]
    try:
        if scheme in ("postgresql", "mysql", "mssql"):
            import sqlalchemy

            dialect = sqlalchemy.engine.make_url(uri).get_dialect()
            (getattr(dialect, "import_dbapi", None) or dialect.dbapi)()  # the driver (psycopg, ...); no connection
        else:
            from mlflow.tracking._tracking_service.utils import _get_store

            _get_store(uri)
    except (MlflowException, ImportError, SQLAlchemyError) as exc:
        said = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        raise ConfigError(f"{key} = {uri!r}: MLflow cannot use it ({type(exc).__name__}: "
                          f"{said.splitlines()[0][:300]})") from None


def check_cluster(cfg: Config) -> None:
    """The workers fit on the cluster as it is now, node by node (Ray would otherwise wait for them
    forever). An autoscaling cluster that adds nodes on demand sets scaling.check_resources=false."""
    if not cfg.scaling.check_resources:
        return
    from trainers import placement
    from trainers.job import cpus_per_worker

    if not in_process.in_driver(cfg):  # else it trains here, without Ray: this machine is the cluster
        from trainers.train import init_ray

        init_ray(cfg)
    s, nodes = cfg.scaling, placement.nodes()
    have = sum(n.get("GPU", 0.0) for n in nodes)
    if s.use_gpu and have < s.num_workers:
        raise ConfigError(f"scaling.use_gpu=true with scaling.num_workers={s.num_workers} needs "
                          f"{s.num_workers} GPUs but the Ray cluster has {have:g}")
    cpus = cpus_per_worker(cfg)
    if placement.capacity(nodes, cpus, s.use_gpu) < s.num_workers:
        each = f"{cpus:g} CPUs" + (" and a GPU" if s.use_gpu else "")
        raise ConfigError(f"scaling.num_workers={s.num_workers} x {each} per worker needs "
                          f"{s.num_workers * cpus:g} CPUs but the Ray cluster has "
                          f"{sum(n.get('CPU', 0.0) for n in nodes):g} on nodes of {placement.describe(nodes)}, "
                          f"which hold {placement.capacity(nodes, cpus, s.use_gpu)} such workers (a worker "
                          "runs on one node): lower scaling.num_workers or scaling.cpus_per_worker, or add nodes")
