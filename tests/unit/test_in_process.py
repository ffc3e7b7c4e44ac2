"""A one-worker job trained in the calling process (trainers/in_process.py), as one-worker Tune
trials and seed re-runs do: its checkpoints are written atomically and pruned, every epoch reaches
`forward`, and a run killed after a checkpoint and started again ends with the weights of a run
that was never interrupted (checked against a plain Trainer loop with no checkpoints at all)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from itmatch.config import ConfigError, load_config
from itmatch.data.store import prepare
from itmatch.state import checkpoint_candidates, load_checkpoint, pick_resume_checkpoint
from trainers import in_process
from trainers.dist import WorkerContext
from trainers.loop import Trainer

BASE = ["data.source=x", "data.batch_size=24", "train.epochs=3", "model.hidden_dim=32", "model.embed_dim=16",
        "optim.lr=1e-3", "scaling.num_workers=1", "run.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shapes")
    return prepare(f"synthetic:{tmp / 'shapes'}?n_images=40", cache_dir=tmp / "cache", image_encoder="pixels",
                   text_encoder="hashing", splits=["train", "val", "test"], progress=False)


def _fit(store, folder: Path, *overrides: str) -> tuple[in_process.LocalResult, list]:
    reports: list = []
    cfg = load_config(None, [*BASE, *overrides])
    result = in_process.fit_in_process(cfg, store, None, folder, 1, lambda m, p: reports.append((m, p)))
    return result, reports


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder)[0]["model"]


def test_every_epoch_is_reported_with_its_checkpoint_and_only_the_newest_are_kept(store, tmp_path):
    result, reports = _fit(store, tmp_path / "run")
    assert [int(m["epoch"]) for m, _ in reports] == [1, 2, 3]
    assert [p.name for _, p in reports] == ["checkpoint_000001", "checkpoint_000002", "checkpoint_000003"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint_000002", "checkpoint_000003"]
    assert Path(result.checkpoint.path) == tmp_path / "run" / "checkpoint_000003"
    # what trainers.job.finalize and a resume read: an intact checkpoint holding the best weights
    assert pick_resume_checkpoint(checkpoint_candidates(None, tmp_path / "run"))[0].name == "checkpoint_000003"
    assert (Path(result.checkpoint.path) / "best").is_dir()


def test_killed_after_a_checkpoint_then_started_again_equals_a_plain_uninterrupted_loop(store, tmp_path, monkeypatch):
    cfg = load_config(None, BASE)
    plain = Trainer(cfg, store, WorkerContext(0, 1, 0, torch.device("cpu")), None)
    torch.set_num_threads(1)
    plain.fit(lambda metrics, save: None)  # the reference: one loop, never saved, never restored
    monkeypatch.setenv("ITMATCH_FAIL_AT_EPOCH", "2")
    with pytest.raises(RuntimeError, match="injected failure after epoch 2"):
        _fit(store, tmp_path / "run")
    assert in_process.newest_checkpoint(tmp_path / "run").name == "checkpoint_000002"
    result, reports = _fit(store, tmp_path / "run")  # the same call again: it resumes at epoch 3
    assert [int(m["epoch"]) for m, _ in reports] == [3]
    got = _weights(Path(result.checkpoint.path))
    for key, value in plain.strategy.full_state_dict(plain.model).items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def test_a_run_whose_checkpoints_are_all_damaged_starts_over_and_keeps_them_aside(store, tmp_path, monkeypatch):
    """Started over with them in place, the new run's checkpoints of the same epochs replaced them and
    its pruning deleted the rest, with the best weights inside them that were intact."""
    monkeypatch.setenv("ITMATCH_FAIL_AT_EPOCH", "2")
    with pytest.raises(RuntimeError, match="injected failure after epoch 2"):
        _fit(store, tmp_path / "run")
    monkeypatch.delenv("ITMATCH_FAIL_AT_EPOCH")
    damaged = {}
    for folder in in_process.checkpoints(tmp_path / "run"):
        state = folder / "state.pt"
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte: its checksum fails
        state.write_bytes(bytes(data))
        damaged[folder.name] = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert sorted(damaged) == ["checkpoint_000001", "checkpoint_000002"]
    result, reports = _fit(store, tmp_path / "run")
    assert [int(m["epoch"]) for m, _ in reports] == [1, 2, 3]  # started over
    kept = tmp_path / "run" / "damaged" / "1"
    assert sorted(p.name for p in kept.iterdir()) == sorted(damaged)
    for name, files in damaged.items():
        assert {p.relative_to(kept / name): p.read_bytes() for p in (kept / name).rglob("*") if p.is_file()} == files
    assert pick_resume_checkpoint(checkpoint_candidates(None, tmp_path / "run"))[0].name == "checkpoint_000003"


def test_a_checkpoint_that_lost_its_best_weights_is_damaged(store, tmp_path):
    """Its checksums did not cover best/: a resume took the checkpoint, and with no best weights
    restored the epoch's own were saved, evaluated and registered as the best epoch's."""
    import shutil

    _fit(store, tmp_path / "run")
    newest = tmp_path / "run" / "checkpoint_000003"
    shutil.rmtree(newest / "best")
    chosen, skipped = pick_resume_checkpoint(checkpoint_candidates(None, tmp_path / "run"))
    assert chosen.name == "checkpoint_000002" and skipped[0][0] == newest
    assert "best/checksums.json: missing" in skipped[0][1]
    (newest / "best").mkdir()  # a best/ whose weights are gone or differ is damaged too
    (newest / "best" / "checksums.json").write_text(json.dumps({"state.pt": "0" * 64}))
    assert pick_resume_checkpoint(checkpoint_candidates(None, tmp_path / "run"))[0].name == "checkpoint_000002"


def test_a_finished_runs_missing_best_model_comes_back_from_its_checkpoint(store, tmp_path, caplog):
    """Re-running a finished run said "finished already" with its best_model/ deleted; evaluate and
    serve found nothing there. Restored only from the best weights of the epoch the summary names."""
    from trainers.job import restore_best_model

    _fit(store, tmp_path / "run")
    cfg = load_config(None, [*BASE, f"run.storage_path={tmp_path}", "run.name=run"])
    inner = tmp_path / "run" / "checkpoint_000003" / "best"
    epoch = load_checkpoint(inner)[0]["train_state"].best_epoch
    best = tmp_path / "run" / "best_model"
    restore_best_model(cfg, {"best_checkpoint": str(best), "best_epoch": epoch + 1})  # another epoch's: kept out
    assert not best.exists()
    restore_best_model(cfg, {"best_checkpoint": str(best), "best_epoch": epoch})
    assert (best / "state.pt").read_bytes() == (inner / "state.pt").read_bytes()
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == []


def test_a_half_written_checkpoint_never_takes_a_checkpoints_name(tmp_path):
    def dies(folder: Path) -> None:
        (folder / "state.pt").write_bytes(b"half")
        raise OSError("disk full")

    tmp_path.mkdir(exist_ok=True)
    with pytest.raises(OSError, match="disk full"):
        in_process.write_checkpoint(tmp_path, 4, dies)
    assert in_process.newest_checkpoint(tmp_path) is None
    # the next save of the same epoch replaces the leftover and lands under the name
    path = in_process.write_checkpoint(tmp_path, 4, lambda folder: (folder / "state.pt").write_text("whole"))
    assert path.name == "checkpoint_000004" and (path / "state.pt").read_text() == "whole"
    again = in_process.write_checkpoint(tmp_path, 4, lambda folder: (folder / "state.pt").write_text("newer"))
    assert again == path and (path / "state.pt").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000004"]


def test_prune_keeps_the_newest_by_number_and_leaves_other_folders(tmp_path):
    for name in ("checkpoint_000009", "checkpoint_000010", "checkpoint_000002", "best_model", "checkpoint_x"):
        (tmp_path / name).mkdir()
    in_process.prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model", "checkpoint_000009", "checkpoint_000010",
                                                          "checkpoint_x"]


@pytest.mark.parametrize("overrides, ok", [([], True), (["scaling.worker_group=task"], True),
                                           (["scaling.num_workers=2"], False),
                                           (["scaling.strategy=deepspeed"], False),
                                           (["scaling.worker_group=always"], False)])
def test_only_one_ddp_worker_trains_in_process(overrides, ok, store, tmp_path):
    cfg = load_config(None, [*BASE, *overrides])
    assert in_process.can_run(cfg) is ok
    # what its Ray actor or task holds: the worker's CPUs when it trains there, else nothing
    assert in_process.held_resources(cfg, 1.5) == ({"CPU": 1.5, "GPU": 0} if ok else None)
    if not ok:
        with pytest.raises(ValueError, match="num_workers=1, scaling.strategy=ddp and scaling.worker_group=auto or task"):
            in_process.fit_in_process(cfg, store, None, tmp_path, 1, lambda m, p: None)


def test_checkpoint_every_n_epochs_and_the_last_and_a_resume_replays_the_gap_exactly(store, tmp_path, monkeypatch):
    """run.checkpoint_every=2 over 5 epochs: checkpoints after epochs 2, 4 and 5 only; killed after
    epoch 3 (not checkpointed), the run resumes from epoch 2, replays 3, and ends as a plain loop."""
    every = ["train.epochs=5", "run.checkpoint_every=2", "run.keep_checkpoints=5"]
    cfg = load_config(None, [*BASE, *every])
    plain = Trainer(cfg, store, WorkerContext(0, 1, 0, torch.device("cpu")), None)
    torch.set_num_threads(1)
    plain.fit(lambda metrics, save: None)
    _, reports = _fit(store, tmp_path / "all", *every)
    assert [p.name if p else None for _, p in reports] == [None, "checkpoint_000002", None, "checkpoint_000004",
                                                          "checkpoint_000005"]
    monkeypatch.setenv("ITMATCH_FAIL_AT_EPOCH", "3")
    with pytest.raises(RuntimeError, match="injected failure after epoch 3"):
        _fit(store, tmp_path / "run", *every)
    monkeypatch.delenv("ITMATCH_FAIL_AT_EPOCH")
    result, reports = _fit(store, tmp_path / "run", *every)
    assert [int(m["epoch"]) for m, _ in reports] == [3, 4, 5]
    got = _weights(Path(result.checkpoint.path))
    for key, value in plain.strategy.full_state_dict(plain.model).items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def test_pbt_needs_checkpoints_at_its_perturbations():
    from itmatch.config import ConfigError
    from tuning import registry

    cfg = load_config(None, ["search.scheduler=pbt", "search.perturbation_interval=3", "run.checkpoint_every=2"])
    with pytest.raises(ConfigError, match="run.checkpoint_every=2 does not divide it"):
        registry.scheduler(cfg, {"optim.lr": {"uniform": [1e-4, 1e-3]}})


@pytest.mark.parametrize("overrides, worker_groups, wanted", [
    ([], None, False),  # one worker trains in process: no Ray Train, no dashboard needed
    (["scaling.num_workers=2"], None, True),  # Ray Train's placement-group cleaner uses the State API
    ([], True, True),  # the caller knows worker groups will run (an ablation row, a search's trial)
    (["run.ray_dashboard=true"], False, True),  # the user asks for it
    (["run.ray_dashboard=false"], None, False),
    # Ray Train without the State API: its placement-group cleaner killed a healthy run's workers
    (["scaling.num_workers=2", "run.ray_dashboard=false"], None, ConfigError),
    (["run.ray_dashboard=false"], True, ConfigError),
])
def test_the_private_clusters_dashboard_follows_its_worker_groups(overrides, worker_groups, wanted):
    from trainers.train import wants_dashboard

    cfg = load_config(None, ["scaling.num_workers=1", *overrides])
    if wanted is ConfigError:
        with pytest.raises(ConfigError, match="run.ray_dashboard=false: this job runs Ray Train worker groups"):
            wants_dashboard(cfg, worker_groups)
    else:
        assert wants_dashboard(cfg, worker_groups) is wanted


SPIN = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "300000"}
SLEEP = {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.parametrize("overrides, worker_groups, wait", [
    ([], None, SLEEP),  # the default, whatever the layout: other processes may share the cores
    (["scaling.num_workers=2"], True, SLEEP),
    (["scaling.thread_wait=spin"], None, SPIN),  # asked for: spin ~3 ms (never more than libgomp's default)
    (["scaling.num_workers=2", "scaling.thread_wait=spin"], True, SPIN),
])
def test_threads_spin_briefly_only_when_asked(overrides, worker_groups, wait, monkeypatch):
    import ray

    from trainers.train import init_ray

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init_ray(load_config(None, ["scaling.num_workers=1", *overrides]), worker_groups)
    env = seen["runtime_env"]["env_vars"]
    assert {k: env[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in env} == wait


@pytest.mark.parametrize("overrides, env, here", [
    ([], {}, True),  # one worker, nothing else needs Ray: the driver trains it, Ray is not started
    (["scaling.worker_group=task"], {}, False),  # asked for a Ray task
    (["scaling.worker_group=always"], {}, False),
    (["scaling.num_workers=2"], {}, False),
    (["run.ray_address=auto"], {}, False),  # attached to a cluster: Ray places the task there
    ([], {"RAY_ADDRESS": "http://127.0.0.1:8265"}, False),  # under `ray job submit`
    (["data.loader=ray"], {}, False),  # Ray Data prepares the batches
    (["data.featurize=ray"], {}, False),
])
def test_a_one_worker_job_trains_in_its_driver_only_where_ray_would_serve_nothing_else(overrides, env, here,
                                                                                       monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert in_process.in_driver(load_config(None, [*BASE, *overrides])) is here


@pytest.mark.parametrize("max_failures, fails, attempts", [(1, 1, 2), (0, 1, 1), (2, 5, 3), (-1, 3, 4)])
def test_a_job_in_its_driver_retries_failed_attempts_up_to_max_failures(max_failures, fails, attempts, monkeypatch):
    """run_job_here's retry loop: a failed attempt runs again (run_job resumes it from the newest
    checkpoint), until run.max_failures failures (-1: without end); then the error propagates."""
    from trainers import job

    calls = []

    def attempt(cfg, store, forward):
        calls.append(forward)
        if len(calls) <= fails:
            raise RuntimeError(f"attempt {len(calls)} failed")
        return {"attempts": len(calls)}

    monkeypatch.setattr(job, "run_job", attempt)
    cfg = load_config(None, [*BASE, f"run.max_failures={max_failures}"])
    if attempts > fails:
        assert job.run_job_here(cfg, None) == {"attempts": attempts}
    else:
        with pytest.raises(RuntimeError, match=f"attempt {attempts} failed"):
            job.run_job_here(cfg, None)
    assert len(calls) == attempts and all(f is in_process.no_reports for f in calls)


def test_a_job_whose_run_was_ended_from_outside_is_not_retried(monkeypatch):
    """Stopped (its MLflow run ended by someone else) is not a failure: no retry, even with budget."""
    from trainers import job

    calls = []

    def attempt(cfg, store, forward):
        calls.append(1)
        raise job.Stopped("ended from outside")

    monkeypatch.setattr(job, "run_job", attempt)
    with pytest.raises(job.Stopped):
        job.run_job_here(load_config(None, [*BASE, "run.max_failures=3"]), None)
    assert calls == [1]


def test_without_ray_a_worker_gets_this_machines_cpus(monkeypatch):
    from trainers import job, placement

    monkeypatch.delitem(sys.modules, "ray", raising=False)  # Ray never imported, so not started
    monkeypatch.setattr(placement, "local_cpus", lambda: 6)
    assert job.cpus_per_worker(load_config(None, BASE)) == 6.0
    assert job.cpus_per_worker(load_config(None, [*BASE, "scaling.cpus_per_worker=1.5"])) == 1.5


def test_a_driver_ends_a_run_its_stopped_task_left_running_and_nothing_else(tmp_path):
    """trainers.job.run_job_in_task, told to stop, cancels its task; where the task cannot end its
    MLflow run in time, the driver finds the run by its folder and ends it KILLED -- only that run,
    and only while it is RUNNING."""
    from mlflow.tracking import MlflowClient

    from trainers.tracking import RUN_KEY_TAG, end_if_running, setup

    cfg = load_config(None, [f"tracking.tracking_uri=sqlite:///{tmp_path / 'ml.db'}",
                             f"tracking.artifact_location={tmp_path / 'art'}"])
    info = setup(cfg.tracking)
    client = MlflowClient(info["tracking_uri"])
    ours = client.create_run(info["experiment_id"], tags={RUN_KEY_TAG: "/runs/a"}).info.run_id
    other = client.create_run(info["experiment_id"], tags={RUN_KEY_TAG: "/runs/b"}).info.run_id
    assert end_if_running(cfg, "/runs/a", "KILLED") == ours
    assert client.get_run(ours).info.status == "KILLED" and client.get_run(other).info.status == "RUNNING"
    assert end_if_running(cfg, "/runs/a", "KILLED") is None  # already ended: left as it is
    client.set_terminated(other, status="FINISHED")
    assert end_if_running(cfg, "/runs/b", "KILLED") is None and client.get_run(other).info.status == "FINISHED"
    assert end_if_running(cfg, "/runs/none", "KILLED") is None


@pytest.mark.parametrize("driver_ends_first, wanted", [(False, "FAILED"), (True, "KILLED")])
def test_a_trials_late_error_does_not_overwrite_the_status_its_driver_gave(driver_ends_first, wanted, store,
                                                                          tmp_path, monkeypatch):
    """A trial Tune stops raises in its process only later; the search's driver may have ended its
    MLflow run KILLED by then (tuning.report.close_child_runs), and the error must leave that as it is.
    Alone, the error ends the run FAILED."""
    from mlflow.tracking import MlflowClient

    from trainers import job

    cfg = load_config(None, [*BASE, f"tracking.tracking_uri=sqlite:///{tmp_path / 'ml.db'}",
                             f"tracking.artifact_location={tmp_path / 'art'}", f"run.storage_path={tmp_path / 'runs'}"])
    ended = {}

    def stopped(cfg, store, tracking, folder, cpus, forward):
        ended["run_id"] = tracking["run_id"]
        if driver_ends_first:
            MlflowClient(tracking["tracking_uri"]).set_terminated(tracking["run_id"], status="KILLED")
        raise RuntimeError("the stop's error")

    monkeypatch.setattr(in_process, "fit_in_process", stopped)
    with pytest.raises(RuntimeError, match="the stop's error"):
        job.run_job(cfg, store, forward=lambda m, p: None)
    assert MlflowClient(f"sqlite:///{tmp_path / 'ml.db'}").get_run(ended["run_id"]).info.status == wanted


def _tracked(tmp_path: Path, *overrides: str):
    """A job with its own MLflow store; nothing logged or registered beyond its metrics."""
    return load_config(None, [*BASE, f"tracking.tracking_uri=sqlite:///{tmp_path / 'ml.db'}",
                              f"tracking.artifact_location={tmp_path / 'art'}", f"run.storage_path={tmp_path / 'runs'}",
                              "tracking.registered_model=null", "tracking.log_model=false", "eval.plots=false",
                              "eval.pictures=false", *overrides])


def _status(tmp_path: Path, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'ml.db'}").get_run(run_id).info.status


def test_a_trial_tune_stopped_ends_at_the_epochs_end_killed_and_writes_no_summary(store, tmp_path, monkeypatch):
    """Tune stops a trial by ending its session while its thread trains on (reports then go nowhere).
    The trial's forward (tuning.search._tune_forward) ends the training at the next epoch's end, its
    checkpoint written, and the run ends KILLED with no summary: the search counted it stopped."""
    from ray.train._internal import session as ray_session

    from trainers import job
    from tuning import search

    monkeypatch.setattr(ray_session, "_session", object())  # the trial's Tune session
    wanted = search._still_running()
    runs = []

    def forward(metrics, folder):
        runs.append(metrics["epoch"])
        if metrics["epoch"] == 1:
            ray_session.shutdown_session()  # what Tune's stop (FunctionTrainable.cleanup) does
        inner(metrics, folder)

    inner = search._tune_forward(False, wanted)
    cfg = _tracked(tmp_path)
    with pytest.raises(job.Stopped):
        job.run_job(cfg, store, forward=forward, wanted=wanted)
    folder = job.run_dir(cfg)
    assert runs == [1] and [p.name for p in checkpoint_candidates(None, folder)] == ["checkpoint_000001"]
    assert not (folder / job.SUMMARY_FILE).exists()
    from mlflow.tracking import MlflowClient

    from trainers.tracking import RUN_KEY_TAG, setup

    info = setup(cfg.tracking)
    [run] = MlflowClient(info["tracking_uri"]).search_runs([info["experiment_id"]])
    assert run.data.tags[RUN_KEY_TAG] == str(folder) and run.info.status == "KILLED"


def test_a_trial_session_replaced_in_a_reused_actor_is_not_its_own(monkeypatch):
    """A reused actor runs the next trial in a new session: the old trial's thread must not take it
    for its own."""
    from ray.train._internal import session as ray_session

    from tuning import search

    monkeypatch.setattr(ray_session, "_session", object())
    wanted = search._still_running()
    assert wanted()
    monkeypatch.setattr(ray_session, "_session", object())
    assert not wanted()


@pytest.mark.parametrize("ended_by_driver, log_model", [(None, False), ("KILLED", False), (None, True)])
def test_a_run_its_driver_ended_while_it_trained_is_not_finalized_as_finished(ended_by_driver, log_model, store,
                                                                              tmp_path):
    """The search's driver ends a stopped trial's run KILLED (tuning.report.close_child_runs), maybe
    before the trial's last epoch ends: finalizing must then leave it KILLED and write no summary
    (Stopped). Left alone, the same job ends FINISHED with its summary -- also where logging its
    model (as a job, not a trial, does) has ended the run already."""
    from mlflow.tracking import MlflowClient

    from trainers import job

    cfg = _tracked(tmp_path, f"tracking.log_model={str(log_model).lower()}")
    seen = {}

    def forward(metrics, folder):
        if metrics["epoch"] == cfg.train.epochs and ended_by_driver:
            info = job_tracking()
            MlflowClient(info["tracking_uri"]).set_terminated(info["run_id"], status=ended_by_driver)

    def job_tracking():
        from trainers.tracking import setup

        info = setup(cfg.tracking)
        [run] = MlflowClient(info["tracking_uri"]).search_runs([info["experiment_id"]])
        seen["run_id"] = run.info.run_id
        return {**info, "run_id": run.info.run_id}

    if ended_by_driver:
        with pytest.raises(job.Stopped):
            job.run_job(cfg, store, forward=forward)
        assert not (job.run_dir(cfg) / job.SUMMARY_FILE).exists()
        assert _status(tmp_path, seen["run_id"]) == ended_by_driver
    else:
        summary = job.run_job(cfg, store, forward=forward)
        assert (job.run_dir(cfg) / job.SUMMARY_FILE).is_file() and ("model_uri" in summary) == log_model
        assert _status(tmp_path, summary["run_id"]) == "FINISHED"


def test_a_job_no_longer_wanted_once_trained_is_not_finalized(store, tmp_path):
    """A Ray Train trial cannot be stopped between epochs (its reports go nowhere once Tune stopped
    it): run_job asks `wanted` when training ends and, unwanted, ends the run KILLED, no summary."""
    from mlflow.tracking import MlflowClient

    from trainers import job
    from trainers.tracking import setup

    cfg = _tracked(tmp_path)
    with pytest.raises(job.Stopped):
        job.run_job(cfg, store, forward=lambda m, p: None, wanted=lambda: False)
    assert len(checkpoint_candidates(None, job.run_dir(cfg))) == 2  # trained to the end (keep 2)
    assert not (job.run_dir(cfg) / job.SUMMARY_FILE).exists()
    info = setup(cfg.tracking)
    [run] = MlflowClient(info["tracking_uri"]).search_runs([info["experiment_id"]])
    assert run.info.status == "KILLED"


def test_deterministic_kernels_train_and_resume_to_the_same_weights(store, tmp_path, monkeypatch):
    """train.deterministic turns on torch's deterministic-only mode for the run (on a GPU the atomic
    adds of index_add/scatter/embedding backward otherwise sum in any order); every kernel of a run
    must have a deterministic version, or training raises."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        _fit(store, tmp_path / "a", "train.deterministic=true")
        assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        monkeypatch.setenv("ITMATCH_FAIL_AT_EPOCH", "2")
        with pytest.raises(RuntimeError, match="injected failure after epoch 2"):
            _fit(store, tmp_path / "b", "train.deterministic=true")
        monkeypatch.delenv("ITMATCH_FAIL_AT_EPOCH")
        _, reports = _fit(store, tmp_path / "b", "train.deterministic=true")  # resumes at epoch 3
        assert [int(m["epoch"]) for m, _ in reports] == [3]
    finally:
        torch.use_deterministic_algorithms(before)
    a, b = _weights(tmp_path / "a" / "checkpoint_000003"), _weights(tmp_path / "b" / "checkpoint_000003")
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("env, named", [
    ({"ITMATCH_FAIL_AT_EPOCH": "abc"}, "ITMATCH_FAIL_AT_EPOCH='abc'"),  # was a ValueError after an epoch, retried
    ({"ITMATCH_HOLD_AT": "1:1"}, "needs ITMATCH_HOLD_DIR"),  # was a KeyError after step 1
    ({"ITMATCH_HOLD_AT": "0:1", "ITMATCH_HOLD_DIR": "/tmp"}, "ITMATCH_HOLD_AT='0:1'"),  # never held, silently
    ({"ITMATCH_HOLD_AT": "1-1", "ITMATCH_HOLD_DIR": "/tmp"}, "ITMATCH_HOLD_AT='1-1'"),
])
def test_malformed_fault_injection_is_a_config_error_naming_the_variable_in_the_loop_too(env, named, monkeypatch):
    from trainers.loop import _maybe_hold, _maybe_inject_failure

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    hook = (lambda: _maybe_inject_failure(0, 1)) if "ITMATCH_FAIL_AT_EPOCH" in env else (lambda: _maybe_hold(1, 1, 0))
    with pytest.raises(ConfigError, match=named):
        hook()


def test_well_formed_fault_injection_still_fails_and_holds_where_asked(tmp_path, monkeypatch):
    from trainers.loop import _maybe_hold, _maybe_inject_failure

    monkeypatch.setenv("ITMATCH_FAIL_AT_EPOCH", "2")
    _maybe_inject_failure(0, 1)
    _maybe_inject_failure(2, 2)  # a run resumed at epoch 2 passes
    with pytest.raises(RuntimeError, match="injected failure after epoch 2"):
        _maybe_inject_failure(0, 2)
    monkeypatch.setenv("ITMATCH_HOLD_AT", " 1:3, 2:1")
    monkeypatch.setenv("ITMATCH_HOLD_DIR", str(tmp_path))
    monkeypatch.setenv("ITMATCH_HOLD_TIMEOUT_S", "0.01")
    _maybe_hold(1, 2, 0)  # not a hold point
    with pytest.raises(RuntimeError, match="never appeared"):
        _maybe_hold(2, 1, 0)
    assert (tmp_path / "hold-2-1.rank0.pid").read_text() == str(os.getpid())
    (tmp_path / "hold-1-3.go").touch()
    _maybe_hold(1, 3, 0)  # released already
