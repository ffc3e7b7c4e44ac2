"""Bad input to the served model (trainers/pyfunc_model.py), in one process without a server: tiny
checkpoints (a features model on pixels + hashing features, an end-to-end one with a convnet and a
GRU) wrapped directly, and the features model saved as the pyfunc model it is logged as, its JSON
requests through the scoring server's own `invocations` (parsing, schema enforcement, predict).

Every bad request is an `MlflowException(INVALID_PARAMETER_VALUE)` (a 400) whose one line names the
column, the row and the value; good ones embed as each row alone does, in bounded chunks. What
tests/integration/test_serving.py and tests/unit/test_images.py already hold is not repeated."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from itmatch.config import load_config
from itmatch.data.encoders import build_image_encoder, build_text_encoder
from itmatch.data.raw import prepare_raw
from itmatch.data.store import prepare
from itmatch.state import load_model, save_checkpoint
from trainers import pyfunc_model
from trainers.dist import WorkerContext
from trainers.loop import Trainer
from trainers.pyfunc_model import EmbeddingModel

TINY = ["data.batch_size=24", "train.epochs=1", "model.hidden_dim=32", "model.embed_dim=16",
        "data.image_encoder=pixels", "data.text_encoder=hashing"]
E2E = ["model.image_tower=convnet", "model.cnn_width=8", "model.image_size=32", "model.text_tower=gru",
       "model.word_dim=16", "model.text_width=16"]
CONFIG = {"image_encoder": "pixels", "text_encoder": "hashing"}


def _train(tmp: Path, name: str, store, overrides: list[str]) -> Path:
    cfg = load_config(None, [f"data.source=synthetic:{tmp / 'shapes'}?n_images=40", *TINY, *overrides])
    trainer = Trainer(cfg, store, WorkerContext(0, 1, 0, torch.device("cpu")), None)
    trainer.fit(lambda metrics, save: None)
    return save_checkpoint(tmp / name, model=trainer.strategy.full_state_dict(trainer.model), cfg=cfg,
                           train_state=trainer.state, dims=trainer.dims)


# saved without an input example (MLflow would predict it at save time)
pytestmark = pytest.mark.filterwarnings("ignore:.*An input example was not provided:UserWarning")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """{"tmp", "feat": checkpoint of the features model, "e2e": of the end-to-end one, "pyfunc":
    the features model saved as its logged pyfunc model and loaded (schema enforcement included)}."""
    import mlflow.pyfunc

    from trainers.tracking import MODEL_CODE

    tmp = tmp_path_factory.mktemp("pyfunc_bad_input")
    source = f"synthetic:{tmp / 'shapes'}?n_images=40"
    store = prepare(source, cache_dir=tmp / "cache", image_encoder="pixels", text_encoder="hashing",
                    splits=["train", "val", "test"], progress=False)
    feat = _train(tmp, "feat", store, [])
    e2e = _train(tmp, "e2e", prepare_raw(source, cache_dir=tmp / "raw", splits=["train", "val", "test"]), E2E)
    root = Path(pyfunc_model.__file__).resolve().parents[1]
    # tracking.log_model's arguments without a tracking store (and without inferring requirements)
    mlflow.pyfunc.save_model(tmp / "pyfunc", python_model=str(MODEL_CODE), model_config=CONFIG,
                             artifacts={"checkpoint": str(feat)},
                             code_paths=[str(root / "itmatch"), str(root / "trainers")],
                             signature=pyfunc_model.signature(16), pip_requirements=["mlflow"])
    return {"tmp": tmp, "feat": feat, "e2e": e2e, "pyfunc": mlflow.pyfunc.load_model(str(tmp / "pyfunc"))}


def _wrapper(folder: Path) -> EmbeddingModel:
    """A fresh wrapper of the checkpoint (tests may patch its model)."""
    from mlflow.pyfunc import PythonModelContext

    model = EmbeddingModel()
    model.load_context(PythonModelContext(artifacts={"checkpoint": str(folder)}, model_config=CONFIG))
    return model


def _refused(model: EmbeddingModel, frame: pd.DataFrame, *expected: str) -> str:
    """The one-line client error predicting `frame` raises; it holds every `expected` text."""
    with pytest.raises(MlflowException) as caught:
        model.predict(None, frame)
    message = caught.value.message
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE" and "\n" not in message, message
    for text in expected:
        assert text in message, (text, message)
    return message


def _serve(pyfunc, payload: str) -> tuple[int, dict]:
    """(HTTP status, JSON body) the scoring server answers a JSON request with."""
    from mlflow.pyfunc.scoring_server import invocations

    try:
        result = invocations(payload.encode(), "application/json", pyfunc, pyfunc.metadata.get_input_schema())
    except MlflowException as exc:  # what the server's handler turns into the response
        return exc.get_http_status_code(), json.loads(exc.serialize_as_json())
    return result.status, json.loads(result.response)


def _reference_texts(folder: Path, captions: list[str]) -> np.ndarray:
    """The checkpoint's caption embeddings through the hashing encoder its features came from."""
    model, _ = load_model(folder)
    with torch.no_grad():
        return model.embed_texts(torch.from_numpy(build_text_encoder("hashing").encode(captions))).numpy()


def _png(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A 70-byte PNG that declares width x height RGB pixels (its data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\0" * 8)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------- missing and blank values


@pytest.mark.parametrize("column, value", [("text", pd.NA), ("image", None), ("image", np.nan), ("image", pd.NA),
                                           ("text_feature", None), ("text_feature", np.nan)])
def test_a_null_cell_is_named_missing_in_every_column(trained, column, value):
    """pd.NA was "expected a string, got NAType", a null image "got NoneType", and a null feature
    row "rows have 1 values, this model takes 4096" (None read as one NaN)."""
    good = {"text": "a red disc", "image": _png(0), "text_feature": [0.0] * 4096}[column]
    frame = pd.DataFrame({column: pd.Series([good, value], dtype=object)})
    _refused(_wrapper(trained["feat"]), frame, f"{column} row 1: missing (null)")


@pytest.mark.parametrize("caption", ["\x00\x01\x02", "\u200b\u200b", "\u200b \t\u2060"])
def test_a_caption_of_invisible_characters_is_blank_as_in_training(trained, caption):
    """`str.strip` keeps zero-width and control characters, so these were embedded: the hashing
    encoder's zero vector (an embedding of nothing) served as if it were a caption's."""
    assert not build_text_encoder("hashing").encode([caption]).any()  # nothing to embed
    _refused(_wrapper(trained["feat"]), pd.DataFrame({"text": ["a red disc", caption]}),
             "text row 1: an empty caption", repr(caption))


def test_a_lone_surrogate_is_refused_before_a_tokenizer_raises_on_it(trained):
    """JSON "\\udc80" parses to a lone surrogate, which cannot be encoded: MiniLM's tokenizer raised
    TypeError (a 400 with a stack trace); the hashing model embedded it without a word."""
    caption = "a \udc80 disc"
    with pytest.raises(UnicodeEncodeError):
        caption.encode("utf-8")
    _refused(_wrapper(trained["feat"]), pd.DataFrame({"text": pd.Series([caption], dtype=object)}),
             "text row 0: not valid Unicode text", "'a \\udc80 disc'")
    status, body = _serve(trained["pyfunc"], '{"inputs": {"text": ["a red disc", "a \\udc80 disc"]}}')
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in body, body
    assert "text row 1: not valid Unicode text" in body["message"].splitlines()[-1]


def test_an_empty_list_of_captions_is_refused_like_an_empty_frame(trained):
    """`{"inputs": {"text": []}}` is one row holding no caption: it was answered 200 with no
    embeddings (and raised ValueError from a DataFrame holding `[]`)."""
    status, body = _serve(trained["pyfunc"], '{"inputs": {"text": []}}')
    assert status == 400 and "column 'text' has no rows" in body["message"].splitlines()[-1], body
    _refused(_wrapper(trained["feat"]), pd.DataFrame({"text": pd.Series([[]], dtype=object)}),
             "column 'text' has no rows")


# --------------------------------------------------------------------------- feature rows


@pytest.mark.parametrize("row, expected", [
    (["0.5"] * 4096, "got strings"),
    ([True] * 4096, "got booleans"),
    (np.full((2, 2048), 0.5), "got a nested list of shape (2, 2048)"),
    ([[0.5] * 4096], "got a nested list of shape (1, 4096)"),
    (np.array([0.5, "x"] + [0.5] * 4094, dtype=object), "got values that are not numbers"),
    (0.5, "got a single number"),
    ([10 ** 400] + [0] * 4095, "a value beyond float's range"),
    ([0.5] * 4095, "rows have 4095 values, this model takes 4096 (row 1)"),
])
def test_a_feature_row_must_be_a_flat_list_of_numbers(trained, row, expected):
    """numpy read "0.5" and True as numbers and flattened nested rows (a [2, 2048] row was embedded
    as 4096 values); MLflow's schema refuses them in a served request, so a Python caller gets the
    same answer. A 400-digit integer raised OverflowError; a ragged row named no row."""
    frame = pd.DataFrame({"text_feature": pd.Series([[0.0] * 4096, row], dtype=object)})
    _refused(_wrapper(trained["feat"]), frame, "text_feature", "row 1", expected)


def test_numbers_as_ints_or_python_objects_embed_as_floats(trained):
    rows = np.random.default_rng(0).integers(-3, 4, size=(2, 4096))
    model, _ = load_model(trained["feat"])
    with torch.no_grad():
        want = model.embed_texts(torch.from_numpy(rows.astype(np.float32))).numpy()
    frame = pd.DataFrame({"text_feature": pd.Series([rows[0].tolist(), rows[1].astype(object)], dtype=object)})
    np.testing.assert_allclose(_wrapper(trained["feat"]).predict(None, frame), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("big", [1e30, -1e30, 3e38])
def test_features_that_overflow_inside_the_network_are_refused_not_served_as_zero(trained, big):
    """Finite float32 features this far beyond the training data's scale overflow inside the branch
    (L2 normalisation squares them): the embedding came back as the zero vector, served as if it
    were one. The non-finite check passes them (they are finite), so the output is checked."""
    row = [big] + [0.0] * 4095
    model, _ = load_model(trained["feat"])
    with torch.no_grad():
        raw = model.embed_texts(torch.tensor([row], dtype=torch.float32)).numpy()
    assert np.isfinite(raw).all() and not raw.any()  # what was served
    frame = pd.DataFrame({"text_feature": [[0.1] * 4096, row]})
    _refused(_wrapper(trained["feat"]), frame, "text_feature row 1: the model cannot embed it", f"{abs(big):.3g}")
    status, body = _serve(trained["pyfunc"], json.dumps({"dataframe_split": {"columns": ["text_feature"],
                                                                             "data": [[row]]}}))
    assert status == 400 and "text_feature row 0: the model cannot embed it" in body["message"].splitlines()[-1]


def test_the_output_check_leaves_an_ensembles_hubness_columns_alone():
    """An ensemble with a hubness correction appends [1, -w·penalty] to its unit embedding: only its
    first `core_dim` columns are a unit vector."""
    wrapper = EmbeddingModel()
    wrapper.model = type("Hub", (), {"core_dim": 4})()
    corrected = np.array([[0.5, 0.5, 0.5, 0.5, 1.0, -0.3]], np.float32)
    np.testing.assert_array_equal(wrapper._checked("text", ["a red disc"], corrected), corrected)
    with pytest.raises(MlflowException, match="text row 0: the model cannot embed it"):
        wrapper._checked("text", ["a red disc"], np.array([[0, 0, 0, 0, 1.0, -0.3]], np.float32))


# --------------------------------------------------------------------------- images


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_over_the_pixel_limit_is_refused_from_its_header(trained, monkeypatch):
    """PIL refuses more than twice Image.MAX_IMAGE_PIXELS but only warns between one and two times
    it, and decodes: a 300 KB PNG of 100 M pixels is 300 MB decoded (600 MB with the RGB copy)."""
    from PIL import ImageFile

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    side = int((Image.MAX_IMAGE_PIXELS * 1.2) ** 0.5)  # inside PIL's warning-only band
    assert Image.MAX_IMAGE_PIXELS < side * side <= 2 * Image.MAX_IMAGE_PIXELS
    frame = pd.DataFrame({"image": [_png_header(side, side)]})
    _refused(_wrapper(trained["feat"]), frame, f"image row 0: {side}x{side} pixels, more than the "
                                               f"{Image.MAX_IMAGE_PIXELS} this server decodes")
    # beyond twice the limit PIL itself refuses it when opening: still one line, no decoding
    _refused(_wrapper(trained["feat"]), pd.DataFrame({"image": [_png_header(100_000, 100_000)]}),
             "image row 0: cannot decode the image (DecompressionBombError)")


def test_image_errors_name_the_value(trained, tmp_path):
    """A folder on the server was read as base64 ("cannot decode the image" or "neither a file nor
    base64"), a data URL of another type was "neither a file on the server nor base64"; no message
    showed the value, and a long one is cut short."""
    model = _wrapper(trained["feat"])
    png64 = base64.b64encode(_png(0)).decode()
    folder = str(tmp_path / "abcd")
    (tmp_path / "abcd").mkdir()
    for value, expected in [(folder, f"{folder!r} is on the server but is no image file"),
                            ("data:text/plain;base64," + png64, "a data URL must start with data:image/<type>;base64, "
                                                                "got 'data:text/plain;base64,"),
                            ("@@not base64@@", "neither a file on the server nor base64-encoded image bytes: "
                                               "'@@not base64@@'"),
                            ("QUJD" * 10_000, "cannot decode the image (UnidentifiedImageError): 'QUJDQUJD")]:
        message = _refused(model, pd.DataFrame({"image": [png64, value]}), "image row 1: ", expected)
        assert len(message) < 300, message


# --------------------------------------------------------------------------- large requests in chunks


def test_ten_thousand_captions_are_embedded_in_chunks_as_each_alone(trained, monkeypatch):
    """The whole request went through the encoder and the branch at once (10k x 4096 hashing
    features here; MiniLM's attention over 10k captions, or 10k decoded images, would not fit)."""
    model = _wrapper(trained["feat"])
    sizes: list[int] = []
    embed_texts = model.model.embed_texts
    monkeypatch.setattr(model.model, "embed_texts", lambda x: sizes.append(len(x)) or embed_texts(x))
    captions = [f"a red disc number {i}" for i in range(10_000)]
    got = model.predict(None, pd.DataFrame({"text": captions}))
    step = pyfunc_model.CHUNK_ROWS["text"]
    assert got.shape == (10_000, 16) and got.dtype == np.float32
    assert max(sizes) == step and sum(sizes) == 10_000
    rows = [0, step - 1, step, 9_999]
    np.testing.assert_allclose(got[rows], _reference_texts(trained["feat"], [captions[i] for i in rows]),
                               rtol=1e-5, atol=1e-6)
    alone = np.concatenate([model.predict(None, pd.DataFrame({"text": [captions[i]]})) for i in rows])
    np.testing.assert_allclose(got[rows], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["feat", "e2e"])
def test_images_decode_a_chunk_at_a_time_and_errors_keep_the_request_row(trained, monkeypatch, which):
    """All the request's images were decoded (at full size) before any was embedded."""
    monkeypatch.setitem(pyfunc_model.CHUNK_ROWS, "image", 2)
    decoded: list[tuple[int, int]] = []
    decode = pyfunc_model.decode_images
    monkeypatch.setattr(pyfunc_model, "decode_images",
                        lambda values, first=0: decoded.append((first, len(values))) or decode(values, first))
    images = [_png(seed) for seed in range(5)]
    got = _wrapper(trained[which]).predict(None, pd.DataFrame({"image": images}))
    assert decoded == [(0, 2), (2, 2), (4, 1)]
    reference, _ = load_model(trained[which])
    pil = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    with torch.no_grad():
        want = reference.embed_images(torch.from_numpy(build_image_encoder("pixels").encode(pil))
                                      if which == "feat" else reference.image_tower.prepare(pil)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    _refused(_wrapper(trained[which]), pd.DataFrame({"image": images[:3] + [b"not an image"]}),
             "image row 3: cannot decode the image")


def test_an_end_to_end_text_tower_reads_captions_in_chunks(trained, monkeypatch):
    monkeypatch.setitem(pyfunc_model.CHUNK_ROWS, "text", 3)
    model = _wrapper(trained["e2e"])
    sizes: list[int] = []
    prepare = model.model.text_tower.prepare
    monkeypatch.setattr(model.model.text_tower, "prepare", lambda texts: sizes.append(len(texts)) or prepare(texts))
    captions = ["a red disc", "a blue square on the right", "x", "two green triangles", "a disc", "a square", "y"]
    got = model.predict(None, pd.DataFrame({"text": captions}))
    assert sizes == [3, 3, 1]
    reference, _ = load_model(trained["e2e"])
    with torch.no_grad():
        want = reference.embed_texts(reference.text_tower.prepare(captions)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
