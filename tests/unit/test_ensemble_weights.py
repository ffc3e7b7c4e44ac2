"""Weighted ensembles (itmatch.models.ensemble) and CCA as a member (trainers.ensemble.cca_member):
the ensemble's cosine against the weighted mean of the members' own cosines, the weights through
save and load, bad weights refused with the file named, and a search-style ensemble with a CCA
member against CCA fitted directly on the training pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from itmatch.config import load_config
from itmatch.data.store import prepare
from itmatch.eval.evaluate import embed_split, evaluate_split
from itmatch.models.cca import CCAModel, training_pairs
from itmatch.models.ensemble import Ensemble, member_weights, save_ensemble
from itmatch.state import CheckpointError, TrainState, load_model, save_checkpoint
from trainers.dist import WorkerContext
from trainers.loop import Trainer

TINY = ["data.batch_size=24", "train.epochs=2", "model.hidden_dim=16", "model.embed_dim=8", "optim.lr=1e-3",
        "data.image_encoder=pixels", "data.text_encoder=hashing", "tracking.enabled=false"]


def _paired(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g)
    return z @ torch.randn(3, 10, generator=g) + torch.randn(n, 10, generator=g), \
        z @ torch.randn(3, 6, generator=g) + torch.randn(n, 6, generator=g)


def test_the_weighted_ensemble_ranks_by_the_weighted_mean_of_cosines():
    x, y = _paired(50, 0)
    members = [CCAModel(10, 6, 3).fit(*_paired(200, 1), ridge=0.1), CCAModel(10, 6, 5).fit(*_paired(200, 2), ridge=0.1)]
    ens = Ensemble(members, [3.0, 1.0])  # scaled to 0.75 / 0.25
    cos = [m.embed_images(x) @ m.embed_texts(y).T for m in members]
    torch.testing.assert_close(ens.embed_images(x) @ ens.embed_texts(y).T, 0.75 * cos[0] + 0.25 * cos[1])
    torch.testing.assert_close(ens.embed_images(x).norm(dim=1), torch.ones(50))
    plain = Ensemble(members)
    torch.testing.assert_close(plain.embed_images(x) @ plain.embed_texts(y).T, (cos[0] + cos[1]) / 2)


@pytest.mark.parametrize("weights", [[1.0], [1.0, -0.5], [0.0, 0.0], [float("nan"), 1.0]])
def test_bad_weights_are_refused(weights):
    with pytest.raises(ValueError, match="ensemble weights must be 2 non-negative numbers"):
        member_weights(2, weights)


def _member(folder, dim: int, seed: int):
    model = CCAModel(10, 6, dim).fit(*_paired(200, seed), ridge=0.1)
    cfg = load_config(None, ["data.source=x", "model.name=cca", f"model.embed_dim={dim}"])
    return save_checkpoint(folder, model={k: v.float() for k, v in model.state_dict().items()}, cfg=cfg,
                           train_state=TrainState(), dims=(10, 6))


def test_weights_survive_save_and_load_and_bad_files_name_themselves(tmp_path):
    x, y = _paired(20, 3)
    folders = [_member(tmp_path / "a", 3, 1), _member(tmp_path / "b", 4, 2)]
    saved = save_ensemble(tmp_path / "ens", folders, weights=[0.2, 0.8])
    assert json.loads((saved / "ensemble.json").read_text())["weights"] == pytest.approx([0.2, 0.8])
    loaded, _ = load_model(saved)
    direct = Ensemble([load_model(f)[0] for f in folders], [0.2, 0.8])
    torch.testing.assert_close(loaded.embed_texts(y), direct.embed_texts(y))
    record = json.loads((saved / "ensemble.json").read_text())
    del record["weights"]  # an ensemble written before weights existed: equal weights
    (saved / "ensemble.json").write_text(json.dumps(record))
    torch.testing.assert_close(load_model(saved)[0].embed_texts(y), Ensemble(direct.members).embed_texts(y))
    (saved / "ensemble.json").write_text(json.dumps({**record, "weights": [1.0, "x"]}))
    with pytest.raises(CheckpointError, match="ensemble.json"):
        load_model(saved)


def test_a_cca_member_is_cca_fitted_on_the_training_pairs(small_precomp, tmp_path):
    """`evaluate_and_log(..., cca_weight=w)`, what search.ensemble_cca does: the trained runs share
    1 - w, and the last member is the CCA of the training split's pairs."""
    from trainers.ensemble import evaluate_and_log

    source = small_precomp
    base = [f"data.source={source}", f"data.cache_dir={tmp_path / 'cache'}", f"run.storage_path={tmp_path / 'runs'}",
            *TINY, "data.text_encoder=hashing"]
    store = prepare(source, cache_dir=tmp_path / "cache", image_encoder="pixels", text_encoder="hashing",
                    splits=["train", "val", "test"], progress=False)
    folders = []
    for seed in (0, 1):
        cfg = load_config(None, [*base, f"train.seed={seed}"])
        trainer = Trainer(cfg, store, WorkerContext(0, 1, 0, torch.device("cpu")), None)
        trainer.fit(lambda metrics, save: None)
        folders.append(save_checkpoint(tmp_path / f"seed{seed}", model=trainer.strategy.full_state_dict(trainer.model),
                                       cfg=cfg, train_state=trainer.state, dims=trainer.dims))
    cfg = load_config(None, [*base, "run.name=ens"])
    summary = evaluate_and_log(cfg, folders, [str(f) for f in folders], cca_weight=0.25, cca_dim=4)
    assert summary["weights"] == pytest.approx([0.375, 0.375, 0.25])
    model, loaded_cfg = load_model(summary["best_checkpoint"])
    assert loaded_cfg.model.name == "embedding" and len(model.members) == 3  # the first member's config
    ref = CCAModel(*store.dims, 4).fit(*training_pairs(store.split("train")), ridge=cfg.model.cca_ridge)
    test = store.split("test")
    caps = torch.tensor(test.caption_feats)
    torch.testing.assert_close(model.members[2].embed_texts(caps), ref.embed_texts(caps), rtol=1e-4, atol=1e-5)
    img, txt = embed_split(model, test)
    parts = [embed_split(m, test) for m in model.members]
    torch.testing.assert_close(img @ txt.T, sum(w * (F.normalize(i, dim=1) @ F.normalize(t, dim=1).T)
                                                for w, (i, t) in zip([0.375, 0.375, 0.25], parts)), rtol=1e-4, atol=1e-5)
    assert summary["test"]["rsum"] == pytest.approx(evaluate_split(model, test)["rsum"])
    assert np.isfinite(summary["val_rsum"])
