"""Tune searches where every trial is a 2-worker Ray Train job, end to end, run the way the README
says: a relative preset from the repo root and the default scheduler (ASHA), locally and as a Ray
job. Trials report per epoch, ASHA stops the weak ones at a rung before the last epoch, finished
trials run their own test evaluation and log nested MLflow runs, every run ends in the status of
its trial; the best trial is re-run with another seed (`--rerun-top 1 --rerun-seeds 1`) and the
choice, by mean validation score over its seeds, is registered once and takes the alias."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from fault_tools import hold_env, release
from ray_cli import ROOT, run_module
from ray_head import ray_head

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]
GOOD_LR, BAD_LR = 3.0e-3, 1.0e-8  # a learning rate that learns in one epoch, and one that cannot
RUN_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}  # independent of tuning.report


def _paths(tmp: Path) -> list[str]:
    """Only where things are written goes to tmp; everything else is the preset's."""
    return [f"data.cache_dir={tmp / 'cache'}", f"run.storage_path={tmp / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'ml.db'}", f"tracking.artifact_location={tmp / 'art'}",
            "tracking.registered_model=itm-tune"]


def _readme_args(tmp: Path, space: Path) -> list[str]:
    # The README's command with the debug preset: relative --config, default --scheduler (asha).
    # Rungs every epoch before the last (grace 1) and keep the better half (factor 2): 2 trials, the
    # good one first (one at a time), so the bad one reaches rung 1 below the cut and is stopped.
    # Robust selection: the best trial re-run with one more seed (flag and key forms both work).
    return ["--config", "configs/debug.yaml", "--space", str(space), "--num-samples", "1", "--name", "s1",
            "--rerun-top", "1", "search.rerun_seeds=1",
            "search.grace_period=1", "search.reduction_factor=2", *_paths(tmp)]


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    space = tmp / "space.yaml"
    space.write_text(f"optim.lr: {{grid: [{GOOD_LR}, {BAD_LR}]}}\n")  # good, then bad
    done = run_module("tuning.search", _readme_args(tmp, space), ROOT, timeout=700)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return tmp, done


def _mlflow_runs(db: Path, parent_name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("itmatch").experiment_id])
    parent = next(r for r in runs if r.info.run_name == parent_name)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


def test_asha_stops_the_weak_trials_and_the_rest_finish(search):
    tmp, done = search
    trials = json.loads((tmp / "runs" / "s1" / "search.json").read_text())["trials"]
    assert len(trials) == 2
    stopped = [t for t in trials if t["status"] == "stopped"]
    finished = [t for t in trials if t["status"] == "finished"]
    assert len(stopped) == len(finished) == 1, [(t["params"], t["status"]) for t in trials]
    assert all(t["params"]["optim.lr"] == BAD_LR and t["epochs"] == 1 and not t["summary"] for t in stopped)
    assert all(t["params"]["optim.lr"] == GOOD_LR for t in finished)  # the first trial is never stopped
    assert all(t["epochs"] == 2 and t["summary"]["test"]["rsum"] >= 0 for t in finished)
    for t in trials:  # every trial ran from the resolved config, saved in its own folder
        saved = yaml.safe_load((tmp / "runs" / "s1" / "trials" / t["trial_id"] / "config.yaml").read_text())
        assert saved["run"]["storage_path"] == str(tmp / "runs" / "s1" / "trials")
        assert saved["optim"]["lr"] == t["params"]["optim.lr"] and saved["model"]["embed_dim"] == 32  # preset's
    assert "| best |" in done.stdout and "| stopped |" in done.stdout


def test_every_mlflow_run_ends_in_its_trials_status_and_the_best_is_registered(search):
    tmp, _ = search
    result = json.loads((tmp / "runs" / "s1" / "search.json").read_text())
    client, parent, children = _mlflow_runs(tmp / "ml.db", "s1")
    by_trial = {r.data.tags["itmatch.trial_id"]: r for r in children if "itmatch.trial_id" in r.data.tags}
    assert len(children) == len(by_trial) + 1  # the trials and the one seed re-run
    assert sorted(by_trial) == sorted(t["trial_id"] for t in result["trials"])
    for t in result["trials"]:
        run = by_trial[t["trial_id"]]
        assert run.info.status == RUN_STATUS[t["status"]], (t["trial_id"], t["status"], run.info.status)
        assert run.info.run_name == f"s1-{t['trial_id']}-lr={t['params']['optim.lr']:.4g}"
    assert parent.info.status == "FINISHED"
    scores = {t["trial_id"]: t["summary"]["val_rsum"] for t in result["trials"] if t["summary"]}
    best = result["best"]["trial_id"]
    assert scores[best] == max(scores.values())  # the top trial, the only one re-run, is the choice
    assert parent.data.tags["itmatch.best_trial"] == best
    champion = client.get_model_version_by_alias("itm-tune", "champion")
    assert len(client.search_model_versions("name='itm-tune'")) == 1  # only the choice
    # trials and re-runs log no model; the search logs the one it registers, into that model's run
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'ml.db'}")
    logged = mlflow.search_logged_models(experiment_ids=[parent.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in logged] == [champion.run_id]
    # its model is its best-validation seed's
    rerun = json.loads((tmp / "runs" / "s1" / "reruns" / f"{best}-seed1" / "summary.json").read_text())
    assert float(champion.tags["val_score"]) == pytest.approx(max(scores[best], rerun["val_rsum"]))
    assert champion.run_id == (rerun["run_id"] if rerun["val_rsum"] > scores[best] else
                               by_trial[best].info.run_id)
    # trials and re-runs draw no plots (eval.plots); the search drew the chosen run's as it logged its model
    assert {a.path for a in client.list_artifacts(champion.run_id, "plots")} == \
        {"plots/similarity.png", "plots/recall.png", "plots/training.png"}
    assert not any(client.list_artifacts(r.info.run_id, "plots") for r in children if r.info.run_id != champion.run_id)
    assert all("test_overlap" in r.data.metrics for r in children if r.info.status == "FINISHED")
    # the table and the plot of val score against each searched param, in the folder and the parent run
    assert (tmp / "runs" / "s1" / "plots" / "val_rsum_vs_optim.lr.png").stat().st_size > 0
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.json", "search.json", "plots"} <= logged
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "trials.json")).read_text())
    assert sorted(table["columns"]) == sorted(["trial_id", "status", "epochs", "best_val", "optim.lr"])


def test_the_best_trial_is_rerun_with_another_seed_and_chosen_by_its_mean(search):
    tmp, done = search
    result = json.loads((tmp / "runs" / "s1" / "search.json").read_text())
    best = result["best"]
    own = best["summary"]["val_rsum"]
    folder = tmp / "runs" / "s1" / "reruns" / f"{best['trial_id']}-seed1"
    again = json.loads((folder / "summary.json").read_text())["val_rsum"]
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["train"]["seed"] == 1 and saved["optim"]["lr"] == best["params"]["optim.lr"]  # the trial's, seed + 1
    assert [r["trial_id"] for r in result["reruns"]] == [best["trial_id"]]  # one trial, one extra seed
    choice = best["selection"]
    assert [s["seed"] for s in choice["seeds"]] == [0, 1] and choice["n"] == 2
    assert choice["val_mean"] == pytest.approx((own + again) / 2)
    assert choice["val_std"] == pytest.approx(abs(own - again) / 2 ** 0.5)  # sample std of two values
    assert f"{choice['val_mean']:.1f} ± {choice['val_std']:.1f} (n=2)" in done.stdout  # the printed table
    _, parent, children = _mlflow_runs(tmp / "ml.db", "s1")
    reruns = [r for r in children if r.data.tags.get("itmatch.rerun_of")]
    assert len(reruns) == 1 and reruns[0].data.tags["itmatch.rerun_of"] == best["trial_id"]
    assert reruns[0].info.status == "FINISHED" and reruns[0].data.tags["itmatch.seed"] == "1"
    assert parent.data.metrics["best_val_rsum_mean"] == pytest.approx(choice["val_mean"])
    assert parent.data.metrics["best_val_rsum_std"] == pytest.approx(choice["val_std"])


def test_rerun_restores_the_finished_search_without_rerunning_or_registering(search):
    from mlflow.tracking import MlflowClient

    tmp, first = search
    summaries = sorted((tmp / "runs" / "s1").glob("*/*/summary.json"))  # trials and seed re-runs
    assert any(p.parent.parent.name == "reruns" for p in summaries)
    before = {p: p.stat().st_mtime_ns for p in summaries}
    again = run_module("tuning.search", _readme_args(tmp, tmp / "space.yaml"), ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-5000:]
    assert "resuming the search" in again.stdout + again.stderr  # Tuner.restore, no new trials
    assert {p: p.stat().st_mtime_ns for p in summaries} == before  # no finished trial ran again
    result = json.loads((tmp / "runs" / "s1" / "search.json").read_text())
    assert len(result["trials"]) == 2
    client = MlflowClient(f"sqlite:///{tmp / 'ml.db'}")
    assert len(client.search_model_versions("name='itm-tune'")) == 1


def test_a_finished_searchs_failed_registration_is_retried_by_its_command(search):
    """A search whose final registration had failed (the registry unwritable then) kept that record
    for good: re-running its command restored the finished search and reused it. Now the re-run
    registers the logged choice (the version made before the failure, not a second one)."""
    from mlflow.tracking import MlflowClient

    from tuning.search import registration_error

    tmp, _ = search
    path = tmp / "runs" / "s1" / "search.json"
    result = json.loads(path.read_text())
    done = result["best"]["registry"]
    assert done["promoted"] and result["best"]["registered"]["model_uri"] and registration_error(path.parent) is None
    client = MlflowClient(f"sqlite:///{tmp / 'ml.db'}")
    client.delete_registered_model_alias("itm-tune", "champion")  # as if the alias had never been set
    result["best"]["registry"] = {**done, "promoted": False, "error": "OperationalError: attempt to write a readonly "
                                  "database"}
    path.write_text(json.dumps(result))
    assert "run the same command again" in registration_error(path.parent)
    again = run_module("tuning.search", _readme_args(tmp, tmp / "space.yaml"), ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-5000:]
    assert "registration failed" in again.stdout + again.stderr
    registry = json.loads(path.read_text())["best"]["registry"]
    assert registry["promoted"] and "error" not in registry and registry["version"] == done["version"]
    assert len(client.search_model_versions("name='itm-tune'")) == 1
    assert str(client.get_model_version_by_alias("itm-tune", "champion").version) == str(done["version"])


@pytest.mark.parametrize("text, needles", [
    ("loss.margn: {uniform: [0.1, 0.2]}", ["loss.margn", "space.yaml"]),
    # the debug preset's synthetic data has 480 training captions: a trial with 4096 could never run
    ("data.batch_size: {choice: [32, 4096]}", ["data.batch_size=4096", "training captions"]),
])
def test_bad_space_fails_before_ray(tmp_path, text, needles):
    space = tmp_path / "space.yaml"
    space.write_text(text + "\n")
    done = run_module("tuning.search", _readme_args(tmp_path, space), ROOT, timeout=120)
    assert done.returncode == 2 and all(n in done.stderr for n in needles), done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr and "Started a local Ray" not in done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def job_search(tmp_path_factory):
    """`ray job submit --working-dir . -- python -m tuning.search ...` on a private head node with
    2 CPUs: Optuna, 2 trials at once, each wanting 2 workers x 1 CPU, so the second must queue."""
    tmp = tmp_path_factory.mktemp("tune_job")
    space = tmp / "space.yaml"
    space.write_text("optim.lr: {loguniform: [1.0e-3, 5.0e-3]}\nloss.margin: {uniform: [0.05, 0.3]}\n")
    submission = f"itm-search-{uuid.uuid4().hex[:8]}"
    with ray_head(num_cpus=2) as head:
        submit = head.ray("job", "submit", "--address", head.address, "--working-dir", ".", "--submission-id",
                          submission, "--", "python", "-m", "tuning.search", "--config", "configs/debug.yaml",
                          "--space", str(space), "--num-samples", "2", "--name", "sj", "--search", "optuna",
                          "--max-concurrent", "2", "scaling.cpus_per_worker=1", "search.seed=0", *_paths(tmp),
                          timeout=600)
        status = head.ray("job", "status", "--address", head.address, submission, timeout=60)
    return tmp, submit, status, submission


def test_search_runs_as_a_ray_job_with_optuna_and_queued_concurrent_trials(job_search):
    tmp, submit, status, submission = job_search
    assert submit.returncode == 0 and f"Job '{submission}' succeeded" in status.stdout, \
        submit.stdout[-4000:] + submit.stderr[-3000:] + status.stdout
    result = json.loads((tmp / "runs" / "sj" / "search.json").read_text())
    trials = result["trials"]
    assert len(trials) == 2 and all(t["status"] in ("finished", "stopped") for t in trials)
    assert result["best"] and result["best"]["summary"]["val_rsum"] >= 0
    lrs = [t["params"]["optim.lr"] for t in trials]
    assert len(set(lrs)) == 2 and all(1e-3 <= lr <= 5e-3 for lr in lrs)  # sampled by Optuna in the space
    assert list((tmp / "runs" / "sj" / "tune").glob("searcher-state-*.pkl"))  # what Tuner.restore resumes
    _, parent, children = _mlflow_runs(tmp / "ml.db", "sj")
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)


def test_one_worker_trials_train_in_their_own_process_as_the_job_would(tmp_path):
    """search.trial_workers=1 (the real-data preset's path): each trial trains inside its Tune
    process (no Ray Train worker group); ASHA still stops the weak trial (its MLflow run KILLED), and
    the finished trial's weights are those of the same one-worker `trainers.train` job (trained in
    its driver, which test_one_worker_job holds equal to the job through Ray Train). Its seed re-run
    and the ensemble of both are refitted on train+val as Ray tasks (search.refit) and that is what
    is registered (tests/integration/test_ensemble_cli.py checks the refit's numbers)."""
    import torch
    from mlflow.tracking import MlflowClient

    space = tmp_path / "space.yaml"
    space.write_text(f"optim.lr: {{grid: [{GOOD_LR}, {BAD_LR}]}}\n")  # one at a time: good, then bad
    args = ["--config", "configs/debug.yaml", "--space", str(space), "--num-samples", "1", "--name", "so",
            "search.trial_workers=1", "search.grace_period=1", "search.reduction_factor=2", "search.rerun_top=1",
            "search.rerun_seeds=1", "search.ensemble=true", "search.refit=true", *_paths(tmp_path)]
    done = run_module("tuning.search", args, ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    assert "TorchTrainer" not in done.stdout + done.stderr and "controller" not in done.stdout + done.stderr
    result = json.loads((tmp_path / "runs" / "so" / "search.json").read_text())
    trials = {t["params"]["optim.lr"]: t for t in result["trials"]}
    assert trials[GOOD_LR]["status"] == "finished" and trials[BAD_LR]["status"] == "stopped"
    good = trials[GOOD_LR]["trial_id"]
    refits = sorted(p.name for p in (tmp_path / "runs" / "so" / "reruns").glob("*-refit"))
    assert refits == [f"{good}-seed0-refit", f"{good}-seed1-refit"]
    for name in refits:
        refitted = yaml.safe_load((tmp_path / "runs" / "so" / "reruns" / name / "config.yaml").read_text())
        assert refitted["data"]["train_split"] == "train+val" and refitted["train"]["keep"] == "last"
    model = result["best"]["selection"]["model"]
    assert model["refit"]["train_split"] == "train+val" and model["checkpoint"].endswith("so-ensemble-refit/best_model")
    _, parent, children = _mlflow_runs(tmp_path / "ml.db", "so")
    # the two trials, the seed re-run, the ensemble, the two refits and the refitted ensemble
    assert sorted(r.info.status for r in children) == ["FINISHED"] * 6 + ["KILLED"] and parent.info.status == "FINISHED"
    assert parent.data.tags["itmatch.best_refit"] == f"trained on train+val; registered run {model['run_id']}"
    version = MlflowClient(f"sqlite:///{tmp_path / 'ml.db'}").get_model_version_by_alias("itm-tune", "champion")
    assert version.run_id == model["run_id"] and version.tags["trained_on"] == "train+val"
    folder = tmp_path / "runs" / "so" / "trials" / trials[GOOD_LR]["trial_id"]
    assert sorted(p.name for p in folder.glob("checkpoint_*")) == ["checkpoint_000001", "checkpoint_000002"]
    job = run_module("trainers.train", ["--config", "configs/debug.yaml", "scaling.num_workers=1",
                                        f"optim.lr={GOOD_LR}", "run.name=job", "tracking.enabled=false",
                                        *_paths(tmp_path)], ROOT, timeout=300)
    assert job.returncode == 0, job.stderr[-4000:]
    trial = torch.load(folder / "best_model" / "state.pt", weights_only=False)["model"]
    alone = torch.load(tmp_path / "runs" / "job" / "best_model" / "state.pt", weights_only=False)["model"]
    for key, value in alone.items():
        torch.testing.assert_close(trial[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _kill_after_a_trial_finishes(args: list[str], tmp_path: Path, name: str) -> dict[str, int]:
    """Start the search, SIGKILL it (driver and its Ray) once a trial has written its summary, and
    return the summaries' mtimes at that point."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen([sys.executable, "-m", "tuning.search", *args], cwd=ROOT, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)  # its Ray stays in its group
    trials = tmp_path / "runs" / name / "trials"
    try:
        deadline = time.monotonic() + 400
        while not list(trials.glob("*/summary.json")) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        assert list(trials.glob("*/summary.json")) and first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    return {p.parent.name: p.stat().st_mtime_ns for p in trials.glob("*/summary.json")}


def _restored(args: list[str], tmp_path: Path, name: str, done_before: dict[str, int]) -> dict:
    """Run the same command again: it must restore the search and not run a finished trial again."""
    again = run_module("tuning.search", args, ROOT, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-4000:]
    assert "resuming the search" in again.stdout + again.stderr
    after = {p.parent.name: p.stat().st_mtime_ns for p in (tmp_path / "runs" / name / "trials").glob("*/summary.json")}
    assert {k: after[k] for k in done_before} == done_before  # finished before the kill: not run again
    return json.loads((tmp_path / "runs" / name / "search.json").read_text())


def test_killed_optuna_search_restores_without_rerunning_finished_trials(tmp_path):
    """Kill the whole search (driver and its Ray) once a trial has finished; the same command
    restores the experiment and the Optuna searcher, runs only what is left, and registers once.
    Its trials have one worker each, so they train in their own processes (trainers/in_process.py)."""
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {loguniform: [1.0e-3, 5.0e-3]}\n")
    args = ["--config", "configs/debug.yaml", "--space", str(space), "--num-samples", "2", "--name", "sk",
            "--search", "optuna", "--scheduler", "fifo", "search.seed=0", "search.trial_workers=1", *_paths(tmp_path)]
    result = _restored(args, tmp_path, "sk", _kill_after_a_trial_finishes(args, tmp_path, "sk"))
    assert len(result["trials"]) == 2 and all(t["status"] == "finished" for t in result["trials"])
    _, parent, children = _mlflow_runs(tmp_path / "ml.db", "sk")
    runs = {r.data.tags["itmatch.trial_id"]: r for r in children}
    assert parent.info.status == "FINISHED" and {t["trial_id"] for t in result["trials"]} <= set(runs)
    assert all(runs[t["trial_id"]].info.status == "FINISHED" for t in result["trials"])  # a resumed trial reopens its run
    # A trial started just before the kill, before Tune saved the experiment, is not restored (the
    # searcher suggests it anew): its orphan run ends KILLED, not RUNNING.
    orphans = [r for k, r in runs.items() if k not in {t["trial_id"] for t in result["trials"]}]
    assert len(orphans) <= 1 and all(r.info.status == "KILLED" for r in orphans)


def test_four_optuna_trials_two_at_a_time_under_asha_killed_and_restored(tmp_path):
    """The issue's check: 4 Optuna trials, 2 at once, each a 2-worker Ray Train job (TorchTrainer),
    under ASHA, the search killed once a trial has finished and restored by the same command.
    Optuna (seed 2) suggests the learning rate that learns three times, then one that cannot; that
    fourth trial starts only after a good one has finished, so it meets ASHA's rung below the
    cutoff -- after the restore too, as the rungs are kept in the search's folder (tuning/asha.py;
    Tune restores no scheduler state). Every MLflow run ends in its trial's status; one model is
    registered and holds the alias (a fresh registry: nothing to beat)."""
    from mlflow.tracking import MlflowClient

    space = tmp_path / "space.yaml"
    space.write_text(f"optim.lr: {{choice: [{GOOD_LR}, {BAD_LR}]}}\n")
    args = ["--config", "configs/debug.yaml", "--space", str(space), "--num-samples", "4", "--name", "s4",
            "--search", "optuna", "--scheduler", "asha", "--max-concurrent", "2", "search.seed=2",
            "search.grace_period=1", "search.reduction_factor=2", "scaling.cpus_per_worker=0.5", *_paths(tmp_path)]
    result = _restored(args, tmp_path, "s4", _kill_after_a_trial_finishes(args, tmp_path, "s4"))
    trials = result["trials"]
    assert len(trials) == 4 and [t["params"]["optim.lr"] for t in trials].count(BAD_LR) == 1, trials
    weak = next(t for t in trials if t["params"]["optim.lr"] == BAD_LR)
    assert weak["status"] == "stopped" and weak["epochs"] == 1 and not weak["summary"]
    assert any(t["status"] == "finished" for t in trials)
    assert all(t["status"] in ("finished", "stopped") for t in trials)
    _, parent, children = _mlflow_runs(tmp_path / "ml.db", "s4")
    runs = {r.data.tags["itmatch.trial_id"]: r for r in children}
    assert parent.info.status == "FINISHED"
    ended = {t["trial_id"]: (t["status"], runs[t["trial_id"]].info.status) for t in trials}
    assert all(run == RUN_STATUS[status] for status, run in ended.values()), ended
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)  # an orphan (see above): KILLED
    client = MlflowClient(f"sqlite:///{tmp_path / 'ml.db'}")
    (version,) = client.search_model_versions("name='itm-tune'")
    assert client.get_model_version_by_alias("itm-tune", "champion").version == version.version
    assert version.run_id == result["best"]["summary"]["run_id"]


def test_a_failing_trial_is_retried_then_failed_and_the_search_goes_on(tmp_path):
    """A trial whose loss cannot be finite (InfoNCE at temperature 1e-40: every logit overflows) raises
    in its process; Tune retries it run.max_failures (1) times, then the search goes on: its row is
    `failed` with the error's one line, its MLflow run FAILED, the other trial is registered and the
    command succeeds."""
    from mlflow.tracking import MlflowClient

    space = tmp_path / "space.yaml"
    space.write_text("loss.temperature: {grid: [0.05, 1.0e-40]}\n")
    args = ["--config", "configs/debug.yaml", "--space", str(space), "--num-samples", "1", "--name", "sf",
            "--scheduler", "fifo", "search.trial_workers=1", "loss.name=infonce", *_paths(tmp_path)]
    done = run_module("tuning.search", args, ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    trials = {t["params"]["loss.temperature"]: t for t in
              json.loads((tmp_path / "runs" / "sf" / "search.json").read_text())["trials"]}
    bad, good = trials[1.0e-40], trials[0.05]
    assert bad["status"] == "failed" and bad["error"].startswith("FloatingPointError: non-finite loss")
    assert "\n" not in bad["error"] and not bad["summary"] and good["status"] == "finished"
    out = done.stdout + done.stderr
    assert out.count("errored after 0 iterations") == 2  # the first attempt and its retry,
    assert "MLflow: resuming run" in out  # which reopened the trial's MLflow run
    _, parent, children = _mlflow_runs(tmp_path / "ml.db", "sf")
    status = {r.data.tags["itmatch.trial_id"]: r.info.status for r in children}
    assert status == {bad["trial_id"]: "FAILED", good["trial_id"]: "FINISHED"} and parent.info.status == "FINISHED"
    (version,) = MlflowClient(f"sqlite:///{tmp_path / 'ml.db'}").search_model_versions("name='itm-tune'")
    assert version.run_id == good["summary"]["run_id"]


def _release_once_both_trained_an_epoch(trials: Path, hold: Path, timeout: float = 240) -> None:
    """Release the trials held after step 1 of epoch 2 once both have recorded epoch 1 (their
    metrics.jsonl), or after `timeout` (the test then fails on its own, never hangs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = [p for p in trials.glob("*/metrics.jsonl") if p.stat().st_size]
        if len(logs) >= 2:
            break
        time.sleep(0.2)
    hold.mkdir(parents=True, exist_ok=True)  # both may have recorded epoch 1 before either reached the hold
    release(hold, 2, 1)


def test_pbt_exploits_the_better_trials_checkpoint_with_its_own_params(tmp_path):
    """--scheduler pbt: the trial with a learning rate that cannot learn is cloned from the good one's
    checkpoint (a new generation of its run folder, `run.start_from`) and goes on from that epoch
    with a mutated learning rate, not from scratch and not with the donor's. The trials train in
    their own processes (search.trial_workers=1), two at once: every exploit restarts a trial, which
    would otherwise start a Ray Train worker group each time. PBT clones only from a trial still
    running, so each trial is held in its second epoch until both have trained their first: on a
    loaded machine one trial once finished all its epochs before the other reported, and PBT had
    nobody to clone (pbt_global.txt never written)."""
    space = tmp_path / "space.yaml"
    space.write_text(f"optim.lr: {{grid: [{GOOD_LR}, {BAD_LR}]}}\n")
    args = ["--config", "configs/debug.yaml", "--space", str(space), "--num-samples", "1", "--name", "sp",
            "--scheduler", "pbt", "--max-concurrent", "2", "search.perturbation_interval=1", "train.epochs=6",
            "search.trial_workers=1", f"data.source=synthetic:{tmp_path / 'shapes'}?n_images=240",
            "search.seed=0", *_paths(tmp_path), "tracking.registered_model="]
    search, hold = tmp_path / "runs" / "sp", tmp_path / "hold"
    threading.Thread(target=_release_once_both_trained_an_epoch, args=(search / "trials", hold), daemon=True).start()
    done = run_module("tuning.search", args, ROOT, hold_env(hold, 2, 1), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    # Tune's record of each exploit: [tag, donor's tag, iteration, donor's iteration, donor's config, new config]
    exploits = [json.loads(line) for line in (search / "tune" / "pbt_global.txt").read_text().splitlines()]
    assert exploits and all(e[0] != e[1] for e in exploits)
    generations = {}  # (run folder, its start_from, its lr) for every restarted trial
    for folder in (search / "trials").glob("*-g*"):
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        generations[folder] = (Path(saved["run"]["start_from"]), saved["optim"]["lr"])
    _, donor_tag, _, _, _, new_config = exploits[0]
    cloned = [f for f, (start, lr) in generations.items()
              if f"_{donor_tag}_" in start.parent.name and lr == pytest.approx(new_config["params"]["optim.lr"])]
    assert cloned, (exploits, generations)  # a run started from the donor's checkpoint with the new params
    for folder in cloned:
        assert generations[folder][0].parent.parent == search / "tune"
        log = folder / "metrics.jsonl"  # absent when the donor was at its last epoch: nothing left to train
        epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines()] if log.exists() else []
        # went on from the donor's epoch (until the end, or until PBT paused or cloned it again)
        assert epochs == [] or (epochs[0] > 1 and epochs == list(range(epochs[0], epochs[0] + len(epochs))))
    result = json.loads((tmp_path / "runs" / "sp" / "search.json").read_text())
    assert len(result["trials"]) == 2 and all(t["summary"] and t["epochs"] == 6 for t in result["trials"]), \
        ([{k: t[k] for k in ("trial_id", "status", "epochs", "best_val", "error")} for t in result["trials"]],
         exploits, done.stderr[-4000:])
