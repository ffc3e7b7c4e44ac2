"""Bad input to `python -m trainers.ensemble` (in process, no Ray, no MLflow): a --name whose folder
is another kind of run, a member inside the ensemble's own folder and members of another task are
refused in one line before anything is written; the ensemble is written beside its folder and
swapped in complete, so a failure midway leaves the previous ensemble as it was; re-running the
same command on its own ensemble still works."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from itmatch.config import load_config
from itmatch.data.sources import DataError
from itmatch.data.store import prepare
from itmatch.models.cca import CCAModel, training_pairs
from itmatch.models.ensemble import save_ensemble
from itmatch.state import TrainState, load_model, save_checkpoint
from trainers import ensemble

BASE = ["data.text_encoder=hashing", "model.name=cca", "tracking.enabled=false"]


@pytest.fixture
def setup(small_precomp, tmp_path):
    """(tmp, [two CCA checkpoint folders on small_precomp], the CLI's store and cache arguments)."""
    store = prepare(small_precomp, cache_dir=tmp_path / "cache", image_encoder="pixels", text_encoder="hashing",
                    splits=["train", "val", "test"], progress=False)
    members = [_cca(tmp_path / f"m{dim}", [f"data.source={small_precomp}", *BASE, f"model.embed_dim={dim}"], store, dim)
               for dim in (3, 4)]
    where = [f"run.storage_path={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}"]
    return tmp_path, members, where


def _cca(folder: Path, overrides: list[str], store, dim: int) -> Path:
    model = CCAModel(*store.dims, dim).fit(*training_pairs(store.split("train")), ridge=0.1)
    return save_checkpoint(folder, model={k: v.float() for k, v in model.state_dict().items()},
                           cfg=load_config(None, overrides), train_state=TrainState(), dims=tuple(store.dims))


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` and a hash of its bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(capsys, argv: list[str]) -> str:
    assert ensemble.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    return errors[0]


def test_rerunning_the_command_on_its_own_ensemble_replaces_it(setup):
    tmp, (a, b), where = setup
    assert ensemble.main([str(a), str(b), "--name", "ens", "--cca-weight", "0.25", "--cca-dim", "2", *where]) == 0
    run = tmp / "runs" / "ens"
    (run / "eval.json").write_text("{}")  # a user's file beside the ensemble (trainers.evaluate --json) stays
    assert ensemble.main([str(b), str(a), "--name", "ens", "--cca-weight", "0.25", "--cca-dim", "2", *where]) == 0
    record = json.loads((run / "best_model" / "ensemble.json").read_text())
    assert record["sources"][:2] == [str(b), str(a)] and len(load_model(run / "best_model")[0].members) == 3
    assert sorted(p.name for p in run.iterdir()) == ["best_model", "cca_member", "eval.json", "summary.json"]


def test_a_name_holding_a_training_run_is_refused_before_anything_is_written(setup, capsys):
    tmp, (a, b), where = setup
    run = tmp / "runs" / "trained"  # what a training run leaves: checkpoints, best_model/state.pt, summary.json
    save_checkpoint(run / "checkpoint_000001", model={"w": torch.ones(2)}, cfg=load_config(None, BASE),
                    train_state=TrainState(), dims=tuple(load_model(a)[0].dims))  # the members' widths
    (run / "best_model").mkdir()
    for name in ("state.pt", "config.yaml"):
        (run / "best_model" / name).write_bytes((run / "checkpoint_000001" / name).read_bytes())
    (run / "summary.json").write_text(json.dumps({"best_checkpoint": str(run / "best_model")}))
    before = _tree(run)
    error = _refused(capsys, [str(a), str(b), "--name", "trained", *where])
    assert str(run) in error and "not an ensemble" in error and "checkpoint_000001" in error
    error = _refused(capsys, [str(run), str(b), "--name", "trained", *where])  # and as a member of itself
    assert f"member {run}: lies in the ensemble's own folder" in error
    assert _tree(run) == before and sorted(p.name for p in run.parent.iterdir()) == ["trained"]


def test_a_member_inside_the_ensembles_own_folder_is_refused(setup, capsys):
    tmp, (a, b), where = setup
    assert ensemble.main([str(a), str(b), "--name", "ens", *where]) == 0
    run = tmp / "runs" / "ens"
    before, embedded = _tree(run), load_model(run / "best_model")[0].embed_texts(torch.ones(2, 12))
    inside = run / "best_model" / "member_0"
    for member in (inside, run):
        error = _refused(capsys, [str(member), str(b), "--name", "ens", *where])
        assert f"member {member}" in error and str(run) in error
    assert _tree(run) == before
    torch.testing.assert_close(load_model(run / "best_model")[0].embed_texts(torch.ones(2, 12)), embedded)


def test_a_failure_midway_leaves_the_previous_ensemble_loadable(setup, capsys, monkeypatch):
    tmp, (a, b), where = setup
    assert ensemble.main([str(a), str(b), "--name", "ens", *where]) == 0
    run = tmp / "runs" / "ens"
    before = _tree(run)

    def fails(*args, **kwargs):
        raise DataError("the hubness bank cannot be built")

    monkeypatch.setattr(ensemble, "fit_hubness", fails)  # after the new ensemble is written, before it is used
    _refused(capsys, [str(b), str(a), "--name", "ens", "--hubness", "auto", *where])
    assert _tree(run) == before and sorted(p.name for p in run.iterdir()) == ["best_model", "summary.json"]
    assert len(load_model(run / "best_model")[0].members) == 2


def test_save_ensemble_failing_midway_leaves_the_folder_as_it_was(setup, monkeypatch):
    tmp, (a, b), _ = setup
    folder = save_ensemble(tmp / "ens", [a, b])
    before = _tree(folder)
    copies = []

    def copy_then_fail(src, dst, *args, **kwargs):
        copies.append(dst)
        if len(copies) == 2:
            raise OSError("disk full")
        return real(src, dst, *args, **kwargs)

    real = shutil.copytree
    monkeypatch.setattr("shutil.copytree", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_ensemble(folder, [b, a])
    assert _tree(folder) == before and len(load_model(folder)[0].members) == 2
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".")) == []  # the staged copy is gone


@pytest.mark.parametrize("phrase_first", [False, True])
def test_a_member_of_another_task_is_refused(setup, capsys, phrase_first):
    tmp, (a, _), where = setup
    (tmp / "shapes").write_text("")  # never read: the phrase data need not exist to be refused
    cfg = load_config(None, [f"data.source=shapes-phrases:{tmp / 'shapes'}", "train.metric=phrase_r1", *BASE,
                             "model.embed_dim=3"])
    phrases = save_checkpoint(tmp / "phrases", model={"w": torch.ones(2)}, cfg=cfg, train_state=TrainState(),
                              dims=(24, 12))
    refs = [str(phrases), str(a)] if phrase_first else [str(a), str(phrases)]
    error = _refused(capsys, [*refs, "--name", "mixed", *where])
    assert f"member {refs[1]}" in error and "shapes-phrases:" in error and "phrases" in error
    assert not (tmp / "runs").exists()


def test_overrides_are_read_as_trainers_train_reads_them(setup):
    """`null` is None (it registered a model named 'null'), and a member folder holding `=` is a
    member (it was taken as an override)."""
    tmp, (a, b), where = setup
    cfg, _ = ensemble.build([str(a), str(b)], "ens", [*where, "tracking.registered_model=null", "train.epochs=007"])
    assert cfg.tracking.registered_model is None and cfg.train.epochs == 7 and cfg.run.name == "ens"
    odd = tmp / "runs" / "lr=0.1"
    shutil.copytree(a, odd)
    assert ensemble.split_members([str(odd), str(b), *where]) == ([str(odd), str(b)], where)
    assert ensemble.main([str(odd), str(b), "--name", "ens", *where]) == 0


def test_a_missing_member_holding_an_equals_sign_is_named_as_a_member(setup, capsys):
    tmp, (a, _), where = setup
    error = _refused(capsys, [str(tmp / "lr=0.1" / "best_model"), str(a), "--name", "ens", *where])
    assert error == f"error: member {tmp / 'lr=0.1' / 'best_model'}: no such folder"


def test_members_taking_features_of_other_widths_are_refused(setup, capsys):
    """The same encoder names but other precomp widths: a shape RuntimeError mid-evaluation before."""
    tmp, (a, _), where = setup
    wide = tuple(load_model(a)[0].dims)
    other = (wide[0] + 1, wide[1])
    cfg = load_config(None, [f"data.source={load_model(a)[1].data.source}", *BASE, "model.embed_dim=3"])
    narrow = save_checkpoint(tmp / "wider", model={"w": torch.ones(2)}, cfg=cfg, train_state=TrainState(), dims=other)
    error = _refused(capsys, [str(a), str(narrow), "--name", "ens", *where])
    assert f"member {narrow}: takes (image, caption) features {other} wide, but {a} takes {wide}" in error
    assert not (tmp / "runs").exists()


@pytest.mark.parametrize("text, needle", [("[]", "not a JSON object (got list [])"),
                                          ("null", "not a JSON object (got NoneType None)"),
                                          ('{"a": "\t"}', "not valid JSON (Invalid control character")])
def test_a_damaged_summary_is_named_by_every_reader(setup, capsys, caplog, text, needle):
    """A run folder's summary.json that is no JSON object: the ensemble refuses the member naming the
    file; trainers.train (finished_summary) and a search's or table's re-run run it again, saying so."""
    from itmatch.config import save_config
    from trainers.job import finished_summary
    from tuning.rerun import _summary

    tmp, (a, b), where = setup
    cfg = load_config(None, [f"run.storage_path={tmp / 'runs'}", "run.name=done", *BASE])
    run = tmp / "runs" / "done"
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")  # finished_summary reads it too: the summary alone is damaged
    (run / "summary.json").write_text(text)
    error = _refused(capsys, [str(run), str(b), "--name", "ens", *where])
    assert error.startswith(f"error: {run / 'summary.json'}: {needle}")
    caplog.clear()
    assert finished_summary(cfg, store=None) is None and _summary(cfg) is None
    assert [r.getMessage().split(": not")[0] for r in caplog.records] == [str(run / "summary.json")] * 2


def test_a_summary_whose_best_checkpoint_is_gone_names_it(setup, capsys):
    tmp, (a, b), where = setup
    run = tmp / "done"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"best_checkpoint": str(run / "best_model")}))
    error = _refused(capsys, [str(run), str(b), "--name", "ens", *where])
    assert f"{run / 'summary.json'} names best_checkpoint {run / 'best_model'}, which is missing" in error
