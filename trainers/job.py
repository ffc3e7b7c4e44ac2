"""One job, start to end: the single path behind `trainers.train` and every Tune trial.

`run_job` saves the resolved config in the run folder, opens (or reopens) the MLflow run, fits the
TorchTrainer (or, for one worker, trains in its own process: trainers/in_process.py; a standalone
one-worker job runs `run_job` in the driver itself, `run_job_here`, or inside one Ray task where it
is attached to a cluster, `run_job_in_task`),
evaluates the best epoch on the test split, logs the model, registers and maybe promotes it, writes
summary.json, and leaves the MLflow run FINISHED, FAILED (any error before the model is logged; a
failed promotion after it is recorded in the summary and retried by a re-run: `promote`,
`retry_promotion`) or KILLED (the process told to stop, e.g. a trial stopped by Tune). Ray must already be initialised, except for `run_job_here`
(one worker in the driver, no Ray: trainers.in_process.in_driver).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import yaml

from itmatch.config import Config, ConfigError, read_saved_config, save_config, validate
from itmatch.data.store import FeatureStore, stored_splits
from itmatch.files import atomic_write_text
from itmatch.state import CHECKPOINT_PREFIX, CheckpointError
from trainers import placement
from trainers.metrics_log import LOCAL_FILE as METRICS_FILE

if TYPE_CHECKING:
    from trainers.in_process import Forward

log = logging.getLogger("itmatch.job")
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
STOP_WAIT_S = 30  # how long a stopped driver waits for its cancelled training task to end its MLflow run


class Stopped(Exception):
    """The job is no longer wanted (a search stopped its trial): its run ends KILLED unless its
    driver ended it already, with no summary, so it cannot turn up later as a finished trial."""


def run_dir(cfg: Config) -> Path:
    """The run's folder: run.storage_path/run.name (Ray Train's storage for the same run)."""
    return Path(cfg.run.storage_path).resolve() / cfg.run.name


# What marks a folder as a search's (tuning/search.py, tuning/restore.py) or a training run's (run_job,
# Ray Train's checkpoint_* folders, trainers/metrics_log.py).
SEARCH_MARKS = ("search.json", "search_config.yaml", "search_space.json", "tune")
RUN_MARKS = (CONFIG_FILE, SUMMARY_FILE, METRICS_FILE)


def folder_marks(folder: Path, kind: str) -> list[str]:
    """The entries of `folder` that mark it as a `kind` ("run" or "search") folder, sorted."""
    if not folder.is_dir():
        return []
    names = SEARCH_MARKS if kind == "search" else RUN_MARKS
    return sorted(p.name for p in folder.iterdir()
                  if p.name in names or (kind == "run" and p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)))


def refuse_other_kind(folder: Path, kind: str) -> None:
    """Raise ConfigError where `folder`, about to be written as a `kind` ("run" or "search") folder,
    holds the other kind: both written into one folder mix checkpoints, summary.json and Tune state,
    and each reads the other's files back as its own (a finished-run check, a search restore)."""
    other = "search" if kind == "run" else "run"
    found = folder_marks(folder, other)
    if found:
        holder = "a search's (tuning.search)" if other == "search" else "a training run's (trainers.train)"
        name = "run.name" if kind == "run" else "--name (search.name)"
        listed = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ConfigError(f"{folder}: holds {holder} files ({listed}), so it cannot be this {kind}'s "
                          f"folder: pick another {name}")


def absolute_paths(cfg: Config) -> Config:
    """The config with every store path absolute. Tune runs a trial in its own folder and Ray Jobs
    run the driver in a temporary copy, so a relative path would point somewhere else there."""
    from trainers.tracking import resolve_uri

    tree = cfg.model_dump()
    tree["run"]["storage_path"] = str(Path(cfg.run.storage_path).resolve())
    tree["data"]["cache_dir"] = str(Path(cfg.data.cache_dir).resolve())
    tree["tracking"]["tracking_uri"] = resolve_uri(cfg.tracking.tracking_uri)
    if "://" not in cfg.tracking.artifact_location:
        tree["tracking"]["artifact_location"] = str(Path(cfg.tracking.artifact_location).resolve())
    if cfg.run.start_from:
        tree["run"]["start_from"] = str(Path(cfg.run.start_from).resolve())
    model = cfg.eval.region_phrase_model  # a folder (not an MLflow URI) read at the test evaluation
    if model and "://" not in model and not model.startswith(("models:", "runs:")):
        tree["eval"]["region_phrase_model"] = str(Path(model).resolve())
    if cfg.eval.region_phrase_data:
        tree["eval"]["region_phrase_data"] = _absolute_source(cfg.eval.region_phrase_data)
    return validate(tree)


def _absolute_source(source: str) -> str:
    """scheme:path[?options] with the path made absolute."""
    scheme, _, rest = source.partition(":")
    path, sep, options = rest.partition("?")
    return f"{scheme}:{Path(path).resolve()}{sep}{options}"


def run_job(cfg: Config, store: FeatureStore, *, tags: Optional[dict[str, str]] = None,
            callbacks: Optional[list] = None, run_name: Optional[str] = None,
            forward: Optional[Forward] = None, wanted: Optional[Callable[[], bool]] = None) -> dict[str, Any]:
    """Train, finalize, log and register one run; returns its summary (also in summary.json).
    `tags`/`run_name`: for a new MLflow run (a trial's parent id and readable name);
    `callbacks`: Ray Train user callbacks (a trial's report forwarding to Tune);
    `forward`: train one worker in this process instead (trainers/in_process.py), sending each
    epoch's metrics and checkpoint folder there (a one-worker trial's `ray.tune.report`);
    `wanted`: asked once training has ended; False raises `Stopped` instead of finalizing (a trial
    Tune stopped goes on training in its thread until its actor is gone)."""
    folder = run_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / CONFIG_FILE)
    tracking = None
    if cfg.tracking.enabled:
        from trainers.tracking import start_run

        tracking = {**start_run(cfg, str(folder), store, tags=tags, run_name=run_name), "folder": str(folder)}
    try:
        if forward is not None:
            from trainers.in_process import fit_in_process

            result = fit_in_process(cfg, store, tracking, folder, int(cpus_per_worker(cfg)), forward)
        else:
            result = fit(cfg, store, tracking, callbacks)
        if wanted is not None and not wanted():
            raise Stopped(f"{cfg.run.name}: stopped by its caller after training; not finalized")
        summary = finalize(cfg, store, result, tracking)
    except Stopped:
        _end(tracking, "KILLED")
        raise
    except Exception:
        _end(tracking, "FAILED")
        raise
    except BaseException:  # SystemExit/KeyboardInterrupt: told to stop (Tune stops trials this way)
        _end(tracking, "KILLED")
        raise
    atomic_write_text(folder / SUMMARY_FILE, json.dumps(summary, indent=2, default=str))  # "finished" to a search
    return summary


def read_summary(path: Path) -> Optional[dict[str, Any]]:
    """A run folder's summary.json, None where there is none. One that is not a JSON object (cut
    short, hand-edited: invalid JSON, `[]`, `null`) raises CheckpointError naming the file: its
    readers (finished_summary, trainers.ensemble, tuning.rerun) failed on `.get` with a traceback."""
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError: their text names no file
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(summary, dict):
        raise CheckpointError(f"{path}: not a JSON object (got {type(summary).__name__} {summary!r:.60})")
    return summary


def unusable_summary(summary: dict[str, Any], metric: str) -> str:
    """What a search could not read in a finished run's summary (tuning/select.py, a restored trial's
    report), or "": a hand-edited or foreign one failed there with a KeyError once every trial had
    trained."""
    val = summary.get(f"val_{metric}")
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        return f"val_{metric} is {val!r:.60}, not a number"
    if not isinstance(summary.get("test"), dict):
        return f"test is {summary.get('test')!r:.60}, not a mapping of metrics"
    return ""


def usable_summary(path: Path, metric: str, instead: str) -> Optional[dict[str, Any]]:
    """A finished run's summary a search can read back (a seed re-run's, a restored trial's); None
    where there is none, or, with a warning ending in `instead` (what happens then), where it is cut
    short, not a JSON object or unusable (unusable_summary)."""
    try:
        summary = read_summary(path)
    except CheckpointError as exc:
        log.warning("%s; %s", exc, instead)
        return None
    problem = summary is not None and unusable_summary(summary, metric)
    if problem:
        log.warning("%s: %s; %s", path, problem, instead)
        return None
    return summary


def finished_summary(cfg: Config, store: FeatureStore) -> Optional[dict[str, Any]]:
    """The summary of this run if it finished already with this very config and data: running the
    same command again must not log and register the same model a second time. None otherwise (a
    run told to train longer resumes and is finalized again)."""
    folder = run_dir(cfg)
    try:
        summary = read_summary(folder / SUMMARY_FILE)
        saved = read_saved_config(folder / CONFIG_FILE)
    except CheckpointError as exc:  # a damaged summary: finalizing the run again rewrites it
        log.warning("%s; finalizing the run again", exc)
        return None
    except (OSError, ValueError, yaml.YAMLError):  # not finished, or not readable: run as usual
        return None
    if summary is None:  # not finished
        return None
    problem = unusable_summary(summary, cfg.train.metric)
    if problem:  # hand-edited or foreign: finalizing again rewrites it (as for a damaged one)
        log.warning("%s: %s; finalizing the run again", folder / SUMMARY_FILE, problem)
        return None
    found = {"run.name", "run.storage_path"}  # they found this folder, written either way
    same = {k: v for k, v in saved.flat().items() if k not in found} == \
        {k: v for k, v in cfg.flat().items() if k not in found}
    data = summary.get("data_digests")  # absent in summaries written before it was recorded
    return summary if same and data in (None, store.identity["digests"]) else None


def restore_best_model(cfg: Config, summary: dict[str, Any]) -> None:
    """A finished run whose best_model/ is gone (deleted, moved) gets it back from its newest intact
    checkpoint's best weights, if they are the best epoch's the summary names: else a re-run said
    "finished already" and evaluate/serve found nothing there."""
    from itmatch.state import TrainState, checkpoint_candidates, load_checkpoint, pick_resume_checkpoint
    from trainers.loop import BEST_DIR
    from trainers.results import copy_folder

    best = Path(str(summary.get("best_checkpoint") or ""))
    if not summary.get("best_checkpoint") or (best / "state.pt").is_file():
        return
    try:
        chosen, _ = pick_resume_checkpoint(checkpoint_candidates(None, run_dir(cfg)))
        state: TrainState = load_checkpoint(chosen / BEST_DIR)[0]["train_state"]
    except (CheckpointError, OSError, ValueError) as exc:
        log.warning("%s is missing and no intact checkpoint holds it (%s)", best, exc)
        return
    if state.best_epoch != summary.get("best_epoch"):
        log.warning("%s is missing; %s holds epoch %s's best weights, not epoch %s's: not restored", best,
                    chosen, state.best_epoch, summary.get("best_epoch"))
        return
    copy_folder(chosen / BEST_DIR, best)
    log.warning("%s was missing: restored from %s (epoch %s's best weights)", best, chosen / BEST_DIR, state.best_epoch)


def run_job_in_task(cfg: Config, store: FeatureStore) -> dict[str, Any]:
    """`run_job` for one worker (trainers.in_process.can_run) inside one Ray task that holds the
    worker's CPUs (and GPU), where Ray schedules it like a Ray Train worker. A failed attempt is
    retried up to run.max_failures times and resumes from the run folder's newest intact checkpoint
    in the same MLflow run (reopened by its folder). Told to stop (SIGTERM, Ctrl-C), the driver
    cancels the task, which ends its MLflow run KILLED before the driver exits."""
    import ray

    from trainers.in_process import held_resources

    held = held_resources(cfg, cpus_per_worker(cfg))
    if held is None:
        raise ValueError("run_job_in_task runs one DDP worker (trainers.in_process.can_run)")
    task = ray.remote(num_cpus=held["CPU"], num_gpus=held["GPU"], max_retries=cfg.run.max_failures,
                      retry_exceptions=True)(_one_worker_job)
    ref = task.remote(cfg.model_dump(), str(store.root.resolve()))
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:  # the task's own error, as run_job would have raised it
        raise exc.as_instanceof_cause() from None
    except BaseException:
        ray.cancel(ref)  # KeyboardInterrupt in the task: run_job ends the MLflow run KILLED
        done, _ = ray.wait([ref], timeout=STOP_WAIT_S)
        if not done and cfg.tracking.enabled:  # the task could not end it in time: the driver does
            _end_if_running(cfg)
        raise


def _end_if_running(cfg: Config) -> None:
    try:
        from trainers.tracking import end_if_running

        if end_if_running(cfg, str(run_dir(cfg)), "KILLED"):
            log.warning("the training task did not stop in %d s; its MLflow run was ended KILLED by the driver",
                        STOP_WAIT_S)
    except Exception as exc:  # noqa: BLE001 - the driver is exiting on a signal: say it, do not mask it
        log.warning("could not end the MLflow run: %s: %s", type(exc).__name__, exc)


def run_job_here(cfg: Config, store: FeatureStore) -> dict[str, Any]:
    """`run_job` for one worker in this process (trainers.in_process.in_driver: no Ray at all), with
    the task's fault handling: a failed attempt is retried up to run.max_failures times (-1: without
    end) and resumes from the run folder's newest intact checkpoint in the same MLflow run; out of
    retries the error propagates and the run ends FAILED. SIGTERM / Ctrl-C end it KILLED (run_job)."""
    from trainers.in_process import no_reports

    failures = 0
    while True:
        try:
            return run_job(cfg, store, forward=no_reports)
        except (Stopped, Diverged):  # its run was ended from outside, or a retry would end the same way
            raise
        except Exception as exc:
            limit = cfg.run.max_failures
            if limit != -1 and failures >= limit:
                raise
            failures += 1
            log.warning("attempt %d failed (%s: %s); retrying from the newest checkpoint (run.max_failures=%d)",
                        failures, type(exc).__name__, exc, limit)


def _one_worker_job(tree: dict, store_root: str) -> dict[str, Any]:
    from itmatch.data.raw import open_store
    from trainers.in_process import no_reports
    from trainers.logs import setup_logging

    setup_logging()
    return run_job(validate(tree), open_store(store_root), forward=no_reports)


def _end(tracking: Optional[dict], status: str) -> None:
    """End a run that stopped short, unless its driver ended it already (tracking.end_run)."""
    if tracking:
        from trainers.tracking import end_run

        end_run(tracking, status, if_running=True)


def cpus_per_worker(cfg: Config) -> float:
    """scaling.cpus_per_worker, else the most whole CPUs each worker can hold with all of them
    placed node by node (trainers.placement), at least one; without Ray (a job training in its
    driver) this machine's CPUs shared by its workers, as a private Ray would count them."""
    if cfg.scaling.cpus_per_worker:
        return cfg.scaling.cpus_per_worker
    return placement.largest_share(placement.nodes(), cfg.scaling.num_workers, cfg.scaling.use_gpu) or 1.0


def fit(cfg: Config, store: FeatureStore, tracking: Optional[dict], callbacks: Optional[list] = None):
    """Build and fit the TorchTrainer; returns Ray's Result. `callbacks`: Ray Train user callbacks
    (a Tune trial passes the one that forwards every report to Tune)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainers.loop import train_loop_per_worker

    cpus = cpus_per_worker(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "store": str(store.root.resolve()),
                           "threads": max(1, int(cpus)), "tracking": tracking, "run_dir": str(run_dir(cfg))},
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
    from trainers.results import best_checkpoint_folder, evaluate_folder, load_and_embed

    best = best_checkpoint_folder(result, run_dir(cfg) / "best_model")
    plots = run_dir(cfg) / "plots" if cfg.eval.plots else None
    split = store.split(cfg.data.test_split)
    loaded = load_and_embed(best, split)
    check_finite(best, loaded[1], cfg.data.test_split)
    test = evaluate_folder(best, split, cfg, plots_dir=plots, loaded=loaded)
    pictures = _pictures(cfg, store, *loaded)
    val_score = test.pop("_val_score")
    summary: dict[str, Any] = {"best_checkpoint": str(best), "best_epoch": test.pop("_best_epoch"),
                               f"val_{cfg.train.metric}": val_score, "test": test,
                               "data_digests": store.identity["digests"]}
    log.info("test (best epoch %s): %s", summary["best_epoch"], _fmt(test))
    if tracking:
        from trainers import tracking as tr

        client_metrics = {f"test_{k}": v for k, v in test.items()}
        from trainers.metrics_log import flush_pending

        flush_pending(tracking)  # epochs the workers could not send while MLflow was away
        tr.epoch_logger(tracking)(client_metrics, summary["best_epoch"])
        if plots is not None:
            tr.log_folder(tracking, plots, "plots")
        if pictures:
            tr.log_folder(tracking, run_dir(cfg) / "pictures", "pictures")
        summary["run_id"] = tracking["run_id"]
        if cfg.tracking.log_model or cfg.tracking.registered_model:
            summary["model_uri"] = tr.log_model(tracking, best, store).model_uri
        if cfg.tracking.registered_model:
            summary["registry"] = promote(tracking, cfg, store, summary["model_uri"], val_score)
        # Logging the model ends the run FINISHED (mlflow.start_run's context); ended any other way,
        # its search's driver stopped it meanwhile (tuning.report.close_child_runs): no summary then.
        if not tr.end_run(tracking, if_running=True) and tr.run_status(tracking) != "FINISHED":
            raise Stopped(f"{cfg.run.name}: its MLflow run was ended while it finalized; no summary")
    return summary


class Diverged(RuntimeError):
    """The trained model computes non-finite embeddings: it must not be logged or registered."""


def check_finite(best: Path, embeddings, split: str) -> None:
    """Raise Diverged if the best weights embed any test row as NaN/inf (retrieval would rank such a
    model last, but it would still be logged, registered and maybe given the alias)."""
    import torch

    bad = [(name, int((~torch.isfinite(t)).any(dim=-1).sum()), len(t)) for name, t in zip(("image", "caption"), embeddings)
           if isinstance(t, torch.Tensor) and t.ndim == 2 and not bool(torch.isfinite(t).all())]
    if bad:
        rows = ", ".join(f"{n} of {total} {name} rows" for name, n, total in bad)
        raise Diverged(f"{best}: the best weights embed {rows} of the {split} split as NaN/inf; not logged or "
                       "registered (training diverged: check the inputs' magnitudes and optim.lr)")


def promote(tracking: dict, cfg: Config, store: FeatureStore, model_uri: str, val_score: float,
            version: Optional[str] = None) -> dict[str, Any]:
    """Register the model; it takes the alias only if it beats the holder on this val split (the rule:
    trainers.tracking.register; how a holder is judged: `_judge`). The model is trained and logged by
    now and its run FINISHED: a promotion that fails (the registry unwritable, a broken holder) is
    one error line and an `error` in the returned record (summary.json's `registry`), never a
    traceback that loses the run's summary and retries the finished job."""
    from trainers import tracking as tr

    record: dict[str, Any] = {"name": cfg.tracking.registered_model, "version": version}
    try:
        with tr.quiet_store_errors():
            return tr.register(tracking, cfg, model_uri, val_score,
                               lambda holder: _judge(tracking, cfg, store, holder), record, version)
    except Exception as exc:  # noqa: BLE001 - nothing in a promotion is worth the trained, logged model
        return _promotion_failed(record, cfg.tracking.alias, model_uri, exc)


def retry_promotion(cfg: Config, store: FeatureStore, summary: dict[str, Any]) -> dict[str, Any]:
    """A finished run whose promotion failed (summary.json's `registry` holds its `error`: the registry
    was unwritable then) is promoted again when its command is re-run, with the model it logged (and
    the version it registered, if it got that far), instead of "finished already" for good. The
    summary, updated, is written back."""
    failed = failed_registration(summary)
    if failed is None or not cfg.tracking.registered_model or not summary.get("model_uri"):
        return summary
    log.info("%s: its promotion failed (%s); trying it again", run_dir(cfg), failed["error"])
    tracking = {"tracking_uri": cfg.tracking.tracking_uri, "run_id": summary.get("run_id")}
    version = failed.get("version") if failed.get("name") == cfg.tracking.registered_model else None
    summary = {**summary, "registry": promote(tracking, cfg, store, summary["model_uri"],
                                              summary[f"val_{cfg.train.metric}"], version)}
    atomic_write_text(run_dir(cfg) / SUMMARY_FILE, json.dumps(summary, indent=2, default=str))
    return summary


def failed_registration(record: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The `registry` of a summary (or a search's chosen row) whose registration failed, else None."""
    registry = record.get("registry")
    return registry if isinstance(registry, dict) and registry.get("error") else None


def registration_error(record: dict[str, Any], what: str) -> Optional[str]:
    """One line where the model (`what`: "the model is logged") is at the record's model_uri but its
    registration failed, and how to retry it; None where it did not fail. trainers.train and
    tuning.search end with it, exit 1."""
    failed = failed_registration(record)
    if failed is None:
        return None
    return (f"{failed.get('name')}: {what} ({record.get('model_uri')}) but its registration failed "
            f"({failed['error']}); run the same command again to retry it")


def _promotion_failed(record: dict[str, Any], alias: str, model_uri: str, exc: Exception) -> dict[str, Any]:
    """The record of a failed promotion, said in one line: the model, version and why."""
    why = f"{type(exc).__name__}: {_one_line(exc)}"
    where = f"version {record['version']}" if record.get("version") else "no version registered"
    log.error("MLflow: %s (%s) did not take @%s: %s; the model stays logged at %s", record["name"], where, alias,
              why, model_uri)
    return {**record, "promoted": False, "error": why}


def _one_line(exc: BaseException) -> str:
    """An error's first line, cut short: MLflow's database errors run on with the SQL and a link."""
    return (str(exc).strip().splitlines() or [""])[0][:300]


UNUSABLE = (FileNotFoundError, CheckpointError)  # a holder whose model is gone or damaged serves nothing


def _judge(tracking: dict, cfg: Config, store: FeatureStore, holder) -> tuple[Optional[float], str]:
    """The alias holder's score to beat on this run's val split, and why (trainers.tracking.Judge):
    its re-score there, or, where it trained on this val split (a refit, tuning/refit.py), the score
    it was registered with. inf (it keeps the alias) where it cannot be compared: not this project's
    model, other inputs, a recorded score that is no number or not of this metric and val data.
    None (the new version takes the alias) where its model is gone or damaged: the alias serves
    nothing then, and kept, no later run could ever take it."""
    from mlflow.exceptions import MlflowException

    from trainers import tracking as tr

    try:
        model = tr.load_version(tracking, holder)
    except Exception as exc:  # noqa: BLE001 - whatever a foreign or broken model raises on loading
        missing = isinstance(exc, UNUSABLE) or (isinstance(exc, MlflowException)
                                                and exc.error_code == "RESOURCE_DOES_NOT_EXIST")
        text = _one_line(exc)
        if missing:
            log.warning("the @%s holder (version %s) cannot be loaded (%s): it gives up the alias", cfg.tracking.alias,
                        holder.version, text)
            return None, f"version {holder.version}'s model cannot be loaded ({text})"
        return _incomparable(cfg, holder, f"its model cannot be loaded as an embedding model ({text})")
    trained_on = holder.tags.get(tr.TRAINED_ON_TAG, "")
    if cfg.data.val_split in stored_splits(trained_on):
        return _recorded_score(tracking, cfg, store, holder, trained_on)
    return _score_on_val(model, store, cfg, holder)


def _incomparable(cfg: Config, holder, why: str) -> tuple[float, str]:
    """A holder that cannot be compared keeps the alias (inf): said once, with how to move it."""
    log.warning("the @%s holder (version %s) cannot be compared with this run's model: %s; it keeps the alias "
                "(move it by hand, or register under another tracking.registered_model)", cfg.tracking.alias,
                holder.version, why)
    return float("inf"), f"version {holder.version} cannot be compared: {why}"


def _recorded_score(tracking: dict, cfg: Config, store: FeatureStore, holder, trained_on: str) -> tuple[float, str]:
    """A holder trained on this val split would score its own training data there: it is held to the
    score it was registered with (its ensemble's before the refit), if that is a number, of this
    run's metric, measured on this very val split (its run's dataset digests)."""
    import math

    from trainers import tracking as tr

    tag = holder.tags.get("val_score")
    try:
        recorded = float(tag)
    except (TypeError, ValueError):
        recorded = float("nan")
    if not math.isfinite(recorded):
        return _incomparable(cfg, holder, f"it trained on {trained_on} and its recorded val_score {tag!r} is no number")
    if holder.tags.get("metric") != cfg.train.metric:
        return _incomparable(cfg, holder, f"its recorded score is of metric {holder.tags.get('metric')!r}, "
                                          f"this run's is {cfg.train.metric!r}")
    holder_val, digests = tr.run_digests(tracking, holder.run_id)  # by content: split names may differ
    ours = [store.identity["digests"].get(p) for p in stored_splits(cfg.data.val_split)]
    theirs = [digests.get(p) for p in stored_splits(holder_val or cfg.data.val_split)]
    if theirs != ours or None in ours:
        return _incomparable(cfg, holder, f"its recorded score is not of this run's {cfg.data.val_split} data "
                                          f"(digests {theirs} in its run, {ours} here)")
    log.info("the alias holder (version %s) was trained on %s: it keeps its registered score %s",
             holder.version, trained_on, tag)
    return recorded, f"version {holder.version} trained on {trained_on}: its registered score {recorded:.2f}"


def _score_on_val(model, store: FeatureStore, cfg: Config, holder) -> tuple[float, str]:
    """The alias holder's score on this run's validation split (inf where it takes other inputs or
    its score there is no number: it cannot be compared)."""
    import math

    from itmatch.eval.evaluate import evaluate_split

    if tuple(getattr(model, "dims", ())) != tuple(store.dims):
        log.warning("the champion takes %s, this run's data is %s: it cannot be scored on this validation split, "
                    "so it keeps the alias", _inputs(getattr(model, "dims", None)), _inputs(store.dims))
        return float("inf"), f"version {holder.version} takes {_inputs(getattr(model, 'dims', None))}"
    try:
        scores = evaluate_split(model, store.split(cfg.data.val_split), chunk=cfg.train.eval_chunk)
        score = float(scores[cfg.train.metric])
    except Exception as exc:  # noqa: BLE001 - a holder that cannot be scored here is not comparable
        return _incomparable(cfg, holder, f"scoring it on {cfg.data.val_split} failed ({type(exc).__name__}: "
                                          f"{_one_line(exc)})")
    if not math.isfinite(score):
        return _incomparable(cfg, holder, f"it scores {cfg.train.metric} {score} on {cfg.data.val_split}")
    return score, f"version {holder.version} re-scored on {cfg.data.val_split}: {score:.2f}"


def _inputs(dims) -> str:
    """What a model takes or a store holds, in words: raw pictures and text (a raw store's (0, 0))
    or precomputed features of given widths."""
    if dims is None or not tuple(dims):
        return "inputs of unknown widths"
    return "raw pictures and text" if not any(dims) else f"precomputed features of widths {tuple(dims)}"


def pictures_of(model, cfg: Config, store: FeatureStore, split: str, folder: Path, title: str,
                embeddings=None) -> dict[str, Path]:
    """The pictures of a model on a store's split (image-caption retrieval or phrase localization)."""
    kw = dict(embeddings=embeddings, n_queries=cfg.eval.picture_queries, k=cfg.eval.picture_top_k,
              max_images=cfg.eval.picture_map_images, seed=cfg.train.seed, title=title)
    if cfg.data.task == "phrases":
        from itmatch.eval.phrase_pictures import model_phrase_pictures

        return model_phrase_pictures(model, store, split, folder, **kw)
    from itmatch.eval.pictures import model_pictures

    return model_pictures(model, store, split, folder, **kw)


def _fmt(metrics: dict[str, float]) -> str:
    from itmatch.eval.retrieval import format_metrics

    return format_metrics(metrics)


def _pictures(cfg: Config, store: FeatureStore, model, embeddings) -> dict[str, Path]:
    """eval.pictures: the test split's embedding map and example queries in run_dir/pictures, from
    the best model and its test embeddings (phrase localization: example phrases with their top
    boxes drawn on the picture); a failure to draw warns, never fails the run."""
    if not cfg.eval.pictures:
        return {}
    try:
        return pictures_of(model, cfg, store, cfg.data.test_split, run_dir(cfg) / "pictures",
                           f"{cfg.run.name}: example queries on {cfg.data.test_split}", embeddings=embeddings)
    except Exception as exc:  # noqa: BLE001 - a picture is never worth a failed run
        log.warning("pictures not drawn: %s: %s", type(exc).__name__, exc)
        return {}
