"""One run folder, one driver, one history: a second driver of a run or search is refused while the
first holds it; a finished run's exact command does not log and register its model again; a run
restarted afresh with other settings gets an MLflow run of its own; a search restored with other
settings is refused, naming what changed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from itmatch.config import ConfigError, load_config, save_config
from itmatch.files import Busy, exclusive
from trainers import train
from trainers.job import CONFIG_FILE, SUMMARY_FILE, finished_summary, run_dir
from trainers.tracking import _started_otherwise
from tuning import restore

ROOT = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from itmatch.files import exclusive
with exclusive(sys.argv[1], "a test run"):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def other_process_holds(tmp_path):
    """Another process holding the lock of tmp_path/runs/twice (killed at the end: the kernel frees it)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "runs" / "twice")], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield holder
    holder.kill()
    holder.wait()


def test_a_second_driver_of_a_run_is_refused_naming_the_holder(tmp_path, other_process_holds, capsys):
    code = train.main(["--config", str(ROOT / "configs" / "debug.yaml"), f"run.storage_path={tmp_path / 'runs'}",
                       "run.name=twice", f"data.cache_dir={tmp_path / 'cache'}",
                       f"data.source=synthetic:{tmp_path / 'shapes'}?n_images=40"])
    err = capsys.readouterr().err
    assert code == 2 and "running already" in err and f"pid {other_process_holds.pid}" in err, err
    assert not (tmp_path / "runs" / "twice").exists()  # taking the lock creates nothing inside the run folder


def test_refused_input_leaves_no_lock_file_behind(tmp_path, capsys):
    code = train.main(["--config", str(ROOT / "configs" / "debug.yaml"), f"run.storage_path={tmp_path / 'runs'}",
                       f"data.cache_dir={tmp_path / 'cache'}", f"data.source=synthetic:{tmp_path / 'shapes'}?n_images=40",
                       "data.batch_size=5000"])
    assert code == 2 and "data.batch_size=5000" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_lock_is_free_again_once_its_holder_is_gone(tmp_path, other_process_holds):
    with pytest.raises(Busy, match="running already"):
        with exclusive(tmp_path / "runs" / "twice", "run"):
            pass
    other_process_holds.kill()
    other_process_holds.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel releases a dead process's flock
        try:
            with exclusive(tmp_path / "runs" / "twice", "run"):
                break
        except Busy:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    with exclusive(tmp_path / "runs" / "twice", "run"):  # released at the end of the block
        pass


class Store(SimpleNamespace):
    pass


def _finished(tmp_path, digests=None, **summary):
    cfg = load_config(None, [f"run.storage_path={tmp_path}", "run.name=done", "train.epochs=3"])
    run_dir(cfg).mkdir(parents=True)
    save_config(cfg, run_dir(cfg) / CONFIG_FILE)
    (run_dir(cfg) / SUMMARY_FILE).write_text(json.dumps({"val_rsum": 2.0, "test": {"rsum": 1.0}, **summary}))
    return cfg


def test_a_finished_run_with_the_same_config_and_data_is_not_run_again(tmp_path):
    store = Store(identity={"digests": {"train": "a", "val": "b"}})
    cfg = _finished(tmp_path, data_digests={"train": "a", "val": "b"})
    assert finished_summary(cfg, store)["test"] == {"rsum": 1.0}
    assert finished_summary(cfg, Store(identity={"digests": {"train": "c", "val": "b"}})) is None  # new data
    longer = load_config(None, {**cfg.flat(), "train.epochs": 5})
    assert finished_summary(longer, store) is None  # told to train on: resumes and finalizes again
    other = load_config(None, {**cfg.flat(), "tracking.registered_model": "another"})
    assert finished_summary(other, store) is None
    (run_dir(cfg) / SUMMARY_FILE).unlink()
    assert finished_summary(cfg, store) is None  # not finished


def test_a_finished_runs_summary_from_before_digests_were_recorded_counts(tmp_path):
    cfg = _finished(tmp_path)
    assert finished_summary(cfg, Store(identity={"digests": {}})) is not None


def test_an_mlflow_run_is_reopened_only_for_the_settings_it_was_started_with():
    cfg = load_config(None, ["loss.margin=0.2", "run.max_failures=3"])
    logged = {k: str(v)[:500] for k, v in cfg.flat().items()}
    found = SimpleNamespace(data=SimpleNamespace(params=logged))
    assert not _started_otherwise(found, cfg)
    assert _started_otherwise(found, load_config(None, {**cfg.flat(), "loss.margin": 0.3}))
    # what a resume may change anyway (its retry budget, longer training, tracking) keeps the run
    assert not _started_otherwise(found, load_config(None, {**cfg.flat(), "run.max_failures": 0, "train.epochs": 99}))
    assert not _started_otherwise(SimpleNamespace(data=SimpleNamespace(params={})), cfg)  # nothing logged to compare


SPACE = {"loss.margin": {"uniform": [0.05, 0.3]}, "loss.top_k": {"randint": [1, 8]}}


def test_a_search_restored_with_other_settings_is_refused_naming_them(tmp_path):
    cfg = load_config(None, ["search.num_samples=4", "search.max_concurrent=1"])
    restore.check(cfg, SPACE, tmp_path)  # nothing saved: a new search
    restore.save(cfg, SPACE, tmp_path)
    restore.check(cfg, json.loads(json.dumps(SPACE)), tmp_path)  # the same settings
    # how it runs may change: concurrency, the re-runs after it, tracking
    restore.check(load_config(None, {**cfg.flat(), "search.max_concurrent": 2, "search.rerun_top": 2,
                                     "tracking.experiment": "x"}), SPACE, tmp_path)
    changes = [({"search.num_samples": 8}, SPACE, "search.num_samples: 4 -> 8"),
               ({"search.algorithm": "optuna"}, SPACE, "search.algorithm"),
               ({"train.metric": "i2t_r1"}, SPACE, "train.metric"),
               ({"loss.lambda2": 0.5}, SPACE, "loss.lambda2"),
               ({"train.epochs": cfg.train.epochs + 1}, SPACE, "train.epochs"),
               ({}, {**SPACE, "loss.top_k": {"randint": [1, 16]}}, "space loss.top_k: {'randint': [1, 8]} -> "),
               ({}, {"loss.margin": SPACE["loss.margin"]}, "space loss.top_k")]
    for overrides, space, named in changes:
        with pytest.raises(ConfigError, match="another --name") as err:
            restore.check(load_config(None, {**cfg.flat(), **overrides}), space, tmp_path)
        assert named in str(err.value), (named, str(err.value))


def test_the_search_command_refuses_a_changed_restore_before_ray(tmp_path, capsys, monkeypatch):
    import ray

    from tuning import search

    space = tmp_path / "space.yaml"
    space.write_text("loss.margin: {uniform: [0.05, 0.3]}\n")
    args = ["--config", str(ROOT / "configs" / "debug.yaml"), "--space", str(space), "--name", "s",
            f"run.storage_path={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}",
            f"data.source=synthetic:{tmp_path / 'shapes'}?n_images=40", "data.batch_size=20"]
    cfg, checked = search.resolve(search.build_parser().parse_args(args))
    restore.save(cfg, checked, tmp_path / "runs" / "s")
    monkeypatch.setattr(search, "_restorable", lambda folder: True)  # as if its Tune experiment were there
    code = search.main([*args, "--num-samples", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "search.num_samples: 8 -> 3" in err, err
    assert not ray.is_initialized()


def test_start_from_a_checkpoint_of_another_network_is_refused_naming_the_keys(tmp_path):
    """Loading it failed in the workers after start-up (a state_dict size mismatch, retried)."""
    from trainers.preflight import check_start_from

    donor = tmp_path / "checkpoint_000001"
    donor.mkdir()
    (donor / "state.pt").write_bytes(b"weights")  # read only when the run loads it
    base = ["model.hidden_dim=64", "model.embed_dim=32", "model.dropout=0.5", "optim.name=adam"]
    save_config(load_config(None, base), donor / CONFIG_FILE)
    start = [*base, f"run.start_from={donor}"]
    check_start_from(load_config(None, start))
    check_start_from(load_config(None, [*start, "model.dropout=0.1", "optim.lr=0.01"]))  # shapes unchanged
    for change, named in (("model.hidden_dim=128", "model.hidden_dim: 64 there, 128 here"),
                          ("optim.name=sgd", "optim.name: 'adam' there, 'sgd' here"),
                          ("data.image_encoder=pixels", "data.image_encoder")):
        with pytest.raises(ConfigError, match="another network or optimizer") as err:
            check_start_from(load_config(None, [*start, change]))
        assert named in str(err.value), str(err.value)
    (donor / CONFIG_FILE).write_text("model: [")
    with pytest.raises(ConfigError, match="cannot read its config.yaml") as err:
        check_start_from(load_config(None, start))
    assert "\n" not in str(err.value)  # the YAML error's lines (place, caret) on one line
