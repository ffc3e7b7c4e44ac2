"""Every method goes through the same MLflow path: 2-Way Net (002, cached features) and 003's single
network (pixels and encoded captions) are trained by the worker's Trainer in one process (no Ray),
logged with trainers.tracking, registered @champion, and the registered pyfunc model loaded back
embeds captions and images exactly as the checkpoint does."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch

from itmatch.config import load_config
from itmatch.state import load_model, save_checkpoint
from trainers import tracking
from trainers.dist import WorkerContext
from trainers.loop import Trainer

CAPTIONS = ["a red disc on the left", "two blue squares", "a word the vocabulary never saw: zyzzyva"]
METHODS = {
    # 2-Way Net on cached features (frozen pixel and hashing featurizers, as test_serving.py)
    "twoway": ["model.name=twoway", "model.hidden_dim=32", "model.embed_dim=16", "data.image_encoder=pixels",
               "data.text_encoder=hashing"],
    # the single network from raw pixels and words (its own encoding of the captions)
    "single": ["model.name=single", "model.image_size=32", "model.cnn_width=4", "model.embed_dim=16",
               "model.word_dim=6", "model.text_max_length=12", "model.single_inputs=config2", "loss.center_weight=1"],
}


def _store(tmp, source: str, cfg):
    from itmatch.data.raw import prepare_inputs

    d = cfg.data
    return prepare_inputs(source, cache_dir=tmp / "cache", raw_images=cfg.model.raw_images,
                          image_encoder=d.image_encoder, text_encoder=d.text_encoder, splits=["train", "val", "test"])


@pytest.fixture(scope="module", params=sorted(METHODS))
def registered(request, tmp_path_factory):
    """(method, tmp, checkpoint folder, store, trainer, MLflow run id, the registered model loaded back)."""
    import mlflow

    method, tmp = request.param, tmp_path_factory.mktemp(request.param)
    source, uri, name = f"synthetic:{tmp / 'shapes'}?n_images=40", f"sqlite:///{tmp / 'ml.db'}", f"itm-{method}"
    cfg = load_config(None, [f"data.source={source}", "data.batch_size=24", "train.epochs=1", "optim.lr=1e-3",
                             f"tracking.tracking_uri={uri}", f"tracking.artifact_location={tmp / 'art'}",
                             f"tracking.registered_model={name}", *METHODS[method]])
    store = _store(tmp, source, cfg)
    info = tracking.start_run(cfg, f"{method}-test", store)
    # rank 0 logs every epoch's metrics to the run, as under Ray
    trainer = Trainer(cfg, store, WorkerContext(0, 1, 0, torch.device("cpu")), {**info, "folder": str(tmp / "run")})
    trainer.fit(lambda metrics, save: None)
    folder = save_checkpoint(tmp / "best", model=trainer.strategy.full_state_dict(trainer.model), cfg=cfg,
                             train_state=trainer.state, dims=trainer.dims)
    model_info = tracking.log_model(info, folder, store)
    tracking.register(info, cfg, model_info.model_uri, trainer.state.best_metric, None)
    tracking.end_run(info)
    mlflow.set_tracking_uri(uri)
    return method, tmp, folder, store, trainer, info["run_id"], mlflow.pyfunc.load_model(f"models:/{name}@champion")


def _pngs(tmp, n: int = 3) -> list[bytes]:
    return [p.read_bytes() for p in sorted((tmp / "shapes").rglob("*.png"))[:n]]


def _reference(method: str, folder, store, column: str, values: list) -> np.ndarray:
    """The checkpoint's embeddings: through the frozen featurizers (2-Way Net, cached features) or
    the model's own input preparation (the single network)."""
    from PIL import Image

    from itmatch.data.encoders import build_image_encoder, build_text_encoder

    model, _ = load_model(folder)
    model.eval()
    images = [Image.open(io.BytesIO(v)).convert("RGB") for v in values] if column == "image" else None
    with torch.no_grad():
        if method == "single":
            if column == "text":
                return model.embed_texts(model.text_tower.prepare(values)).numpy()
            return model.embed_images(model.image_tower.prepare(images)).numpy()
        if column == "text":
            return model.embed_texts(torch.from_numpy(build_text_encoder("hashing").encode(values))).numpy()
        return model.embed_images(torch.from_numpy(build_image_encoder("pixels").encode(images))).numpy()


def test_trained_and_registered_with_its_history(registered):
    import mlflow
    from mlflow.tracking import MlflowClient

    method, tmp, folder, store, trainer, run_id, _ = registered
    history = trainer.state.history
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"]) and history[0]["val_rsum"] >= 0
    client = MlflowClient(mlflow.get_tracking_uri())
    (logged,) = client.get_metric_history(run_id, "val_rsum")
    assert logged.step == 1 and logged.value == pytest.approx(history[0]["val_rsum"])
    assert client.get_run(run_id).data.params["model.name"] == method
    version = client.get_model_version_by_alias(f"itm-{method}", "champion")
    assert int(version.version) == 1 and float(version.tags["val_score"]) == pytest.approx(trainer.state.best_metric)
    assert load_model(folder)[1].model.name == method


@pytest.mark.parametrize("column", ["text", "image"])
def test_registered_model_embeds_as_the_checkpoint(registered, column):
    method, tmp, folder, store, _, _, pyfunc = registered
    values = CAPTIONS if column == "text" else _pngs(tmp)
    got = pyfunc.predict(pd.DataFrame({column: values}))
    want = _reference(method, folder, store, column, values)
    assert got.shape == (len(values), 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
