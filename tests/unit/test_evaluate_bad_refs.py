"""`trainers.evaluate` on bad model references and damaged model folders: one line `error: ...`
(exit 2) naming the file or reference, field and value -- never a traceback, never a silent wrong
result. Tiny models (6- and 4-wide features) built once per module; everything runs in process."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from itmatch.config import load_config
from itmatch.models import build_model
from itmatch.state import CONFIG_FILE, STATE_FILE, TrainState, save_checkpoint
from tests.unit.test_readers import write_precomp
from trainers import evaluate

DIMS = (6, 4)


def _save(folder: Path, *overrides: str, weights_of: tuple[str, ...] = ()) -> Path:
    """A checkpoint of a small network configured by `overrides`; `weights_of`: the overrides of
    the network whose weights state.pt holds instead (checksums consistent: only the misfit left)."""
    cfg = load_config(overrides=["model.hidden_dim=8", "model.embed_dim=4", *overrides])
    net = build_model(*DIMS, load_config(overrides=["model.hidden_dim=8", "model.embed_dim=4", *weights_of]).model)
    return save_checkpoint(folder, model=net, cfg=cfg, train_state=TrainState(epoch=1), dims=DIMS)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """A good checkpoint, data of its widths, and a cache folder shared by the module's tests."""
    tmp = tmp_path_factory.mktemp("evrefs")
    good = _save(tmp / "good")
    text_encoder = load_config().data.text_encoder
    write_precomp(tmp / "p", {"train": 4, "dev": 3, "test": 2}, dim=DIMS[0], cap_dim=DIMS[1],
                  feature_name=text_encoder)
    return {"tmp": tmp, "good": good, "data": f"precomp:{tmp / 'p'}", "cache": str(tmp / "cache"),
            "text_encoder": text_encoder}


def _run(env: dict, model: str | Path, *extra: str, data: bool = True) -> list[str]:
    """evaluate.main's arguments for `model` (with the module's data unless `data` is False)."""
    args = ["--model", str(model), "--cache-dir", env["cache"], *extra]
    return [*args, "--data", env["data"]] if data else args


def _refused(capsys, argv: list[str]) -> str:
    """The one `error:` line evaluate.main printed, exiting 2 (a traceback fails the test)."""
    assert evaluate.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _copy(env: dict, name: str) -> Path:
    folder = env["tmp"] / name
    shutil.rmtree(folder, ignore_errors=True)
    return Path(shutil.copytree(env["good"], folder))


# ---- state.pt and config.yaml that do not fit each other or are not ours


@pytest.mark.parametrize("config, weights, needle", [
    (["model.hidden_dim=8"], ["model.hidden_dim=16"], "model.hidden_dim=8"),
    (["model.branch=linear"], [], "model.branch='linear'"),
    (["model.name=cca"], [], "model.name='cca'"),
], ids=["hidden_dim", "branch", "model-name"])
def test_weights_of_another_network_than_config_yaml_are_named(env, capsys, config, weights, needle):
    """A size mismatch or missing keys in load_state_dict was a RuntimeError traceback."""
    folder = _save(env["tmp"] / f"misfit-{needle.split('=')[0]}", *config, weights_of=weights)
    said = _refused(capsys, _run(env, folder))
    assert f"{folder / STATE_FILE}: its weights do not fit the network {folder / CONFIG_FILE}" in said
    assert needle in said


@pytest.mark.parametrize("payload, needle", [
    ({"a": 1}, "field 'model' is missing"),
    (torch.zeros(3), "holds a Tensor"),
    ({"model": {}, "train_state": {}}, "field 'dims' is missing"),
    ({"model": {}, "dims": [6], "train_state": {}}, "field 'dims' = [6]"),
    ({"model": {}, "dims": [6, 4], "train_state": {"epochs": 1}}, "'train_state' has unknown keys ['epochs']"),
], ids=["dict", "tensor", "no-dims", "one-dim", "train-state-key"])
def test_a_state_pt_that_is_not_a_checkpoint_is_named(env, capsys, payload, needle):
    """A torch file of other fields (checksums.json gone, so it is loaded to be checked) was a
    KeyError / IndexError / TypeError traceback."""
    folder = _copy(env, "foreign")
    (folder / "checksums.json").unlink()
    torch.save(payload, folder / STATE_FILE)
    said = _refused(capsys, _run(env, folder))
    assert f"{folder / STATE_FILE}: " in said and needle in said


def test_a_pickled_object_is_refused_without_terminal_codes(env, capsys):
    """torch's refusal of a pickled object carried its bold escape codes into the error line."""
    folder = _copy(env, "pickled")
    (folder / "checksums.json").unlink()
    torch.save(torch.nn.Linear(2, 2), folder / STATE_FILE)
    said = _refused(capsys, _run(env, folder))
    assert f"{folder / STATE_FILE}: cannot load" in said and "\x1b" not in said


@pytest.mark.parametrize("text, needle", [
    ("model: [unclosed\n", "unreadable (ParserError: expected ',' or ']'"),
    ("{}\n", "not a saved config"),
], ids=["broken-yaml", "empty-mapping"])
def test_a_broken_or_empty_config_yaml_is_named(env, capsys, text, needle):
    """Broken YAML was a traceback; `{}` read as every default, a network other than state.pt's."""
    folder = _copy(env, "badcfg")
    (folder / "checksums.json").unlink()
    (folder / CONFIG_FILE).write_text(text)
    said = _refused(capsys, _run(env, folder))
    assert f"{folder / CONFIG_FILE}: " in said and needle in said


def test_weights_that_are_not_finite_are_refused_not_scored_zero(env, capsys):
    """NaN weights (a diverged run) ranked everything last: rsum 0, exit 0, without a word."""
    folder = env["tmp"] / "nan"
    cfg = load_config(overrides=["model.hidden_dim=8", "model.embed_dim=4"])
    net = build_model(*DIMS, cfg.model)
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    save_checkpoint(folder, model=net, cfg=cfg, train_state=TrainState(epoch=1), dims=DIMS)
    said = _refused(capsys, _run(env, folder))
    assert f"--model {folder}: its embeddings of split 'test' are not finite" in said
    assert repr(next(iter(net.state_dict()))) in said


def test_non_finite_metrics_are_written_as_null(capsys):
    """json.dumps wrote NaN, which no JSON reader takes; written as null and named instead."""
    out = evaluate.finite_metrics({"rsum": float("nan"), "i2t_r1": 10.0, "note": "x"})
    assert out == {"rsum": None, "i2t_r1": 10.0, "note": "x"}
    assert "rsum" in capsys.readouterr().err
    json.loads(json.dumps(out, allow_nan=False))


# ---- ensemble folders


@pytest.mark.parametrize("text, needle", [
    ('{"weights": [1.0]}', "field 'members' = None"),
    ('{"members": [', "unreadable (JSONDecodeError"),
    ('{"members": "member_0"}', "field 'members' = 'member_0'"),
], ids=["no-members", "broken-json", "members-a-string"])
def test_a_broken_ensemble_json_is_named(env, capsys, text, needle):
    """No `members` or broken JSON was a traceback; a string was read letter by letter (member `m`)."""
    folder = env["tmp"] / "ens"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(env["good"], folder / "member_0")
    (folder / "ensemble.json").write_text(text)
    said = _refused(capsys, _run(env, folder))
    assert f"{folder / 'ensemble.json'}: " in said and needle in said


# ---- references that name no model folder


def test_a_relative_model_path_missing_here_is_named_resolved(env, capsys, monkeypatch):
    """A path written for another current folder said only `not a checkpoint folder`."""
    monkeypatch.chdir(env["tmp"])
    said = _refused(capsys, _run(env, "runs/r1"))
    assert f"no such file or folder ({env['tmp'] / 'runs' / 'r1'})" in said


def test_a_checkpoint_file_names_its_folder(env, capsys):
    said = _refused(capsys, _run(env, env["good"] / STATE_FILE))
    assert f"a checkpoint's file; give its folder: --model {env['good']}" in said


def test_a_run_folder_cut_short_names_its_newest_checkpoint(env, capsys):
    """A run stopped before best_model/ was written: its checkpoints are what can be evaluated."""
    run = env["tmp"] / "cut"
    for epoch in (1, 2):
        _save(run / f"checkpoint_00000{epoch}")
    said = _refused(capsys, _run(env, run))
    assert "without best_model/" in said and f"--model {run / 'checkpoint_000002'}" in said


def test_a_checkpoint_with_best_weights_says_which_it_read(env, capsys, caplog):
    """A checkpoint folder's best/ is read, not its own last epoch's weights: said, not silent."""
    run = env["tmp"] / "withbest"
    shutil.rmtree(run, ignore_errors=True)
    _save(run)
    shutil.copytree(env["good"], run / "best")
    logger = logging.getLogger("itmatch.results")
    logger.addHandler(caplog.handler)
    try:
        assert evaluate.main(_run(env, run, "--json", str(env["tmp"] / "withbest.json"))) == 0
    finally:
        logger.removeHandler(caplog.handler)
    assert f"read its best weights, {run / 'best'}" in caplog.text


# ---- the data the model reads


def test_the_wrong_width_is_named_by_side_and_model(env, capsys):
    p = env["tmp"] / "narrow"
    write_precomp(p, {"train": 4, "dev": 3, "test": 2}, dim=DIMS[0], cap_dim=3, feature_name=env["text_encoder"])
    said = _refused(capsys, [*_run(env, env["good"], data=False), "--data", f"precomp:{p}"])
    assert f"--data precomp:{p}: caption features of width 3, but --model {env['good']} takes 4" in said


def test_a_relative_trained_on_source_from_another_folder_is_named(env, capsys, monkeypatch):
    """Without --data, the model's own relative data.source is read from the current folder:
    `precomp:p: not a directory` named neither the model's config nor that folder."""
    folder = _save(env["tmp"] / "relsrc", "data.source=precomp:p")
    elsewhere = env["tmp"] / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    monkeypatch.chdir(elsewhere)
    said = _refused(capsys, _run(env, folder, data=False))
    assert f"--model {folder} was trained on data.source = 'precomp:p'" in said and str(elsewhere) in said
    monkeypatch.chdir(env["tmp"])  # from the training folder, the same reference evaluates
    assert evaluate.main(_run(env, folder, "--json", str(env["tmp"] / "rel.json"), data=False)) == 0


# ---- --json


def test_json_ending_in_a_slash_is_refused_not_written_as_a_file(env, capsys):
    """`--json out/` (a missing folder) was written as a file named `out`."""
    target = env["tmp"] / "outdir"
    said = _refused(capsys, _run(env, env["good"], "--json", f"{target}/"))
    assert f"--json {target}/: names a folder" in said and not target.exists()


def test_json_below_a_file_names_the_file(env, capsys):
    """mkdir's `File exists` named nothing."""
    blocker = env["tmp"] / "afile"
    blocker.write_text("x")
    said = _refused(capsys, _run(env, env["good"], "--json", str(blocker / "sub" / "m.json")))
    assert f"({blocker} is a file, not a folder)" in said


@pytest.mark.parametrize("name", [STATE_FILE, CONFIG_FILE])
def test_json_onto_a_file_of_the_model_is_refused(env, capsys, name):
    """--json at the checkpoint's own state.pt overwrote it with the metrics, breaking the model."""
    folder = _copy(env, "overwrite")
    before = (folder / name).read_bytes()
    said = _refused(capsys, _run(env, folder, "--json", str(folder / name)))
    assert "is a file of a saved model" in said and (folder / name).read_bytes() == before


# ---- MLflow references


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A SQLite store with a foreign pyfunc model registered as `other` and a run with no model."""
    import mlflow
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("evstore")
    uri = f"sqlite:///{tmp / 'm.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("t", artifact_location=(tmp / "art").as_uri())
    empty_run = client.create_run(experiment).info.run_id
    client.set_terminated(empty_run)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment):
        mlflow.pyfunc.log_model(name="model", python_model=_Foreign(), registered_model_name="other")
    return {"uri": uri, "empty_run": empty_run}


class _Foreign:
    """Stands for another program's pyfunc model (made a PythonModel lazily: mlflow imports slowly)."""

    def __new__(cls):
        import mlflow.pyfunc

        class Foreign(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input):
                return model_input

        return Foreign()


def test_a_foreign_pyfunc_model_is_named(env, store, capsys):
    """Any PythonModel registered in the store was an AttributeError traceback (`.model`)."""
    said = _refused(capsys, _run(env, "models:/other/1", "--tracking-uri", store["uri"]))
    assert "--model models:/other/1: not an itmatch model" in said and "Foreign" in said


def test_a_run_without_a_model_is_one_line(env, store, capsys):
    """MLflow's download bar for a runs:/ reference stood on stderr above the error."""
    ref = f"runs:/{store['empty_run']}/model"
    said = _refused(capsys, _run(env, ref, "--tracking-uri", store["uri"]))
    assert f"--model {ref}: cannot load from" in said
