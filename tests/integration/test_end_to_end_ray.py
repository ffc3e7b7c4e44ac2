"""End to end through the real path: EfficientNet-lite0 + MiniLM towers fine-tuned from real
Flickr8k pixels and words on 2 Ray Train workers (DDP, gloo), with 004's Stage I (towers frozen for
epoch 1) then Stage II (epochs 2-3); the same run under DeepSpeed ZeRO-2 with batches from Ray Data,
crashed at the stage boundary and resumed by the same command, ends with DDP's weights (up to what
the two backends' reduction order leaves); the registered model embeds raw images and captions.
(Exact replay on resume: test_train_ray and tests/distributed; Ray Data's batches equal the local
loader's: tests/unit/test_end_to_end.py. One run covers all three here: each costs ~70 s.)"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from ray_cli import run_module

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "flickr8k-1k"
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200),
              pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/flickr8k-1k")]


def _args(tmp: Path, name: str, *extra: str) -> list[str]:
    return [f"data.source=karpathy:{tmp / 'data.json'}:{DATA / 'images'}", "model.image_tower=efficientnet_lite0",
            "model.text_tower=minilm", "model.image_size=64", "model.hidden_dim=32", "model.embed_dim=16",
            "data.batch_size=20", "train.epochs=3", "model.tower_frozen_epochs=1", "optim.lr=1e-3",
            "scaling.num_workers=2", f"run.storage_path={tmp / 'runs'}", f"run.name={name}", "run.max_failures=0",
            "run.keep_checkpoints=3",
            f"data.cache_dir={tmp / 'cache'}", f"tracking.tracking_uri=sqlite:///{tmp / 'ml.db'}",
            f"tracking.artifact_location={tmp / 'art'}", "tracking.registered_model=itm-e2e", *extra]


def _latest_state(run: Path) -> dict:
    checkpoints = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    return torch.load(checkpoints[-1] / "state.pt", weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    images = json.loads((DATA / "dataset_flickr8k_1k.json").read_text())["images"]
    keep = [im for split, n in (("train", 12), ("val", 4), ("test", 4))
            for im in [i for i in images if i["split"] == split][:n]]
    (tmp / "data.json").write_text(json.dumps({"dataset": "flickr8k", "images": keep}))
    # The interrupted run is the DeepSpeed one and takes its batches from Ray Data actors; the
    # straight one is DDP with batches prepared in process.
    crashy = _args(tmp, "crashy", "tracking.registered_model=", "data.loader=ray", "scaling.strategy=deepspeed",
                   "scaling.zero_stage=2")
    out = {"straight": run_module("trainers.train", _args(tmp, "straight"), tmp, timeout=600),
           "crashed": run_module("trainers.train", crashy, tmp, {"ITMATCH_FAIL_AT_EPOCH": "2"}, timeout=600)}
    out["resumed"] = run_module("trainers.train", crashy, tmp, timeout=600)
    for name in ("straight", "resumed"):
        assert out[name].returncode == 0, name + out[name].stdout[-2000:] + out[name].stderr[-4000:]
    return tmp, out


def test_towers_train_after_stage_one_and_the_loss_falls(runs):
    tmp, _ = runs
    first = torch.load(sorted((tmp / "runs" / "straight").glob("checkpoint_*"))[0] / "state.pt", weights_only=False)
    last = _latest_state(tmp / "runs" / "straight")
    history = last["train_state"]["history"]
    # Stage II (epochs 2-3) switches the towers to training mode (dropout, drop-connect): compare
    # within it.
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[2]["train_loss"] < history[1]["train_loss"]
    tower = [k for k in last["model"] if k.startswith("image_tower.") and k.endswith("weight")]
    text = [k for k in last["model"] if k.startswith("text_tower.") and k.endswith("weight")]
    assert len(tower) > 50 and len(text) > 30
    from itmatch.data.encoders import build_efficientnet_lite0

    pretrained = build_efficientnet_lite0().net.state_dict()
    key = next(k for k in tower if "_conv_stem" in k)
    inner = key.removeprefix("image_tower.net.")
    torch.testing.assert_close(first["model"][key], pretrained[inner])  # Stage I: the CNN did not move
    assert not torch.equal(last["model"][key], pretrained[inner])  # Stage II: it is fine-tuned


def test_deepspeed_crashed_at_the_stage_boundary_resumes_and_ends_with_ddps_weights(runs):
    """Resumed, not restarted: rank 0 wrote epochs 1-2 before the crash (Stage I, then the first
    Stage II epoch) and the resumed run never writes epoch 1 again (epoch 2 again only if its
    checkpoint was not yet durable when the worker died). Worker log lines are not used: Ray
    forwards them to the driver asynchronously and can drop them when the driver exits.

    Then the same losses every epoch as DDP, and the same weights up to what Adam makes of
    reduction-order rounding: a parameter whose gradient is ~0 moves by up to one learning-rate-sized
    step either way (m/sqrt(v) of noise), so each weight may differ by about lr x steps, and nothing
    more. (Validation ranks on 4 images can flip on such differences.)"""
    tmp, out = runs
    assert out["crashed"].returncode != 0 and "injected failure after epoch 2" in out["crashed"].stderr + \
        out["crashed"].stdout
    lines = (tmp / "runs" / "crashy" / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line)["epoch"] for line in lines]
    assert epochs[:2] == [1, 2] and epochs.count(1) == 1 and epochs[-1] == 3
    ddp, ds = _latest_state(tmp / "runs" / "straight"), _latest_state(tmp / "runs" / "crashy")
    assert ds["deepspeed"]["zero_stage"] == 2 and ds["train_state"]["step"] == ddp["train_state"]["step"]
    assert [h["epoch"] for h in ds["train_state"]["history"]] == [1, 2, 3]
    for a, b in zip(ddp["train_state"]["history"], ds["train_state"]["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    steps, lr = ddp["train_state"]["step"], 1e-3
    for key, value in ddp["model"].items():
        torch.testing.assert_close(ds["model"][key], value, rtol=1e-3, atol=steps * lr, msg=key)


def test_registered_model_embeds_raw_images_and_captions(runs):
    import mlflow
    from PIL import Image

    from itmatch.state import load_model

    tmp, _ = runs
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'ml.db'}")
    model = mlflow.pyfunc.load_model("models:/itm-e2e@champion")
    summary = json.loads((tmp / "runs" / "straight" / "summary.json").read_text())
    reference, _ = load_model(Path(summary["best_checkpoint"]))
    path = next(iter(sorted((DATA / "images").iterdir())))
    got = model.predict(pd.DataFrame({"image": [path.read_bytes(), str(path)]}))
    want = reference.embed_images(reference.image_tower.prepare([Image.open(io.BytesIO(path.read_bytes()))]))
    np.testing.assert_allclose(got, np.repeat(want.numpy(), 2, axis=0), rtol=1e-4, atol=1e-5)
    # the run drew its pictures from the raw test images and logged them with the model
    assert {p.name for p in (tmp / "runs" / "straight" / "pictures").iterdir()} >= {"embedding_map.png", "queries.html"}
    logged = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(summary["run_id"], "pictures")}
    assert {"pictures/embedding_map.png", "pictures/queries.html"} <= logged
    text = model.predict(pd.DataFrame({"text": ["A dog runs on the grass ."]}))
    want = reference.embed_texts(reference.text_tower.prepare(["A dog runs on the grass ."])).numpy()
    np.testing.assert_allclose(text, want, rtol=1e-4, atol=1e-5)
