"""The registry state a run's promotion meets (trainers.job.promote, trainers.tracking.register): the
alias moves only to a model that beats its holder on this run's validation data; a holder that cannot
be compared keeps it (said, with why), one whose model is gone gives it up; a promotion that fails is
one error line and an `error` in the run's record, never a raise that loses the finished run.

One tiny model is trained and logged once (module fixtures); each test registers under a model name
of its own in a shared sqlite store and prepares its holder with the MLflow client. The holder's
score on the validation split is checked against the checkpoint scored directly (itmatch.state,
itmatch.eval), not through MLflow."""

from __future__ import annotations

import json
import logging
import shutil

import mlflow
import mlflow.pyfunc
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from itmatch.config import Config, load_config
from itmatch.data.store import prepare
from itmatch.eval.evaluate import evaluate_split
from itmatch.state import load_model, save_checkpoint
from trainers import job, tracking
from trainers.dist import WorkerContext
from trainers.loop import Trainer

TRAIN = ["data.batch_size=24", "train.epochs=1", "model.hidden_dim=32", "model.embed_dim=16",
         "data.image_encoder=pixels", "data.text_encoder=hashing", "scaling.num_workers=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(tmp, cfg, store, checkpoint folder, tracking info of the logged model's run, its model URI,
    the checkpoint's val rsum scored directly)."""
    tmp = tmp_path_factory.mktemp("registry")
    source = f"synthetic:{tmp / 'shapes'}?n_images=40"
    store = prepare(source, cache_dir=tmp / "cache", image_encoder="pixels", text_encoder="hashing",
                    splits=["train", "val", "test"], progress=False)
    cfg = load_config(None, [f"data.source={source}", f"data.cache_dir={tmp / 'cache'}", *TRAIN,
                             f"tracking.tracking_uri=sqlite:///{tmp / 'ml.db'}",
                             f"tracking.artifact_location={tmp / 'art'}", f"run.storage_path={tmp / 'runs'}"])
    trainer = Trainer(cfg, store, WorkerContext(0, 1, 0, torch.device("cpu")), None)
    trainer.fit(lambda metrics, save: None)
    folder = save_checkpoint(tmp / "best", model=trainer.strategy.full_state_dict(trainer.model), cfg=cfg,
                             train_state=trainer.state, dims=trainer.dims)
    info = tracking.start_run(cfg, "registry-test", store)
    uri = tracking.log_model(info, folder, store).model_uri
    tracking.end_run(info)
    direct = evaluate_split(load_model(folder)[0].eval(), store.split("val"))["rsum"]
    return tmp, cfg, store, folder, info, uri, direct


def _cfg(cfg: Config, name: str, **keys) -> Config:
    return load_config(None, {**cfg.flat(), "tracking.registered_model": name, **keys})


def _holder(world, name: str, tags: dict[str, str] | None = None, uri: str | None = None,
            run_id: str | None = None) -> str:
    """Register `uri` (the logged model) under `name` as another program would, with `tags`, and
    give it the alias; returns its version."""
    _, cfg, _, _, info, logged, _ = world
    client = MlflowClient(info["tracking_uri"])
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, uri or logged, run_id=run_id or info["run_id"], tags=tags or {})
    client.set_registered_model_alias(name, cfg.tracking.alias, version.version)
    return str(version.version)


def _alias(world, name: str) -> str:
    _, cfg, _, _, info, _, _ = world
    return str(MlflowClient(info["tracking_uri"]).get_model_version_by_alias(name, cfg.tracking.alias).version)


def _refit_tags(score: str, metric: str = "rsum") -> dict[str, str]:
    """What tracking.register writes for a model trained on train+val (tuning/refit.py)."""
    return {"trained_on": "train+val", "val_score": score, "metric": metric}


def test_a_holder_whose_model_files_are_gone_gives_up_the_alias(world, caplog):
    """Its artifacts deleted, the holder serves nothing: promotion raised MLflow's "No such artifact"
    (no summary, the finished job retried); now the new version takes the alias, and says why."""
    tmp, cfg, store, folder, info, _, _ = world
    gone = tracking.log_model(info, folder, store).model_uri
    version = _holder(world, "itm-gone", uri=gone)
    client = MlflowClient(info["tracking_uri"])
    shutil.rmtree(client.get_model_version_download_uri("itm-gone", version).removeprefix("file://"))
    with caplog.at_level(logging.INFO, logger="itmatch"):
        record = job.promote(info, _cfg(cfg, "itm-gone"), store, world[5], 1.0)
    assert record["promoted"] and str(record["holder"]) == version and record["champion_score"] is None
    assert "cannot be loaded" in record["reason"] and "error" not in record
    assert _alias(world, "itm-gone") == str(record["version"])
    assert f"holder (version {version}) cannot be loaded" in caplog.text


@pytest.mark.parametrize("score", ["abc", "nan", None])
def test_a_refit_holder_without_a_usable_recorded_score_keeps_the_alias(world, score):
    """A holder trained on this val split is held to its recorded score; one that is no number cannot
    be compared (re-scoring it would score its own training data): "abc" raised ValueError, "nan"
    was a score nothing beats, no score at all re-scored it on the split it trained on."""
    _, cfg, store, _, info, uri, _ = world
    name = f"itm-refit-{score}"
    tags = {k: v for k, v in _refit_tags(score or "").items() if v or k != "val_score"}
    version = _holder(world, name, tags)
    record = job.promote(info, _cfg(cfg, name), store, uri, 1e6)
    assert not record["promoted"] and record["champion_score"] == float("inf")
    assert "cannot be compared" in record["reason"] and "val_score" in record["reason"]
    assert _alias(world, name) == version


def test_a_refit_holder_is_held_to_its_score_only_in_this_metric_on_this_val_data(world):
    """Its recorded score compares only if it is of this run's metric and its run measured it on this
    very val split (the run's dataset digests): an r1 of 0.5 or an rsum on other data used to lose to
    any rsum above it."""
    _, cfg, store, _, info, uri, _ = world
    client = MlflowClient(info["tracking_uri"])
    same = _holder(world, "itm-refit-same", _refit_tags("300"))
    record = job.promote(info, _cfg(cfg, "itm-refit-same"), store, uri, 299.0)
    assert not record["promoted"] and record["champion_score"] == 300.0 and _alias(world, "itm-refit-same") == same
    other_metric = _holder(world, "itm-refit-r1", _refit_tags("0.5", metric="r1"))
    record = job.promote(info, _cfg(cfg, "itm-refit-r1"), store, uri, 1.0)
    assert not record["promoted"] and "'r1'" in record["reason"] and _alias(world, "itm-refit-r1") == other_metric
    elsewhere = client.create_run(info["experiment_id"], tags={"dataset.digest.val": "0" * 16})
    client.log_param(elsewhere.info.run_id, "data.val_split", "val")
    other_data = _holder(world, "itm-refit-data", _refit_tags("0.5"), run_id=elsewhere.info.run_id)
    record = job.promote(info, _cfg(cfg, "itm-refit-data"), store, uri, 1.0)
    assert not record["promoted"] and record["champion_score"] == float("inf")
    assert "0" * 16 in record["reason"] and _alias(world, "itm-refit-data") == other_data


class _Foreign(mlflow.pyfunc.PythonModel):
    """Another program's pyfunc model: no embedding network inside."""

    def predict(self, context, model_input, params=None):
        return model_input


def test_another_programs_model_as_holder_keeps_the_alias_and_says_so(world):
    """A pyfunc model this project did not write (no `.model` network) raised AttributeError."""
    _, cfg, store, _, info, uri, _ = world
    mlflow.set_tracking_uri(info["tracking_uri"])
    with mlflow.start_run(experiment_id=info["experiment_id"]) as run:
        foreign = mlflow.pyfunc.log_model(name="foreign", python_model=_Foreign()).model_uri
    version = _holder(world, "itm-foreign", uri=foreign, run_id=run.info.run_id)
    record = job.promote(info, _cfg(cfg, "itm-foreign"), store, uri, 1e6)
    assert not record["promoted"] and record["champion_score"] == float("inf") and "_Foreign" in record["reason"]
    assert _alias(world, "itm-foreign") == version


def test_a_model_name_with_spaces_unicode_and_a_question_mark_is_re_scored(world):
    """The holder was loaded as models:/NAME@ALIAS, which a `?` in the name cuts short ("Logged model
    with ID 'itm reg é' not found"); it is loaded from its version's own storage now."""
    _, cfg, store, _, info, uri, direct = world
    name = "itm reg é?x"
    version = _holder(world, name)
    record = job.promote(info, _cfg(cfg, name), store, uri, direct - 1)
    assert not record["promoted"] and record["champion_score"] == pytest.approx(direct)
    assert _alias(world, name) == version
    record = job.promote(info, _cfg(cfg, name), store, uri, direct + 1)
    assert record["promoted"] and _alias(world, name) == str(record["version"])


def test_a_run_that_takes_the_alias_while_another_is_judged_is_judged_in_turn(world, monkeypatch):
    """Two runs finishing together: B reads the holder (score 100); A registers with 500 and takes
    the alias; B, at 470, beat the holder it read and took the alias from the better A. B now looks
    again before it moves the alias and is held to A's score."""
    _, cfg, store, _, info, uri, _ = world
    _holder(world, "itm-race", _refit_tags("100"))
    late = {"A": None}
    real = tracking.champion_version

    def read_then_a_finishes(tracking_info, c):
        found = real(tracking_info, c)
        if late["A"] is None:  # only B's first look; A's own promotion reads the registry as it is
            late["A"] = {}
            late["A"] = job.promote(info, _cfg(cfg, "itm-race", **{"data.train_split": "train+val"}), store, uri, 500.0)
        return found

    monkeypatch.setattr(tracking, "champion_version", read_then_a_finishes)
    b = job.promote(info, _cfg(cfg, "itm-race"), store, uri, 470.0)
    assert late["A"]["promoted"] and not b["promoted"]
    assert _alias(world, "itm-race") == str(late["A"]["version"])
    assert b["champion_score"] == 500.0 and str(b["holder"]) == str(late["A"]["version"])


def test_a_read_only_registry_at_promotion_is_one_error_line_and_a_record(world, caplog):
    """The sqlite file read-only once the model is logged: promotion raised MLflow's database error
    (and MLflow logged its traceback); now one error line names the model, that no version was
    registered, why, and where the model stays logged."""
    tmp, cfg, store, _, info, uri, _ = world
    read_only = {**info, "tracking_uri": f"sqlite:///file:{tmp / 'ml.db'}?mode=ro&uri=true"}
    with caplog.at_level(logging.INFO):
        record = job.promote(read_only, _cfg(cfg, "itm-ro"), store, uri, 1.0)
    assert not record["promoted"] and record["version"] is None and "readonly database" in record["error"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].name == "itmatch.job"
    line = errors[0].getMessage()
    assert "\n" not in line and "itm-ro" in line and "no version registered" in line and uri in line
    assert not MlflowClient(info["tracking_uri"]).search_registered_models("name = 'itm-ro'")


def test_a_registry_error_at_the_holder_lookup_is_no_missing_holder(world, monkeypatch):
    """The registry failing the holder's lookup once (a blip) read as "no holder": the new version
    took the alias unjudged. Only a model or alias that does not exist is no holder now; any other
    error fails the promotion, which says so and leaves the alias alone."""
    _, cfg, store, _, info, uri, _ = world
    version = _holder(world, "itm-lookup")
    blip = {"left": 1}

    def failing_once(method):
        def call(self, *args, **kwargs):
            if blip["left"]:
                blip["left"] -= 1
                raise MlflowException("the registry did not answer", error_code="TEMPORARILY_UNAVAILABLE")
            return method(self, *args, **kwargs)
        return call

    for lookup in ("get_model_version_by_alias", "get_registered_model"):
        monkeypatch.setattr(MlflowClient, lookup, failing_once(getattr(MlflowClient, lookup)))
    record = job.promote(info, _cfg(cfg, "itm-lookup"), store, uri, 1e6)
    assert blip["left"] == 0 and not record["promoted"] and "did not answer" in record["error"]
    assert _alias(world, "itm-lookup") == version


def test_a_job_whose_promotion_fails_keeps_its_finished_run_and_writes_its_summary(world, monkeypatch):
    """run_job_here with registration failing as on a read-only sqlite file: the job raised once
    its model was logged, wrote no summary.json and trained and logged again (run.max_failures).
    Now it returns, summary.json's `registry` holds the error, the MLflow run is FINISHED and holds
    its one logged model."""
    tmp, cfg, store, _, info, _, _ = world
    run_cfg = _cfg(cfg, "itm-job", **{"run.name": "promotion-fails"})
    calls = []

    def read_only(*args, **kwargs):
        calls.append(args)
        raise MlflowException("(sqlite3.OperationalError) attempt to write a readonly database\n[SQL: INSERT ...]",
                              error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(mlflow, "register_model", read_only)
    summary = job.run_job_here(run_cfg, store)
    assert len(calls) == 1 and "readonly database" in summary["registry"]["error"]
    written = json.loads((tmp / "runs" / "promotion-fails" / job.SUMMARY_FILE).read_text())
    assert written["registry"] == summary["registry"] and not written["registry"]["promoted"]
    client = MlflowClient(info["tracking_uri"])
    assert client.get_run(summary["run_id"]).info.status == "FINISHED"
    logged = client.search_logged_models([info["experiment_id"]])
    assert [m.model_id for m in logged if m.source_run_id == summary["run_id"]] == [summary["model_uri"].split("/")[-1]]


@pytest.mark.parametrize("registered_before_failing", [False, True])
def test_a_failed_promotion_is_retried_when_the_command_is_run_again(world, monkeypatch, registered_before_failing):
    """Re-running a finished run's command said "finished already" even where its promotion had
    failed (the registry unwritable then): the model never reached the registry. The re-run now
    promotes it, with the version registered before the failure if there was one (no second one)."""
    from trainers.job import finished_summary, retry_promotion

    tmp, cfg, store, _, info, _, _ = world
    name = f"itm-retry-{int(registered_before_failing)}"
    run_cfg = _cfg(cfg, name, **{"run.name": f"retried-{int(registered_before_failing)}"})
    real_alias = MlflowClient.set_registered_model_alias

    def unwritable(*args, **kwargs):
        raise MlflowException("(sqlite3.OperationalError) attempt to write a readonly database",
                              error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(MlflowClient if registered_before_failing else mlflow,
                        "set_registered_model_alias" if registered_before_failing else "register_model", unwritable)
    first = job.run_job_here(run_cfg, store)
    assert first["registry"]["error"] and (first["registry"]["version"] is not None) is registered_before_failing
    monkeypatch.undo()
    assert MlflowClient.set_registered_model_alias is real_alias
    again = retry_promotion(run_cfg, store, finished_summary(run_cfg, store))
    assert again["registry"]["promoted"] and "error" not in again["registry"]
    client = MlflowClient(info["tracking_uri"])
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]  # once
    assert _alias(world, name) == "1"
    written = json.loads((tmp / "runs" / run_cfg.run.name / job.SUMMARY_FILE).read_text())
    assert written["registry"] == again["registry"]
    assert retry_promotion(run_cfg, store, written) is written  # promoted: nothing to retry


def test_the_cli_exits_1_on_a_failed_promotion_and_its_rerun_promotes_without_training(world, monkeypatch, capsys):
    """`trainers.train` exited 0 with the model never registered (a `ray job submit` job SUCCEEDED);
    now 1 with one error line saying how to retry, and the same command again registers it (exit 0)
    without training again."""
    from trainers import train

    tmp, cfg, _, _, info, _, _ = world
    keys = [f"{k}={v}" for k, v in _cfg(cfg, "itm-cli", **{"run.name": "cli-retry"}).flat().items()
            if k.startswith(("data.source", "data.cache_dir", "tracking.", "run.storage_path", "run.name"))
            and v is not None]
    argv = [*keys, *TRAIN]

    def unwritable(*args, **kwargs):
        raise MlflowException("attempt to write a readonly database", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(mlflow, "register_model", unwritable)
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert "error: itm-cli: the model is trained and logged" in err and "run the same command again" in err
    monkeypatch.undo()
    monkeypatch.setattr(train, "run_job_here", lambda *a, **k: pytest.fail("trained again"))
    assert train.main(argv) == 0
    assert _alias(world, "itm-cli") == "1"
