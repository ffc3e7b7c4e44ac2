"""Damaged or unexpected state left on disk by earlier runs: a feature cache whose manifest or Parquet
files were cut short or lost, a run's saved config that is not text, an MLflow SQLite file that is
not a database or is held locked, a run folder holding checkpoints named both by Ray Train
(timestamps) and by the in-process trainer (epochs), a search folder that lost one of its saved
settings files, and a seed re-run's summary that the selection cannot read. Each is either repaired
from what is intact (the cache is derived data), resumed from the right checkpoint, or refused in
one line naming the file and the problem, never a traceback later on."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest

from itmatch.config import ConfigError, load_config
from itmatch.data.sources import DataError
from itmatch.data.store import FeatureStore, prepare

SPLITS = ["train", "val", "test"]


def _prepare(tmp: Path) -> FeatureStore:
    return prepare(f"synthetic:{tmp / 'shapes'}?n_images=40", cache_dir=tmp / "cache", image_encoder="pixels",
                   text_encoder="hashing", splits=SPLITS, progress=False)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A prepared store and its files' bytes, restored before each test damages them."""
    tmp = tmp_path_factory.mktemp("damaged-cache")
    store = _prepare(tmp)
    return tmp, store, {p.name: p.read_bytes() for p in store.root.iterdir()}


@pytest.fixture
def store_files(cached):
    tmp, store, files = cached
    for name, data in files.items():
        (store.root / name).write_bytes(data)
    return tmp, store


# ---------------------------------------------------------------------------- feature cache


@pytest.mark.parametrize("damage, said", [
    (lambda root: (root / "manifest.json").write_text((root / "manifest.json").read_text()[:90]), "unreadable"),
    (lambda root: (root / "manifest.json").write_text('{"splits": "train"}'), "field 'splits' is 'train'"),
    (lambda root: (root / "manifest.json").write_text("[]"), "not a JSON object"),
])
def test_a_cut_short_or_odd_manifest_is_named_and_the_cache_is_built_again(store_files, damage, said, caplog):
    tmp, store = store_files
    damage(store.root)
    with caplog.at_level(logging.WARNING, logger="itmatch.data"):
        again = _prepare(tmp)  # was a JSONDecodeError / TypeError traceback
    assert f"{store.root / 'manifest.json'}: {said}" in caplog.text and "featurising the data again" in caplog.text
    assert again.identity == store.identity
    assert json.loads((store.root / "manifest.json").read_text())["splits"] == store.manifest["splits"]
    assert len(again.split("val").image_ids) == len(store.split("val").image_ids)


@pytest.mark.parametrize("damage, said", [
    (lambda path: path.unlink(), "val_captions.parquet cannot be read"),
    (lambda path: path.write_bytes(path.read_bytes()[:500]), "val_captions.parquet cannot be read"),
])
def test_a_listed_split_whose_parquet_is_gone_or_cut_short_is_featurised_again(store_files, damage, said, caplog):
    tmp, store = store_files
    damage(store.root / "val_captions.parquet")
    with caplog.at_level(logging.WARNING, logger="itmatch.data"):
        again = _prepare(tmp)  # was a FileNotFoundError / ArrowInvalid traceback in the preflight
    assert f"{store.root / 'manifest.json'} lists split 'val', but {said}" in caplog.text
    assert "'train'" not in caplog.text  # the intact splits are kept as they are
    assert again.identity == store.identity
    assert again.split("val").texts == store.split("val").texts


def test_a_parquet_file_with_other_row_counts_than_its_manifest_is_featurised_again(store_files, caplog):
    import pyarrow.parquet as pq

    tmp, store = store_files
    path = store.root / "test_images.parquet"
    pq.write_table(pq.read_table(path).slice(0, 2), path)  # whole, but another split's (or half of this one)
    with caplog.at_level(logging.WARNING, logger="itmatch.data"):
        again = _prepare(tmp)
    assert "test_images.parquet holds 2 rows, not the" in caplog.text
    assert pq.ParquetFile(path).metadata.num_rows == store.manifest["counts"]["test"]["images"]
    assert again.identity == store.identity


def test_opening_a_store_whose_manifest_is_damaged_names_the_file(store_files):
    _, store = store_files
    (store.root / "manifest.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(DataError, match=r"manifest\.json: unreadable .*rebuilds the cached store"):
        FeatureStore.open(store.root)


# ---------------------------------------------------------------------------- a run's saved config


def test_a_runs_saved_config_that_is_not_text_is_refused_naming_it(tmp_path):
    from trainers.preflight import check_resume_config

    cfg = load_config(None, ["data.source=x", f"run.storage_path={tmp_path}", "run.name=r"])
    (tmp_path / "r" / "checkpoint_000001").mkdir(parents=True)
    (tmp_path / "r" / "config.yaml").write_bytes(b"\x9e\xd4 binary garbage \xff")
    with pytest.raises(ConfigError, match=r"r/config\.yaml: cannot read the run's saved config \('utf-8' codec"):
        check_resume_config(cfg)  # was a UnicodeDecodeError traceback


# ---------------------------------------------------------------------------- MLflow's SQLite file


def test_an_sqlite_store_that_is_not_a_database_is_refused_before_the_run_starts(tmp_path):
    from trainers.preflight import check_tracking_uri

    (tmp_path / "ml.db").write_bytes(b"not a database at all " * 200)
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    with pytest.raises(ConfigError, match=r"ml\.db is not an SQLite database \(file is not a database\)"):
        check_tracking_uri(uri, key="tracking.tracking_uri")  # was an SQLAlchemy traceback after featurising
    (tmp_path / "empty.db").touch()  # an empty file is a new database: MLflow creates its tables
    check_tracking_uri(f"sqlite:///{tmp_path / 'empty.db'}")


def test_an_sqlite_store_held_locked_by_another_process_is_refused_naming_it(tmp_path):
    from trainers.preflight import check_tracking_uri

    path = tmp_path / "ml.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(ConfigError, match=r"ml\.db is locked by another process \(still after 0\.2 s\)"):
            check_tracking_uri(f"sqlite:///{path}", timeout=0.2, key="tracking.tracking_uri")
    finally:
        holder.close()
    check_tracking_uri(f"sqlite:///{path}", timeout=0.2)  # free again: fine


# ---------------------------------------------------------------------------- checkpoints of both namings


def _save(folder: Path, epoch: int) -> Path:
    from itmatch.models import build_model
    from itmatch.state import TrainState, save_checkpoint

    cfg = load_config(overrides=["model.hidden_dim=8", "model.embed_dim=4"])
    return save_checkpoint(folder, model=build_model(6, 4, cfg.model), cfg=cfg, train_state=TrainState(epoch=epoch),
                           dims=(6, 4))


def test_the_resume_takes_the_most_trained_checkpoint_whatever_its_naming(tmp_path):
    """scaling.worker_group may change on resume: Ray Train's worker group names its checkpoints by
    timestamp, the in-process trainer by epoch. By name the worker group's epoch 2 outranked the
    in-process epoch 3 for good (prune removes numbered ones only): every resume trained epoch 3 again."""
    from itmatch.state import checkpoint_candidates, load_checkpoint, pick_resume_checkpoint

    _save(tmp_path / "checkpoint_2026-11-30_16-00-00.000000", 2)  # a worker group's
    _save(tmp_path / "checkpoint_000003", 3)  # then in process
    chosen, skipped = pick_resume_checkpoint(checkpoint_candidates(None, tmp_path))
    assert chosen.name == "checkpoint_000003" and not skipped
    assert load_checkpoint(chosen)[0]["train_state"].epoch == 3
    # one whose state.pt is cut short is still tried first and named as skipped, not passed over unsaid
    bad = _save(tmp_path / "checkpoint_2026-11-30_15-00-00.000000", 1) / "state.pt"
    bad.write_bytes(bad.read_bytes()[:100])
    chosen, skipped = pick_resume_checkpoint(checkpoint_candidates(None, tmp_path))
    assert chosen.name == "checkpoint_000003" and [p.name for p, _ in skipped] == [bad.parent.name]


# ---------------------------------------------------------------------------- search folders


def test_a_search_folder_that_lost_one_of_its_saved_settings_is_refused_naming_it(tmp_path):
    from tuning import restore

    cfg = load_config(None, ["data.source=x"])
    space = {"optim.lr": {"loguniform": [1e-4, 1e-2]}}
    restore.save(cfg, space, tmp_path)
    (tmp_path / restore.SPACE_FILE).unlink()
    other = {"optim.lr": {"loguniform": [1e-5, 1e-1]}}
    with pytest.raises(ConfigError, match=r"search_space\.json: missing, though the search saved it beside "
                                          r"search_config\.yaml"):
        restore.check(cfg, other, tmp_path)  # was no check at all: the restore went on with the new space
    restore.save(cfg, space, tmp_path)
    (tmp_path / restore.CONFIG_FILE).unlink()
    with pytest.raises(ConfigError, match=r"search_config\.yaml: missing"):
        restore.check(cfg, space, tmp_path)


@pytest.mark.parametrize("summary, said", [
    ({"test": {"rsum": 1.0}}, "val_rsum is None, not a number"),
    ({"val_rsum": "390", "test": {"rsum": 1.0}}, "val_rsum is '390', not a number"),
    ({"val_rsum": 390.0, "test": 5}, "test is 5, not a mapping of metrics"),
])
def test_a_rerun_summary_the_selection_cannot_read_is_run_again_not_a_late_traceback(tmp_path, summary, said,
                                                                                      caplog):
    from tuning import rerun, select

    setup = {"base": {"train.seed": 0}, "reruns_dir": str(tmp_path)}
    trial = {"trial_id": "a", "params": {}, "status": "finished",
             "summary": {"val_rsum": 400.0, "test": {"rsum": 390.0}}}
    item = rerun.plan([trial], setup, 1)[0]
    (tmp_path / item["run"]).mkdir()
    (tmp_path / item["run"] / "summary.json").write_text(json.dumps(summary))
    with caplog.at_level(logging.WARNING, logger="itmatch.tune"):
        assert rerun._summary(rerun.rerun_config(setup, item)) is None  # was read back as finished
    assert f"{tmp_path / item['run'] / 'summary.json'}: {said}; running it again" in caplog.text
    # read back as it was, the selection failed with a KeyError/TypeError after every run had trained
    record = {**item, "status": "finished", "summary": summary}
    with pytest.raises((KeyError, TypeError, AttributeError)):
        select.select([trial], [record], "rsum", 1, {"a": 0})


@pytest.mark.parametrize("text, said", [("garbage{", "not valid JSON"), ('{"test": {"rsum": 1}}', "val_rsum is None"),
                                        ('{"val_rsum": 391.5, "test": {"rsum": 380.0}}', None)])
def test_a_restored_trials_damaged_summary_runs_the_trial_again_instead_of_a_traceback(tmp_path, text, said,
                                                                                       monkeypatch, caplog):
    """A trial that finished before its search was killed reports its summary on the restore; one cut
    short or hand-edited was a JSONDecodeError or KeyError inside the Tune trial."""
    import ray.tune

    from tuning.search import _report_finished

    cfg = load_config(None, [f"run.storage_path={tmp_path}", "run.name=t1", "train.epochs=3"])
    (tmp_path / "t1").mkdir()
    (tmp_path / "t1" / "summary.json").write_text(text)
    reported = []
    monkeypatch.setattr(ray.tune, "report", reported.append)
    with caplog.at_level(logging.WARNING, logger="itmatch.tune"):
        assert _report_finished(cfg) is (said is None)
    if said:
        assert not reported and said in caplog.text and "the trial runs again" in caplog.text
    else:
        assert reported == [{"epoch": 3, "best_metric": 391.5}]


def test_open_store_on_a_damaged_manifest_is_one_line_naming_it(store_files):
    """Was a JSONDecodeError traceback (a worker or evaluator opening the store folder directly)."""
    from itmatch.data.raw import open_store

    tmp, store = store_files
    (store.root / "manifest.json").write_text('{"kind": "raw", "spl')
    with pytest.raises(DataError) as info:
        open_store(store.root)
    assert str(info.value).startswith(f"{store.root / 'manifest.json'}: unreadable") and "\n" not in str(info.value)


def test_a_phrase_stores_damaged_manifest_is_named_and_the_store_written_again(tmp_path, caplog):
    from itmatch.data.raw import prepare_inputs

    def phrases():
        return prepare_inputs(f"shapes-phrases:{tmp_path / 'shapes'}?n_images=12&seed=1", cache_dir=tmp_path / "cache",
                              raw_images=False, image_encoder="pixels", text_encoder="hashing", splits=["train"])

    store = phrases()
    (store.root / "manifest.json").write_text("[1, 2")  # was a JSONDecodeError traceback
    with caplog.at_level(logging.WARNING, logger="itmatch.data"):
        again = phrases()
    assert f"{store.root / 'manifest.json'}: unreadable" in caplog.text
    assert again.manifest["counts"] == store.manifest["counts"] and again.manifest["splits"] == ["train"]


@pytest.mark.parametrize("summary, said", [
    ({}, "val_rsum is None, not a number"),
    ({"val_rsum": True, "test": {"rsum": 1.0}}, "val_rsum is True, not a number"),
    ({"val_rsum": 390.0, "test": None}, "test is None, not a mapping of metrics"),
    ({"val_rsum": 390.0, "test": {"rsum": 380.0}}, None),
])
def test_a_hand_edited_summary_is_not_taken_for_a_finished_run(cached, tmp_path, summary, said, caplog):
    """Re-running a finished run reads its summary.json back and logs, serves and registers nothing
    new; one hand-edited to `{}` was taken for finished, and the job printed a summary without a
    test score (a search's selection then failed on it)."""
    from itmatch.config import save_config
    from trainers.job import finished_summary

    store = _prepare(tmp_path)
    cfg = load_config(None, [f"run.storage_path={tmp_path}", "run.name=r", "train.epochs=3"])
    (tmp_path / "r").mkdir()
    save_config(cfg, tmp_path / "r" / "config.yaml")
    (tmp_path / "r" / "summary.json").write_text(json.dumps(summary))
    with caplog.at_level(logging.WARNING, logger="itmatch"):
        found = finished_summary(cfg, store)
    if said:
        assert found is None and f"{tmp_path / 'r' / 'summary.json'}: {said}; finalizing the run again" in caplog.text
    else:
        assert found == summary
