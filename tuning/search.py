"""Ray Tune over the dotted config keys; every trial is a Ray Train job, or, with one DDP worker
(`search.trial_workers=1`), the same job trained inside its Tune process (trainers/in_process.py).

    python -m tuning.search --config configs/flickr8k_precomp.yaml --space configs/search/eq6.yaml \\
        --num-samples 16 --search optuna --scheduler asha --max-concurrent 2 [key=value ...]

The space file maps dotted keys (the same as the CLI's) to a distribution:
`{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}`, `{randint: [lo, hi]}` (hi included), `{choice: [a, b, ...]}`,
`{grid: [a, b, ...]}`. Every key and every bound is checked against the config before Ray starts.
Every flag is also a `search.*` config key (the flags override them), so a preset with a `search:`
section reproduces a search. The driver resolves the whole config (absolute paths included) and
featurises the data once; each trial runs `trainers.job.run_job` on the resolved config plus its
sampled params (its own run folder, config.yaml, checkpoints and summary), reports every epoch to
Tune and logs an MLflow run nested under the search's run. Re-running the same command restores the
Tune experiment (Tuner.restore, searcher state included), provided the search's settings are the
ones it started with (tuning/restore.py); one driver runs a search at a time. With `search.rerun_top` N > 0 the N
best finished trials (with `search.rerun_per` KEY: of each value of KEY, a stopped trial standing in
for a value the scheduler stopped entirely) are then re-run with `search.rerun_seeds` more seeds
(tuning/rerun.py) and the configuration with the best mean validation score wins
(tuning/select.py); otherwise the best finished trial does. Only that choice (its best-validation
seed's model, or with `search.ensemble` the ensemble of the re-run configurations' seeds, CCA at
`search.ensemble_cca` beside them) is registered, and it takes
the alias only if it beats the holder (re-scored on the same validation split); the trial table
(mean ± std over seeds) and plots go to the search folder and the parent run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see trainers/train.py)
# Ray Train's controller takes one worker report per poll (default every 2 s), so no epoch is shorter
# than the poll: a trial (16-24 short epochs) would spend most of its time waiting. The local cluster
# this driver starts passes its environment to every Ray process, the controllers included.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

from itmatch.config import Config, ConfigError, load_config, read_overrides  # noqa: E402
from itmatch.data.sources import DataError  # noqa: E402
from itmatch.data.raw import open_store  # noqa: E402
from itmatch.data.store import FeatureStore  # noqa: E402
from itmatch.files import FolderError, atomic_write_text, exclusive, read_problem  # noqa: E402
from trainers import in_process, placement, preflight  # noqa: E402
from trainers.logs import setup_logging  # noqa: E402
from tuning import refit, registry, report, rerun, restore, select  # noqa: E402
from tuning.space import load_space  # noqa: E402

log = logging.getLogger("itmatch.tune")
# CLI flag -> the search.* key it overrides
FLAGS = {"space": "space", "name": "name", "num_samples": "num_samples", "max_concurrent": "max_concurrent",
         "search": "algorithm", "scheduler": "scheduler", "rerun_top": "rerun_top", "rerun_seeds": "rerun_seeds",
         "ensemble": "ensemble"}


def trial_config(setup: dict, params: dict[str, Any], trial_id: str) -> Config:
    """The trial's config: the driver's resolved tree (absolute paths; no preset is re-read, as the
    trial runs in its own folder), its sampled params, its own run, no registration (the search
    registers its best trial once), no pictures (`trainers.evaluate --pictures` draws the chosen
    model's) and no plots (the search draws the chosen run's when it logs its model)."""
    return load_config(None, {**setup["base"], **params, "run.name": trial_id, "eval.pictures": False,
                              "eval.plots": False, "run.storage_path": setup["trials_dir"],
                              "tracking.registered_model": None, "tracking.log_model": False})


def run_trial(config: dict, setup: dict) -> None:
    """Tune function trainable: one job (trainers.job.run_job) with the sampled params."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainers.job import Stopped, run_job

    setup_logging()
    params, trial_id = config["params"], tune.get_context().get_trial_id()
    cfg = trial_config(setup, params, trial_id)
    exploited = tune.get_checkpoint()
    if exploited is not None:  # PBT: go on from a better trial's checkpoint with these params
        cfg = _next_generation(cfg, setup, trial_id, exploited.path)
    if _report_finished(cfg):
        return
    tags = {"mlflow.parentRunId": setup["parent_run_id"], "itmatch.search": setup["name"],
            report.TRIAL_TAG: trial_id} if setup["parent_run_id"] else None
    name = report.run_name(setup["name"], cfg.run.name, params)
    wanted = _still_running()
    try:
        if in_process.can_run(cfg):  # one worker: this trial process trains it (trainers/in_process.py)
            run_job(cfg, open_store(setup["store"]), tags=tags, run_name=name, wanted=wanted,
                    forward=_tune_forward(setup.get("checkpoints_to_tune", False), wanted))
            return
        if setup.get("checkpoints_to_tune"):
            _forward_checkpoints()
        run_job(cfg, open_store(setup["store"]), tags=tags, callbacks=[TuneReportCallback()], run_name=name,
                wanted=wanted)
    except Stopped as stopped:  # nobody listens any more: the search already counts this trial stopped
        log.info("%s", stopped)


def _still_running():
    """Whether Tune still runs this trial. Tune stops a trial (ASHA, PBT) by ending its session while
    the training goes on in its thread until the actor is gone -- a Ray Train run to its last epoch,
    reports going nowhere. Left alone, such a trial would write its summary and end its MLflow run
    FINISHED after the search has counted it stopped (and ended that run KILLED)."""
    from ray.train._internal.session import get_session

    session = get_session()
    return lambda: get_session() is session


def _tune_forward(with_checkpoints: bool, wanted: Callable[[], bool]):
    """An in-process trial's report: every epoch's metrics to Tune, with its checkpoint folder when
    the scheduler clones trials by their checkpoints (PBT; Tune copies the folder). A trial Tune has
    stopped ends at the epoch's end (its checkpoint is written) instead of training on unheard."""
    from ray import tune

    from trainers.job import Stopped

    def forward(metrics: dict, folder: Optional[Path]) -> None:
        if not wanted():
            raise Stopped(f"stopped by Tune after epoch {metrics.get('epoch')}")
        keep = with_checkpoints and folder is not None
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(folder)) if keep else None)

    return forward


def trial_resources(setup: dict):
    """What Tune reserves for a trial: the CPUs (and GPU) of its one worker when it trains in its own
    process; else nothing, as the trial only drives its Ray Train workers (which must not wait for a
    CPU their own trial holds; Tune refuses an empty request, hence one byte of memory)."""
    from ray import tune

    def resources(config: dict):
        held = in_process.held_resources(trial_config(setup, config["params"], "resources"), setup["worker_cpus"])
        return tune.PlacementGroupFactory([held or {"CPU": 0, "memory": 1}])

    return resources


def _next_generation(cfg: Config, setup: dict, trial_id: str, checkpoint: str) -> Config:
    """A PBT trial that exploits another's checkpoint runs as a new generation of itself: its own run
    folder `<trial>-g<n>` that starts from that checkpoint (`run.start_from`: the weights, moments,
    epoch and schedule position, with this trial's mutated params)."""
    n = len(list(Path(setup["trials_dir"]).glob(f"{trial_id}-g*"))) + 1
    log.info("trial %s (generation %d) continues from %s with %s", trial_id, n, checkpoint, cfg.optim.lr)
    return load_config(None, {**cfg.flat(), "run.name": f"{trial_id}-g{n}", "run.start_from": checkpoint})


def _forward_checkpoints() -> None:
    """Hand every checkpoint Ray Train reports to Tune as well (PBT clones trials by their Tune
    checkpoints). Ray's TuneReportCallback passes only the checkpoint's path, as a metric, which the
    trial's Tune session reports as a plain result; this turns it back into a checkpoint there."""
    from ray.train import Checkpoint
    from ray.train._internal.session import get_session
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    session = get_session()
    plain = session.report

    def report(metrics: dict, checkpoint=None) -> None:
        path = metrics.pop(CHECKPOINT_PATH_KEY, None)
        plain(metrics, checkpoint=checkpoint or (Checkpoint(path) if path else None))

    session.report = report


def _report_finished(cfg: Config) -> bool:
    """A trial whose job already ended (the search was killed before Tune recorded it) reports its
    summary instead of running, finalizing and logging its model again."""
    from ray import tune

    from trainers.job import SUMMARY_FILE, run_dir, usable_summary

    # cut short or hand-edited: a traceback inside the trial before
    summary = usable_summary(run_dir(cfg) / SUMMARY_FILE, cfg.train.metric,
                             "the trial runs again (from its checkpoints)")
    if summary is None:
        return False
    log.info("trial %s finished before the search stopped: reporting its summary", cfg.run.name)
    tune.report({"epoch": cfg.train.epochs, "best_metric": summary[f"val_{cfg.train.metric}"]})
    return True


def share_cpus(cfg: Config, nodes: list[dict[str, float]]) -> Config:
    """With several trials at once and no scaling.cpus_per_worker, give each worker an equal share
    (fractional below one CPU) so the concurrent trials fit, node by node (trainers.placement). A
    trial that still does not fit waits for its placement group: trials queue, they never hold part
    of the CPUs and deadlock."""
    s = cfg.scaling
    if s.cpus_per_worker or cfg.search.max_concurrent == 1:
        return cfg
    slots = s.num_workers * cfg.search.max_concurrent
    share = placement.largest_share(nodes, slots, s.use_gpu, fractional=True)
    if share is None:  # not all at once even so (GPUs short): the CPUs' share; the rest queue
        share = sum(n.get("CPU", 0.0) for n in nodes) / slots
        share = math.floor(share) if share >= 1 else max(0.01, math.floor(share * 100) / 100)
    return load_config(None, {**cfg.flat(), "scaling.cpus_per_worker": share})


def run_search(cfg: Config, space: dict[str, dict], store: FeatureStore, search_dir: Path) -> list[dict]:
    from trainers.train import exit_on_sigterm, init_ray

    init_ray(hardest_trial(cfg, space))  # Ray Train's worker groups if any trial can have one
    exit_on_sigterm()  # again: Ray's driver installs its own SIGTERM handler, which aborts
    cfg = share_cpus(cfg, placement.nodes())
    preflight.check_cluster(hardest_trial(cfg, space))  # else Tune waits forever for a trial's workers
    search_dir.mkdir(parents=True, exist_ok=True)
    parent = None
    if cfg.tracking.enabled:
        from trainers.tracking import start_run

        parent = start_run(cfg, str(search_dir), store, tags={"itmatch.search": cfg.search.name})
    try:
        return _search(cfg, space, store, search_dir, parent)
    except BaseException as exc:  # noqa: BLE001 - the parent run must not stay RUNNING; re-raised
        if parent:
            from trainers.tracking import end_run

            # interrupted: KILLED (a restore reopens it); anything else: FAILED
            end_run(parent, "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED", if_running=True)
        raise


def _search(cfg: Config, space: dict[str, dict], store: FeatureStore, search_dir: Path,
            parent: Optional[dict]) -> list[dict]:
    """The trials, their seed re-runs and the choice; `parent`: the search's MLflow run, if tracked."""
    from ray import tune

    from trainers.job import cpus_per_worker
    from tuning.asha import rungs_path

    setup = {"base": cfg.flat(), "store": str(store.root.resolve()), "trials_dir": str(search_dir / "trials"),
             "reruns_dir": str(rerun.folder(search_dir)), "name": cfg.search.name,
             "parent_run_id": parent["run_id"] if parent else None,
             "checkpoints_to_tune": registry.needs_checkpoints(cfg), "worker_cpus": cpus_per_worker(cfg)}
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), trial_resources(setup))
    path = str(search_dir / "tune")
    # Tune keeps every checkpoint a trial reports: only PBT trials report any (registry.needs_checkpoints),
    # and PBT clones the one its donor held at the last perturbation, which a cap (4) had pruned by the
    # time a queued clone started ("does not exist on storage anymore")
    if _restorable(search_dir):
        log.info("resuming the search in %s", path)
        tuner = _restore(path, trainable)
    else:
        rungs_path(search_dir).unlink(missing_ok=True)  # an earlier search's rungs, its Tune folder gone
        tuner = tune.Tuner(trainable, param_space={"params": registry.params_space(cfg, space)},
                           tune_config=_tune_config(cfg, space, search_dir),
                           run_config=tune.RunConfig(name="tune", storage_path=str(search_dir), verbose=1,
                                                     checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                                                     failure_config=_trial_failures(cfg)))
    rows = [report.trial_row(r, search_dir / "trials") for r in tuner.fit()]
    reruns = _rerun_top(cfg, rows, setup)
    _finish(cfg, store, rows, reruns, setup, parent, search_dir)
    return rows


def _restore(path: str, trainable: Any) -> Any:
    """Tuner.restore; Tune state that cannot be read back is the user's to decide about (restore.
    check_tune_state catches the damage it can see without unpickling; this, the rest)."""
    import pickle

    from ray import tune

    try:
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, KeyError, TypeError, ValueError) as exc:
        said = read_problem(exc)[:300]
        raise ConfigError(f"{path}/{restore.TUNER_FILE}: cannot restore the search's Tune state ({said}): start a "
                          f"new search with another --name, or delete {Path(path).parent} to start this one over") \
            from None


def _trial_failures(cfg: Config):
    """run.max_failures for trials that train in their own process (Tune restarts them; they resume
    from their run folder's newest checkpoint). A Ray Train trial's workers are restarted by Ray
    Train itself with the same budget, so Tune does not retry it again."""
    from ray import tune

    return tune.FailureConfig(max_failures=cfg.run.max_failures if in_process.can_run(cfg) else 0)


def _rerun_top(cfg: Config, rows: list[dict], setup: dict) -> list[dict]:
    """The seed re-runs of the best `search.rerun_top` finished trials (none by default)."""
    top = select.top_trials(rows, cfg.train.metric, cfg.search.rerun_top, cfg.search.rerun_per) \
        if cfg.search.rerun_top else []
    items = rerun.plan(top, setup, cfg.search.rerun_seeds)
    if items:
        log.info("re-running the top %d trial(s) with %d more seed(s) each", len(top), cfg.search.rerun_seeds)
    return rerun.run_all(items, setup, cfg.search.max_concurrent) if items else []


def _tune_config(cfg: Config, space: dict[str, dict], folder: Path):
    from ray import tune

    # best_metric: the best validation score so far, what a trial is finally judged (and selected) by.
    # Trials that train in their own process run one after another in the same actors: the next one
    # finds torch, MLflow and the model code imported (a fresh actor spends ~3-4 s on that).
    return tune.TuneConfig(metric="best_metric", mode="max", num_samples=cfg.search.num_samples,
                           search_alg=registry.searcher(cfg, space), scheduler=registry.scheduler(cfg, space, folder),
                           reuse_actors=in_process.can_run(cfg))


def _finish(cfg: Config, store: FeatureStore, rows: list[dict], reruns: list[dict], setup: dict,
            parent: Optional[dict], search_dir: Path) -> None:
    """End every child run, pick the configuration (tuning/select.py), register its model, write the
    table and plots."""
    from trainers.job import failed_registration

    metric = cfg.train.metric
    seeds = {r["trial_id"]: rerun.trial_seed(setup, r["params"]) for r in rows}
    choice, candidates = select.select(rows, reruns, metric, cfg.search.rerun_top, seeds, cfg.search.rerun_per)
    best = _best_row(rows, choice)
    if parent:
        report.close_child_runs(parent, rows, reruns)
    previous = _previous_best(search_dir, best)
    failed = previous is not None and failed_registration(previous) and previous.get("registered")
    if previous is not None and not failed:  # a re-run of a finished search: its choice is registered already
        best.update(registry=previous["registry"], registered=previous.get("registered"))
    elif failed and parent:  # its registration failed (the registry unwritable): retried, as trainers.train does
        log.info("the search's registration failed (%s); trying it again", previous["registry"]["error"])
        best["registered"] = previous["registered"]
        best["registry"] = _promote(cfg, store, parent, best["registered"], previous["registry"].get("version"))
    elif best and parent:  # the choice is logged as a model (and registered) once
        if cfg.search.refit and not cfg.search.ensemble:
            log.warning("search.refit=true without search.ensemble: the chosen run is registered as trained")
        model = ensemble_model(cfg, choice, candidates, search_dir, parent, setup) if cfg.search.ensemble else \
            choice["model"]
        model = _logged(model, parent, store, cfg)
        # what a re-run needs to retry a failed registration without logging the model again
        best["registered"] = {"model_uri": model["model_uri"], "run_id": model["run_id"], "val": model["val"],
                              "refit": bool(model.get("refit"))}
        if cfg.tracking.registered_model:
            best["registry"] = _promote(cfg, store, parent, best["registered"])
    result = {"best": best, "trials": rows, "candidates": candidates, "reruns": reruns}
    atomic_write_text(search_dir / "search.json", json.dumps(result, indent=2, default=str))
    report.plot_params(rows, metric, search_dir / "plots")
    if parent:
        report.log_parent(parent, rows, best, metric, search_dir, candidates)
    print(report.table(rows, metric, best, candidates if reruns else None))


def _logged(model: dict, parent: dict, store: FeatureStore, cfg: Config) -> dict:
    """The chosen model with an MLflow model to register: trials and re-runs log none (logging costs
    seconds per trial and only one is ever registered), so it is logged now, into its own run, with
    the plots the trials skip (eval.plots)."""
    if model.get("model_uri"):
        return model
    from trainers.tracking import log_model

    tracking = {**parent, "run_id": model["run_id"]}
    if cfg.eval.plots:
        _plots(tracking, Path(model["checkpoint"]), store, cfg)
    model["model_uri"] = log_model(tracking, Path(model["checkpoint"]), store).model_uri
    return model


def _plots(tracking: dict, best: Path, store: FeatureStore, cfg: Config) -> None:
    """The chosen run's plots (its test split, its history) beside its checkpoint and in its MLflow
    run, as its own job would have drawn them; a failure warns (the model is still registered)."""
    from trainers.results import evaluate_folder
    from trainers.tracking import log_folder

    folder = best.parent / "plots"
    try:
        evaluate_folder(best, store.split(cfg.data.test_split), cfg, plots_dir=folder)
        log_folder(tracking, folder, "plots")
    except Exception as exc:  # noqa: BLE001 - plots are never worth the registration
        log.warning("plots of the chosen run not drawn: %s: %s", type(exc).__name__, exc)


def ensemble_model(cfg: Config, choice: dict, candidates: list[dict], search_dir: Path,
                   parent: dict, setup: Optional[dict] = None) -> dict[str, Any]:
    """The seed runs of the best `search.ensemble_top` configurations (the chosen one alone by
    default) as one ensemble model (trainers.ensemble), evaluated and logged as a child of the
    search's run; recorded in the choice as its model. One run: that run. With `search.refit`, that
    ensemble re-trained on train+val (tuning/refit.py; its re-runs need the search's `setup`) is the
    model, the one before it recorded."""
    from trainers.ensemble import build, evaluate_and_log, in_search

    runs = select.ensemble_members(candidates, cfg.search.ensemble_top, cfg.search.rerun_per)
    if len(runs) < 2:
        return choice["model"]
    members = [s["checkpoint"] for s in runs]
    ens_cfg, folders = build(members, f"{cfg.search.name}-ensemble", in_search(cfg, search_dir))
    summary = evaluate_and_log(ens_cfg, folders, members, tags={"mlflow.parentRunId": parent["run_id"]},
                               cca_weight=cfg.search.ensemble_cca, cca_dim=cfg.search.ensemble_cca_dim,
                               cca_key="search.ensemble_cca_dim",
                               hubness=cfg.search.ensemble_hubness)
    metric = cfg.train.metric
    one = len({s["trial_id"] for s in runs}) == 1  # the chosen configuration's seeds: named by seed
    choice["model"] = {"seed": [s["seed"] if one else f"{s['trial_id']}:{s['seed']}" for s in runs]
                       + (["cca"] if cfg.search.ensemble_cca else []), "weights": summary["weights"],
                       "val": summary[f"val_{metric}"], "test": summary["test"].get(metric),
                       "hubness": summary["hubness"], "run_id": summary.get("run_id"),
                       "model_uri": summary.get("model_uri"),
                       "checkpoint": summary["best_checkpoint"]}
    log.info("ensemble of %d runs %s: val %s %.2f (best run alone %.2f)", len(runs), choice["model"]["seed"], metric,
             choice["model"]["val"], max(s["val"] for s in runs))
    if cfg.search.refit and setup is None:
        raise ValueError("search.refit re-runs the ensemble's members: ensemble_model needs the search's setup")
    refitted = refit.refit_ensemble(cfg, runs, summary, setup, search_dir, parent) if cfg.search.refit else None
    if refitted is not None:
        before = {k: choice["model"][k] for k in ("test", "run_id", "model_uri", "checkpoint")}
        choice["model"].update(test=refitted["test"].get(metric), run_id=refitted.get("run_id"),
                               model_uri=refitted.get("model_uri"), checkpoint=refitted["best_checkpoint"],
                               hubness=refitted["hubness"], refit={**refitted["refit"], "before": before})
    return choice["model"]


def _best_row(rows: list[dict], choice: Optional[dict]) -> Optional[dict]:
    """The chosen trial's row with its selection (seeds, mean, std, registered seed) attached."""
    if choice is None:
        return None
    row = next(r for r in rows if r["trial_id"] == choice["trial_id"])
    return {**row, "selection": choice}


def _promote(cfg: Config, store: FeatureStore, parent: dict, model: dict, version: Optional[str] = None) -> dict:
    """Register the chosen, logged model (`version`: one a failed attempt registered already); a refit
    is registered as trained on its union of splits."""
    from trainers.job import promote

    reg_cfg = refit.trained_on(cfg) if model.get("refit") else cfg
    return promote({**parent, "run_id": model["run_id"]}, reg_cfg, store, model["model_uri"], model["val"], version)


def _previous_best(search_dir: Path, best: Optional[dict]) -> Optional[dict]:
    """The chosen row of this search's previous finish, if it chose the same trial and registered it
    (or tried to: `registry` holds an `error` then)."""
    path = search_dir / "search.json"
    if best is None or not path.is_file():
        return None
    before = (json.loads(path.read_text()).get("best") or {})
    return before if before.get("trial_id") == best["trial_id"] and isinstance(before.get("registry"), dict) else None


def registration_error(search_dir: Path) -> Optional[str]:
    """One line where the search's chosen model was logged but its registration failed, else None."""
    from trainers.job import registration_error as failed

    path = search_dir / "search.json"
    best = (json.loads(path.read_text()).get("best") or {}) if path.is_file() else {}
    return failed({**best, "model_uri": (best.get("registered") or {}).get("model_uri")}, "the search's chosen model is logged")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuning.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset for every trial (may hold a search: section)")
    parser.add_argument("--space", help="search.space: YAML, dotted key -> {uniform|loguniform|randint|choice|grid: [...]}")
    parser.add_argument("--name", help="search.name: folder under run.storage_path; re-run to resume")
    parser.add_argument("--num-samples", type=int, help="search.num_samples (each grid point repeated this often)")
    parser.add_argument("--max-concurrent", type=int, help="search.max_concurrent: trials at once")
    parser.add_argument("--search", choices=sorted(registry.SEARCHERS), help="search.algorithm")
    parser.add_argument("--scheduler", choices=sorted(registry.SCHEDULERS), help="search.scheduler")
    parser.add_argument("--rerun-top", type=int, help="search.rerun_top: re-run this many best trials with more seeds")
    parser.add_argument("--rerun-seeds", type=int, help="search.rerun_seeds: extra train.seed values per re-run trial")
    parser.add_argument("--ensemble", action="store_true", default=None,
                        help="search.ensemble: register the chosen configuration's seed runs as one ensemble")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and the checked space, and exit (nothing is started)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every trial (search.* included)")
    return parser


def resolve(args: argparse.Namespace) -> tuple[Config, dict[str, dict]]:
    """The search's config (flags over dotted overrides over the preset; its own run is named after
    the search; every path absolute) and its checked space."""
    from trainers.job import absolute_paths
    from trainers.train import warn_relative_paths

    named = read_overrides(args.overrides).get("run.name")
    if named is not None:  # replaced by search.name below, without a word
        raise ConfigError(f"run.name={named!r}: a search's folder and MLflow run are named by --name (search.name), "
                          "its trials' by Tune; use --name")
    given = [(flag, key) for flag, key in FLAGS.items() if getattr(args, flag) is not None]
    flags = [f"search.{key}={json.dumps(getattr(args, flag))}" for flag, key in given]
    # a refused flag named as typed: `--num-samples 0` was "search.num_samples = 0 (an override)"
    origins = {f"search.{key}": "--" + flag.replace("_", "-") for flag, key in given}
    cfg = load_config(args.config, [*args.overrides, *flags], origins)
    cfg = load_config(None, {**cfg.flat(), "run.name": cfg.search.name,
                             "scaling.num_workers": cfg.search.trial_workers or cfg.scaling.num_workers})
    warn_relative_paths(cfg)
    cfg = absolute_paths(cfg)
    registry.pick(registry.SEARCHERS, "search.algorithm", cfg.search.algorithm)
    registry.pick(registry.SCHEDULERS, "search.scheduler", cfg.search.scheduler)
    if not cfg.search.space:
        raise ConfigError("no search space: pass --space FILE or set search.space")
    return cfg, load_space(cfg.search.space, cfg)


def main(argv: Optional[list[str]] = None) -> int:
    from trainers.train import exit_on_sigterm, prepare_store

    setup_logging()
    exit_on_sigterm()
    # intermixed: overrides may follow a flag (`--name s a=1 --num-samples 2 b=2`), which parse_args refuses
    args = build_parser().parse_intermixed_args(argv)
    with contextlib.ExitStack() as held:
        try:
            cfg, space = resolve(args)
            registry.searcher(cfg, space)  # a searcher or scheduler that refuses the config fails here, before Ray
            registry.scheduler(cfg, space)
            if args.print_config:
                print(json.dumps({"config": cfg.model_dump(), "space": space}, indent=2, default=str))
                return 0
            search_dir = Path(cfg.run.storage_path) / cfg.search.name
            _check_before_start(search_dir)
            store = prepare_store(cfg)
            if cfg.search.ensemble and cfg.search.ensemble_cca > 0:  # else refused after every trial had run
                preflight.check_cca_dim(store, cfg.search.ensemble_cca_dim, "search.ensemble_cca_dim")
            preflight.check_batch(hardest_trial(cfg, space), store)
            preflight.check_tracking(cfg)
            held.enter_context(exclusive(search_dir, f"search {cfg.search.name!r}"))  # one driver per search
            if _restorable(search_dir):
                restore.check(cfg, space, search_dir)
                restore.check_tune_state(search_dir)
        except (ConfigError, DataError, FolderError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        restore.save(cfg, space, search_dir)
        try:
            rows = run_search(cfg, space, store, search_dir)
        except ConfigError as exc:  # the cluster: unreachable, or cannot place a trial's workers; damaged Tune state
            print(f"error: {exc}", file=sys.stderr)
            return 2
    failed = registration_error(search_dir)
    if failed:  # a search reported as succeeded would hide a choice that never reached the registry
        print(f"error: {failed}", file=sys.stderr)
        return 1
    return 0 if any(r["summary"] for r in rows) else 1


def _check_before_start(search_dir: Path) -> None:
    """What the environment and the folder must be before data is featurised or Ray starts."""
    from trainers.job import refuse_other_kind
    from trainers.loop import fault_injection

    fault_injection()  # the trials read ITMATCH_*: a malformed one would fail every trial mid-run
    refuse_other_kind(search_dir, "search")  # Tune state and trials written beside a run's checkpoints


def _restorable(search_dir: Path) -> bool:
    """Whether re-running restores a Tune experiment there (what _search does)."""
    from ray import tune

    return tune.Tuner.can_restore(str(search_dir / "tune"))


def hardest_trial(cfg: Config, space: dict[str, dict]) -> Config:
    """The base config with the largest batch and the most workers the space can sample: what the
    training driver's preflight checks, made once for every trial before Ray starts."""
    worst = {}
    for key in ("data.batch_size", "scaling.num_workers"):
        for kind, values in space.get(key, {}).items():
            worst[key] = max(values)  # randint's [lo, hi] includes hi (tuning/space.py)
    return load_config(None, {**cfg.flat(), **worst}) if worst else cfg


if __name__ == "__main__":
    sys.exit(main())
