"""The worker's Trainer outside Ray (one process): the gradient-cached step is the same update as
the one-pass step, and the train step runs one path for every objective."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from itmatch.config import load_config
from itmatch.data.store import prepare
from trainers.dist import WorkerContext
from trainers.loop import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from strategy_worker import poison as _poisoned  # noqa: E402  (a NaN loss at given calls, one definition)

BASE = ["data.source=x", "data.batch_size=24", "train.epochs=2", "model.hidden_dim=32", "model.embed_dim=16",
        "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shapes")
    return prepare(f"synthetic:{tmp / 'shapes'}?n_images=40", cache_dir=tmp / "cache", image_encoder="pixels",
                   text_encoder="hashing", splits=["train", "val", "test"], progress=False)


def _train(store, *overrides: str) -> Trainer:
    cfg = load_config(None, [*BASE, *overrides])
    trainer = Trainer(cfg, store, WorkerContext(0, 1, 0, torch.device("cpu")), None)
    trainer.fit(lambda metrics, save: None)
    return trainer


@pytest.mark.parametrize("objective", [[], ["loss.instance_weight=0.5", "loss.center_weight=0.1"],
                                       ["loss.name=infonce"], ["model.name=similarity", "loss.name=logistic"]])
def test_grad_cache_step_is_the_one_pass_step(store, objective):
    """On cached features (identity towers) the two paths draw the same random numbers in the same
    order, so whole runs agree to rounding."""
    one = _train(store, *objective)
    cached = _train(store, *objective, "train.grad_cache_chunk=5")
    a, b = one.strategy.full_state_dict(one.model), cached.strategy.full_state_dict(cached.model)
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert [h["train_loss"] for h in one.state.history] == pytest.approx([h["train_loss"] for h in cached.state.history],
                                                                         rel=1e-4)


def test_grad_cache_runs_under_either_strategy():
    """DeepSpeed (ZeRO 0-3) takes gradient caching too: tests/distributed/test_grad_cache_deepspeed.py."""
    for strategy in ("ddp", "deepspeed"):
        assert load_config(None, ["train.grad_cache_chunk=8", f"scaling.strategy={strategy}"]).train.grad_cache_chunk == 8


@pytest.mark.parametrize("extra", [[], ["train.grad_cache_chunk=5"]])
def test_nonfinite_loss_skips_the_step_everywhere_or_stops(store, extra):
    cfg = load_config(None, [*BASE, "train.nonfinite=skip", *extra])
    trainer = Trainer(cfg, store, WorkerContext(0, 1, 0, torch.device("cpu")), None)
    _poisoned(trainer, {1})
    before = trainer.strategy.full_state_dict(trainer.model)
    trainer.fit(lambda metrics, save: None)
    after = trainer.strategy.full_state_dict(trainer.model)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert trainer.state.history[0]["train_skipped_steps"] == 1.0
    assert "train_skipped_steps" not in trainer.state.history[1]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the other steps trained

    stop = Trainer(load_config(None, [*BASE, *extra]), store, WorkerContext(0, 1, 0, torch.device("cpu")), None)
    _poisoned(stop, {1})
    with pytest.raises(FloatingPointError, match="train.nonfinite=skip"):
        stop.fit(lambda metrics, save: None)


def test_a_run_started_at_its_last_epoch_still_reports_its_checkpoint(store, tmp_path):
    """PBT can clone a donor's checkpoint from its last epoch: the new run has nothing left to train,
    but it must still report a checkpoint (with best/ weights), or finalizing it fails."""
    from trainers.loop import BEST_DIR

    done = _train(store)
    done.epoch_weights = done.strategy.full_state_dict(done.model)
    done.save(tmp_path / "donor")
    cfg = load_config(None, [*BASE, f"run.start_from={tmp_path / 'donor'}"])
    clone = Trainer(cfg, store, WorkerContext(0, 1, 0, torch.device("cpu")), None)
    clone.start_from(tmp_path / "donor")
    reports = []

    def report(metrics, save):
        save(tmp_path / f"report{len(reports)}")
        reports.append(metrics)

    clone.fit(report)
    assert [r["epoch"] for r in reports] == [2.0]
    assert (tmp_path / "report0" / BEST_DIR / "state.pt").is_file()
    saved = torch.load(tmp_path / "report0" / "state.pt", weights_only=False)["model"]
    for key, value in done.strategy.full_state_dict(done.model).items():
        torch.testing.assert_close(saved[key], value, msg=key)


def test_residual_cca_is_fitted_on_the_training_pairs_before_the_first_step(small_precomp, tmp_path):
    """model.residual=cca: the Trainer fits the branches' CCA on its training split's pairs (the
    same fit as model.name=cca there); the checkpoint keeps it, and a loaded model embeds the same."""
    from itmatch.models.cca import CCAModel
    from itmatch.state import load_model

    store = prepare(small_precomp, cache_dir=tmp_path / "cache", image_encoder="pixels",
                    text_encoder="hashing", splits=["train", "val"], progress=False)
    cfg = load_config(None, [*BASE, "model.residual=cca", "train.epochs=1"])
    trainer = Trainer(cfg, store, WorkerContext(0, 1, 0, torch.device("cpu")), None)
    images, texts = trainer.train_pairs()
    ref = CCAModel(24, 12, 12).fit(images, texts, ridge=cfg.model.cca_ridge)  # min(embed_dim 16, widths)
    net = trainer.strategy.unwrap(trainer.model)
    torch.testing.assert_close(net.image.cca_weight[:, :12], ref.image.weight)
    torch.testing.assert_close(net.text.cca_mean, ref.text.mean)
    captions = torch.tensor(trainer.val_split.caption_feats)
    with torch.no_grad():  # before training: CCA's embedding of the validation captions
        torch.testing.assert_close(net.eval().embed_texts(captions)[:, :12], ref.text(captions), rtol=1e-4, atol=1e-5)

    def report(metrics, save):
        if save is not None:
            save(tmp_path / "ckpt")

    trainer.fit(report)
    loaded, _ = load_model(tmp_path / "ckpt")
    torch.testing.assert_close(loaded.text.cca_weight, net.text.cca_weight)


@pytest.mark.parametrize("keep, epoch", [("best", 1), ("last", 3)])
def test_train_keep_picks_the_best_validation_epoch_or_the_last(store, keep, epoch, monkeypatch):
    """train.keep=last (a refit whose validation split is in its training data): the model kept is
    the last epoch's whatever validation says; best: the epoch validation scores highest. Validation
    here falls every epoch, so the two differ."""
    scores = iter([30.0, 20.0, 10.0])
    monkeypatch.setattr(Trainer, "validate", lambda self, weights: {"rsum": next(scores)})
    monkeypatch.setattr("trainers.loop.format_metrics", lambda metrics: "")
    cfg = load_config(None, [*BASE, "train.epochs=3", f"train.keep={keep}"])
    trainer = Trainer(cfg, store, WorkerContext(0, 1, 0, torch.device("cpu")), None)
    weights = []
    trainer.fit(lambda metrics, save: weights.append(trainer.epoch_weights))
    assert trainer.state.best_epoch == epoch
    for key, value in weights[epoch - 1].items():
        torch.testing.assert_close(trainer.best_weights[key], value, msg=key)
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])  # the epochs did differ
