"""Bad input to the training and search commands is refused in one line (`error: ...`, exit 2)
naming the file or variable and its value, before data is featurised or Ray starts: a Ray address,
ITMATCH_* fault-injection variables, overrides after a flag, damaged saved search state, and a
search and a training run sharing one folder. No Ray starts here (ray.init is replaced)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from itmatch.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "configs" / "debug.yaml")


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _unreached(*args, **kwargs):
    raise AssertionError("reached past the input checks")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in folder.rglob("*")}


# ---- A: the Ray address

@pytest.mark.parametrize("overrides, env, setting", [
    (["run.ray_address=10.255.255.1:6379"], {}, "run.ray_address='10.255.255.1:6379'"),
    ([], {"RAY_ADDRESS": "10.255.255.1:6379"}, "RAY_ADDRESS='10.255.255.1:6379' (environment variable)"),
])
@pytest.mark.parametrize("error", [ConnectionError("Failed to connect to Ray cluster at 10.255.255.1:6379\nmore"),
                                   ValueError("Invalid address format: x"), RuntimeError("no GCS")])
def test_a_ray_address_that_does_not_attach_is_one_line_naming_where_it_came_from(overrides, env, setting, error,
                                                                                monkeypatch):
    import ray

    from trainers.train import init_ray

    def fails(**kwargs):
        raise error

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fails)
    monkeypatch.setattr("trainers.train.unreachable", lambda address: None)  # as if a head answered there
    with pytest.raises(ConfigError) as info:
        init_ray(load_config(None, overrides))
    message = str(info.value)
    assert message.startswith(setting) and str(error).splitlines()[0] in message and "\n" not in message


@pytest.mark.parametrize("address, said", [("127.0.0.1:{port}", "refused"), ("no-such-host.invalid:6379", "")])
def test_a_ray_address_where_nothing_answers_is_refused_at_once_without_rays_retries(address, said, monkeypatch):
    import socket

    import ray

    from trainers.train import init_ray

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = address.format(port=s.getsockname()[1])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", _unreached)
    with pytest.raises(ConfigError) as info:
        init_ray(load_config(None, [f"run.ray_address={address}"]))
    message = str(info.value)
    assert message.startswith(f"run.ray_address={address!r}: cannot attach") and "nothing answers at" in message
    assert said in message.lower() and "\n" not in message


# ---- C: ITMATCH_* fault injection, checked by the driver before anything starts

@pytest.mark.parametrize("env, named", [
    ({"ITMATCH_FAIL_AT_EPOCH": "abc"}, "ITMATCH_FAIL_AT_EPOCH='abc'"),
    ({"ITMATCH_FAIL_AT_EPOCH": "0"}, "ITMATCH_FAIL_AT_EPOCH='0'"),
    ({"ITMATCH_HOLD_AT": "1:1"}, "needs ITMATCH_HOLD_DIR"),
    ({"ITMATCH_HOLD_AT": "0:1", "ITMATCH_HOLD_DIR": "/tmp"}, "ITMATCH_HOLD_AT='0:1'"),
    ({"ITMATCH_HOLD_AT": "abc", "ITMATCH_HOLD_DIR": "/tmp"}, "ITMATCH_HOLD_AT='abc'"),
    ({"ITMATCH_HOLD_AT": "2:1", "ITMATCH_HOLD_DIR": "/tmp", "ITMATCH_HOLD_TIMEOUT_S": "soon"},
     "ITMATCH_HOLD_TIMEOUT_S='soon'"),
])
def test_a_malformed_fault_injection_variable_is_refused_before_the_run_starts(env, named, tmp_path, monkeypatch,
                                                                              capsys):
    from trainers import train

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(train, "prepare", _unreached)
    code = train.main(["--config", DEBUG, f"run.storage_path={tmp_path}", "run.name=r1", "tracking.enabled=false"])
    assert code == 2 and named in _one_error(capsys)
    assert not (tmp_path / "r1").exists()


# ---- D: overrides after a flag

def test_overrides_may_follow_a_flag(capsys):
    from trainers import train

    assert train.main(["loss.margin=0.1", "--print-config", "loss.top_k=5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["loss"]["margin"] == 0.1 and printed["loss"]["top_k"] == 5


# ---- B, E: a search's saved state, damaged

def _search_main(monkeypatch, tmp_path: Path, name: str) -> int:
    """tuning.search.main up to its restore checks: data, batch and tracking checks stubbed, the run
    itself refused (it must not be reached)."""
    import trainers.train
    from tuning import search

    monkeypatch.setattr(trainers.train, "prepare_store", lambda cfg: None)
    monkeypatch.setattr(search.preflight, "check_batch", lambda cfg, store: None)
    monkeypatch.setattr(search.preflight, "check_tracking", lambda cfg: None)
    monkeypatch.setattr(search, "run_search", _unreached)
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    return search.main(["--config", DEBUG, "--space", str(space), "--name", name, "tracking.enabled=false",
                        f"run.storage_path={tmp_path / 'runs'}"])


def _tune_folder(search_dir: Path) -> Path:
    tune = search_dir / "tune"
    tune.mkdir(parents=True)
    (tune / "tuner.pkl").write_bytes(pickle.dumps({"_tune_config": "x" * 40, "__trainable_name": "run_trial"}))
    (tune / "experiment_state-2026-01-01_00-00-00.json").write_text(
        json.dumps({"trial_data": [], "runner_data": {}}))
    return tune


@pytest.mark.parametrize("damage, named", [
    (lambda tune: (tune / "tuner.pkl").write_bytes((tune / "tuner.pkl").read_bytes()[:20]), "tuner.pkl"),
    (lambda tune: (tune / "tuner.pkl").write_bytes(b""), "tuner.pkl"),
    (lambda tune: (tune / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": ['),
     "experiment_state-2026-01-01_00-00-00.json"),
    (lambda tune: (tune / "experiment_state-2026-01-02_00-00-00.json").write_text('{"other": 1}'),
     "experiment_state-2026-01-02_00-00-00.json"),  # the newest is the one Tune restores
])
def test_a_search_whose_tune_state_is_damaged_is_refused_naming_the_file_and_left_alone(damage, named, tmp_path,
                                                                                       monkeypatch, capsys):
    search_dir = tmp_path / "runs" / "s2"
    damage(_tune_folder(search_dir))
    before = _snapshot(search_dir)
    assert _search_main(monkeypatch, tmp_path, "s2") == 2
    line = _one_error(capsys)
    assert f"{search_dir / 'tune' / named}: damaged Tune state" in line and "--name" in line
    assert _snapshot(search_dir) == before  # nothing deleted: the user decides


def test_an_intact_tune_state_passes_the_check(tmp_path):
    from tuning import restore

    restore.check_tune_state(_tune_folder(tmp_path / "s").parent)


def test_tune_state_tune_cannot_restore_is_one_line_naming_the_file(tmp_path, monkeypatch):
    from ray import tune

    from tuning import search

    def truncated(*args, **kwargs):
        raise pickle.UnpicklingError("pickle data was truncated")

    monkeypatch.setattr(tune.Tuner, "restore", truncated)
    with pytest.raises(ConfigError, match=r"/s/tune/tuner\.pkl: cannot restore .*pickle data was truncated.*--name"):
        search._restore(str(tmp_path / "s" / "tune"), trainable=None)


def test_a_garbled_search_config_is_one_line_naming_the_file(tmp_path):
    from tuning import restore

    cfg = load_config(None, [])
    restore.save(cfg, {}, tmp_path)
    (tmp_path / restore.CONFIG_FILE).write_text("train: [epochs\n")
    with pytest.raises(ConfigError) as info:
        restore.check(cfg, {}, tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / restore.CONFIG_FILE}: ") and "line 2" in message and "\n" not in message


# ---- F: one folder, one kind

def test_a_training_run_into_a_search_folder_is_refused_and_the_folder_left_alone(tmp_path, monkeypatch, capsys):
    from trainers import train

    search_dir = tmp_path / "s1"
    (search_dir / "tune").mkdir(parents=True)
    (search_dir / "search.json").write_text("{}")
    before = _snapshot(search_dir)
    monkeypatch.setattr(train, "prepare", _unreached)
    assert train.main(["--config", DEBUG, f"run.storage_path={tmp_path}", "run.name=s1",
                       "tracking.enabled=false"]) == 2
    line = _one_error(capsys)
    assert str(search_dir) in line and "search.json" in line and "tune" in line and "run.name" in line
    assert _snapshot(search_dir) == before


def test_a_search_into_a_training_runs_folder_is_refused_and_the_folder_left_alone(tmp_path, monkeypatch, capsys):
    run = tmp_path / "runs" / "e0"
    (run / "checkpoint_000001").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    before = _snapshot(run)
    assert _search_main(monkeypatch, tmp_path, "e0") == 2
    line = _one_error(capsys)
    assert str(run) in line and "checkpoint_000001" in line and "summary.json" in line and "--name" in line
    assert _snapshot(run) == before


def test_a_search_folder_and_a_run_folder_each_pass_as_their_own_kind(tmp_path):
    from trainers.job import refuse_other_kind

    (tmp_path / "s" / "tune").mkdir(parents=True)
    (tmp_path / "s" / "search.json").write_text("{}")
    (tmp_path / "r" / "checkpoint_000001").mkdir(parents=True)
    refuse_other_kind(tmp_path / "s", "search")
    refuse_other_kind(tmp_path / "r", "run")
    refuse_other_kind(tmp_path / "new", "run")


# ---- trainers.evaluate: a blank flag is not its default

@pytest.mark.parametrize("flag", ["--data", "--cache-dir", "--tracking-uri", "--split", "--json", "--pictures",
                                  "--region-phrase-data"])
def test_evaluate_refuses_a_blank_flag_rather_than_taking_its_default(flag, capsys):
    from trainers.evaluate import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(["--model", "runs/x/best_model", flag, " "])
    assert info.value.code == 2
    assert f"argument {flag}: empty: give " in capsys.readouterr().err
