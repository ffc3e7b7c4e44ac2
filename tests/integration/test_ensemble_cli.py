"""Ensembles of trained runs (itmatch.models.ensemble, `python -m trainers.ensemble`, a search's
`search.ensemble`): two tiny embedding networks trained in one process (no Ray) with different
seeds, then checked against independent references: the ensemble's cosine is the mean of the
members' cosines, its retrieval metrics equal ranking by that mean, the CLI's summary equals the
saved ensemble evaluated again, MLflow holds it as a registered model that embeds like the folder,
and members with other inputs or a learned pair score are refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from itmatch.config import load_config
from itmatch.data.store import prepare
from itmatch.eval.evaluate import embed_split, evaluate_split
from itmatch.eval.retrieval import retrieval_metrics
from itmatch.models.ensemble import Ensemble, save_ensemble
from itmatch.state import load_model, save_checkpoint
from trainers.dist import WorkerContext
from trainers.loop import Trainer

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
TINY = ["data.batch_size=24", "train.epochs=2", "model.hidden_dim=32", "model.embed_dim=16", "optim.lr=1e-3",
        "data.image_encoder=pixels", "data.text_encoder=hashing", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """(tmp, source, store, [run folders with summary.json], the members' configs)."""
    tmp = tmp_path_factory.mktemp("ensemble")
    source = f"synthetic:{tmp / 'shapes'}?n_images=60"
    store = prepare(source, cache_dir=tmp / "cache", image_encoder="pixels", text_encoder="hashing",
                    splits=["train", "val", "test"], progress=False)
    runs = []
    for seed in (0, 1):
        cfg = load_config(None, [f"data.source={source}", f"data.cache_dir={tmp / 'cache'}", f"train.seed={seed}",
                                 f"run.storage_path={tmp / 'runs'}", f"run.name=seed{seed}", *TINY])
        trainer = Trainer(cfg, store, WorkerContext(0, 1, 0, torch.device("cpu")), None)
        trainer.fit(lambda metrics, save: None)
        run = tmp / "runs" / f"seed{seed}"
        best = save_checkpoint(run / "best_model", model=trainer.strategy.full_state_dict(trainer.model), cfg=cfg,
                               train_state=trainer.state, dims=trainer.dims)
        (run / "summary.json").write_text(json.dumps({"best_checkpoint": str(best)}))
        runs.append(run)
    return tmp, source, store, runs


def test_the_ensemble_ranks_by_the_mean_of_the_members_cosines(members, tmp_path):
    tmp, _, store, runs = members
    models = [load_model(r / "best_model")[0] for r in runs]
    split = store.split("test")
    embedded = [embed_split(m, split) for m in models]
    mean_cos = sum(F.normalize(i, dim=1) @ F.normalize(t, dim=1).T for i, t in embedded) / len(embedded)
    txt_img = torch.from_numpy(split.caption_image)
    reference = retrieval_metrics(embedded[0][0], embedded[0][1], txt_img, score_fn=lambda rows_i, rows_t: mean_cos[
        _rows(rows_i, embedded[0][0])][:, _rows(rows_t, embedded[0][1])])
    ens = Ensemble(models)
    img, txt = embed_split(ens, split)
    torch.testing.assert_close(img @ txt.T, mean_cos, rtol=1e-5, atol=1e-6)
    ours = evaluate_split(ens, split, sentences=False)
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "rsum"):
        assert ours[key] == pytest.approx(reference[key])
    # saved and loaded back: the same model
    folder = save_ensemble(tmp_path / "ens", [r / "best_model" for r in runs])
    loaded, cfg = load_model(folder)
    img2, txt2 = embed_split(loaded, split)
    torch.testing.assert_close(img2, img)
    torch.testing.assert_close(txt2, txt)
    assert cfg.model.embed_dim == 16 and loaded.dims == models[0].dims


def _rows(block: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Which rows of `full` a score_fn block holds (retrieval_metrics passes row slices)."""
    matches = (block[:, None, :] == full[None, :, :]).all(-1)
    return matches.float().argmax(1)


def test_cli_evaluates_logs_and_registers_the_ensemble(members):
    tmp, source, store, runs = members
    uri = f"sqlite:///{tmp / 'ml.db'}"
    args = [sys.executable, "-m", "trainers.ensemble", str(runs[0]), str(runs[1] / "best_model"), "--name", "ens",
            "tracking.enabled=true", f"tracking.tracking_uri={uri}", f"tracking.artifact_location={tmp / 'art'}",
            "tracking.registered_model=itm-ens"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp / "runs" / "ens" / "summary.json").read_text())
    model, _ = load_model(summary["best_checkpoint"])
    assert isinstance(model, Ensemble) and len(model.members) == 2
    again = evaluate_split(model, store.split("test"))
    assert summary["test"]["rsum"] == pytest.approx(again["rsum"])
    assert summary["val_rsum"] == pytest.approx(evaluate_split(model, store.split("val"))["rsum"])
    assert summary["registry"]["promoted"] is True  # the first version takes the alias
    import mlflow

    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model("models:/itm-ens@champion")
    feats = store.split("test").caption_feats[:3]
    emb = served.predict(pd.DataFrame({"text_feature": list(feats)}))
    np.testing.assert_allclose(emb, model.embed_texts(torch.tensor(feats)).numpy(), rtol=1e-5, atol=1e-6)
    assert emb.shape == (3, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_one_run_with_a_hubness_correction_is_registered_and_served_corrected(members):
    """`trainers.ensemble RUN --hubness 5,0.5`: one run is enough; the registered model serves the
    augmented embeddings, whose dot product is CSLS against the training split (itmatch.models.hubness
    checked pair by pair in tests/unit/test_hubness.py), the same scores as the folder's model."""
    from itmatch.models.hubness import penalty

    tmp, source, store, runs = members
    uri = f"sqlite:///{tmp / 'hub.db'}"
    args = [sys.executable, "-m", "trainers.ensemble", str(runs[0]), "--name", "hub", "--hubness", "5,0.5",
            "tracking.enabled=true", f"tracking.tracking_uri={uri}", f"tracking.artifact_location={tmp / 'hart'}",
            "tracking.registered_model=itm-hub"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp / "runs" / "hub" / "summary.json").read_text())
    assert (summary["hubness"]["k"], summary["hubness"]["weight"]) == (5, 0.5)
    import mlflow
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(summary["run_id"])
    assert run.data.tags["itmatch.hubness"].startswith("k=5 w=0.5 (val rsum ")
    assert run.data.metrics["hubness_val_rsum_plain"] == pytest.approx(summary["hubness"]["val_rsum_plain"])
    assert run.data.metrics["hubness_test_rsum_plain"] == pytest.approx(summary["hubness"]["test_rsum_plain"])

    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model("models:/itm-hub@champion")
    test = store.split("test")
    caps = served.predict(pd.DataFrame({"text_feature": list(test.caption_feats[:4])}))
    ims = served.predict(pd.DataFrame({"image_feature": list(test.image_feats[:3])}))
    plain = load_model(runs[0] / "best_model")[0]
    train_img, train_txt = (F.normalize(x, dim=1) for x in embed_split(plain, store.split("train")))
    i = F.normalize(plain.embed_images(torch.tensor(test.image_feats[:3])), dim=1)
    t = F.normalize(plain.embed_texts(torch.tensor(test.caption_feats[:4])), dim=1)
    csls = i @ t.T - 0.5 * (penalty(i, train_txt, 5)[:, None] + penalty(t, train_img, 5)[None, :])
    assert caps.shape == (4, 18) and ims.shape == (3, 18)
    np.testing.assert_allclose(ims @ caps.T, csls.numpy(), rtol=1e-3, atol=2e-3)  # bank stored in float16
    bad = subprocess.run([sys.executable, "-m", "trainers.ensemble", str(runs[0]), "--name", "x", "--hubness", "10:0.5",
                          f"run.storage_path={tmp / 'bad'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "'10:0.5'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_members_with_other_inputs_or_a_pair_score_are_refused(members, tmp_path):
    tmp, source, store, runs = members
    cfg = load_config(None, [f"data.source={source}", *TINY, "data.text_encoder=minilm"])
    other = save_checkpoint(tmp_path / "other", model=load_model(runs[0] / "best_model")[0], cfg=cfg,
                            train_state=__import__("itmatch.state", fromlist=["TrainState"]).TrainState(),
                            dims=(1, 1))
    done = subprocess.run([sys.executable, "-m", "trainers.ensemble", str(runs[0]), str(other), "--name", "bad",
                           f"run.storage_path={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "data.text_encoder='minilm'" in done.stderr and str(other) in done.stderr

    class Scored(torch.nn.Module):
        def score_matrix(self, a, b):  # a learned pair score: not a cosine to average
            return a @ b.T

    with pytest.raises(ValueError, match="learned pair score"):
        Ensemble([load_model(runs[0] / "best_model")[0], Scored()])


def test_a_search_registers_its_choices_seeds_as_one_ensemble(members):
    """search.ensemble: the chosen configuration's seed runs become one model, logged as a child of
    the search's MLflow run; it is what the search then promotes."""
    from mlflow.tracking import MlflowClient

    from trainers import tracking
    from tuning.search import ensemble_model

    tmp, source, store, runs = members
    uri = f"sqlite:///{tmp / 'search.db'}"
    cfg = load_config(None, [f"data.source={source}", *TINY, "tracking.enabled=true", f"tracking.tracking_uri={uri}",
                             f"tracking.artifact_location={tmp / 'sart'}", "search.name=s9", "search.ensemble=true"])
    info = tracking.setup(cfg.tracking)
    parent = {**info, "run_id": MlflowClient(uri).create_run(info["experiment_id"], run_name="s9").info.run_id}
    seeds = [{"seed": k, "val": 1.0 + k, "test": 0.0, "run_id": None, "model_uri": None,
              "checkpoint": str(r / "best_model")} for k, r in enumerate(runs)]
    choice = {"trial_id": "t1", "seeds": seeds, "model": seeds[1], "val_mean": 1.5, "val_std": 0.7}
    other = {"trial_id": "t2", "seeds": seeds[:1], "model": seeds[0], "val_mean": 1.0, "val_std": None}
    model = ensemble_model(cfg, choice, [other, choice], tmp / "search", parent)
    assert model["seed"] == [0, 1] and choice["model"] is model
    ens, _ = load_model(model["checkpoint"])
    assert isinstance(ens, Ensemble)
    assert model["val"] == pytest.approx(evaluate_split(ens, store.split("val"))["rsum"])
    run = MlflowClient(uri).get_run(model["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent["run_id"] and run.info.status == "FINISHED"
    assert model["model_uri"].startswith("models:/")
    single = {"trial_id": "t1", "seeds": seeds[:1], "model": seeds[0], "val_mean": 1.0, "val_std": None}
    assert ensemble_model(cfg, single, [single], tmp / "search", parent) is seeds[0]  # one seed: nothing to ensemble
    # search.ensemble_top=2: the two best configurations' runs, named by trial and seed
    two = load_config(None, {**cfg.flat(), "search.rerun_top": 2, "search.ensemble_top": 2})
    model = ensemble_model(two, single, [other, single], tmp / "search", parent)
    assert model["seed"] == ["t1:0", "t2:0"]
    # search.ensemble_hubness: the search's ensemble carries the correction it asks for
    hub = load_config(None, {**cfg.flat(), "search.ensemble_hubness": "5,0.5"})
    model = ensemble_model(hub, choice, [other, choice], tmp / "search", parent)
    assert (model["hubness"]["k"], model["hubness"]["weight"]) == (5, 0.5)
    assert load_model(model["checkpoint"])[0].hubness.k == 5


def test_a_search_refit_retrains_the_chosen_ensemble_on_train_and_val(members, monkeypatch):
    """search.refit: the chosen ensemble's members are trained again, each with its own config and
    seed, on train+val for its best epoch count (keeping the last); CCA and the hubness bank are
    refitted on the same union (checked against fits on the two splits read separately); the model
    keeps the score it was selected by, logs no validation metric of its own, and is registered as
    trained on train+val: a later model is held to that score, not to its re-score on a split it
    trained on. The re-runs run here, one after another, instead of as Ray tasks."""
    from mlflow.tracking import MlflowClient

    from itmatch.models.cca import CCAModel, training_pairs
    from itmatch.state import load_checkpoint
    from trainers import tracking
    from trainers.in_process import no_reports
    from trainers.job import promote, run_job
    from tuning import refit, rerun
    from tuning.search import ensemble_model

    tmp, source, store, runs = members
    uri = f"sqlite:///{tmp / 'refit.db'}"
    cfg = load_config(None, [f"data.source={source}", f"data.cache_dir={tmp / 'cache'}", *TINY, "tracking.enabled=true",
                             f"tracking.tracking_uri={uri}", f"tracking.artifact_location={tmp / 'rart'}",
                             "search.name=s10", "search.ensemble=true", "search.refit=true",
                             "search.ensemble_cca=0.25", "search.ensemble_hubness=5,0.5"])
    info = tracking.setup(cfg.tracking)
    parent = {**info, "run_id": MlflowClient(uri).create_run(info["experiment_id"], run_name="s10").info.run_id}
    seeds = [{"seed": k, "val": 1.0 + k, "test": 0.0, "run_id": None, "model_uri": None,
              "checkpoint": str(r / "best_model")} for k, r in enumerate(runs)]
    choice = {"trial_id": "t1", "params": {}, "seeds": seeds, "model": seeds[1], "val_mean": 1.5, "val_std": 0.7}
    setup = {"base": cfg.flat(), "store": str(store.root), "reruns_dir": str(tmp / "s10" / "reruns"), "name": "s10",
             "parent_run_id": None}
    trained = []

    def here(items, setup, concurrent):
        out = []
        for item in items:
            # one worker in this process (the members' configs ask for 2, as Ray tasks would run them)
            trained.append(load_config(None, {**rerun.rerun_config(setup, item).flat(), "scaling.num_workers": 1}))
            out.append({**item, "status": "finished", "summary": run_job(trained[-1], store, forward=no_reports)})
        return out

    monkeypatch.setattr(rerun, "run_all", here)
    model = ensemble_model(cfg, choice, [choice], tmp / "s10", parent, setup)

    best_epochs = [load_checkpoint(r / "best_model")[0]["train_state"].best_epoch for r in runs]
    assert [(c.data.train_split, c.train.keep, c.train.epochs, c.train.seed) for c in trained] == \
        [("train+val", "last", e, k) for k, e in enumerate(best_epochs)]
    before, _ = load_model(model["refit"]["before"]["checkpoint"])
    assert model["val"] == pytest.approx(evaluate_split(before, store.split("val"))["rsum"])  # selected by
    ens, _ = load_model(model["checkpoint"])
    assert model["test"] == pytest.approx(evaluate_split(ens, store.split("test"))["rsum"])
    for member, c in zip(ens.members, trained):  # the refitted runs' kept weights
        kept, _ = load_model(Path(c.run.storage_path) / c.run.name / "best_model")
        for key, value in kept.state_dict().items():
            torch.testing.assert_close(member.state_dict()[key], value, msg=key)
    # CCA fitted on train and val's pairs, read split by split
    pairs = [training_pairs(store.split(s)) for s in ("train", "val")]
    cca = CCAModel(*store.dims, 128).fit(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]), ridge=cfg.model.cca_ridge)
    test = store.split("test")
    np.testing.assert_allclose(embed_split(ens.members[-1], test)[0].numpy(), embed_split(cca.eval(), test)[0].numpy(),
                               rtol=1e-4, atol=1e-4)
    # the hubness correction as chosen before, its bank the refitted ensemble's train and val images
    assert (ens.hubness.k, ens.hubness.weight) == (5, 0.5)
    plain = Ensemble(ens.members, ens.weights, None).eval()
    bank = torch.cat([embed_split(plain, store.split(s))[0] for s in ("train", "val")])
    torch.testing.assert_close(ens.hubness.ref_images, F.normalize(bank, dim=1), rtol=0, atol=2e-3)
    run = MlflowClient(uri).get_run(model["run_id"])
    assert "val_rsum" not in run.data.metrics and run.data.metrics["selection_val_rsum"] == pytest.approx(model["val"])
    assert "train+val" in run.data.tags["itmatch.refit"] and run.info.status == "FINISHED"
    # registered as trained on train+val, with the score it was selected by
    reg = load_config(None, {**cfg.flat(), "tracking.registered_model": "itm-refit"})
    first = promote({**parent, "run_id": model["run_id"]}, refit.trained_on(reg), store, model["model_uri"], model["val"])
    version = MlflowClient(uri).get_model_version("itm-refit", first["version"])
    assert first["promoted"] and version.tags["trained_on"] == "train+val"
    other = model["refit"]["before"]
    before_uri = other["model_uri"]
    worse = promote({**parent, "run_id": other["run_id"]}, reg, store, before_uri, model["val"] - 1)
    assert not worse["promoted"] and worse["champion_score"] == pytest.approx(model["val"])
    better = promote({**parent, "run_id": other["run_id"]}, reg, store, before_uri, model["val"] + 0.5)
    assert better["promoted"]
