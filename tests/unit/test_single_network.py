"""003's single network: the caption-as-image encoding against hand-built images, the softmax +
center loss against loops, config2's extra inputs, the config keys that pick it, a checkpoint round
trip, and a few steps on a tiny synthetic set that lower the loss (CPU, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from itmatch.config import ConfigError, load_config
from itmatch.data.batch import make_batch
from itmatch.losses import build_objective
from itmatch.losses.center import softmax_center_loss
from itmatch.models import build_model
from itmatch.models.single import CaptionLayout, SingleNet, encode_captions, random_crops
from itmatch.models.word_towers import PAD
from itmatch.state import TrainState, load_model, save_checkpoint

TINY = ["model.name=single", "model.image_size=32", "model.cnn_width=4", "model.embed_dim=8", "model.word_dim=6",
        "model.text_max_length=8", "model.vocab_size=50", "model.augment=false", "data.batch_size=12"]


def _px(v: float) -> float:
    return 255.0 / (1.0 + np.exp(-v))


# --------------------------------------------------------------------------- the encoding


def test_encoding_is_the_hand_built_image():
    """8 × 8 image, 6-d vectors (two RGB pixels a word, side by side), superpixel 2, separator 1:
    a word is a 2 × 4 block, one word per row (5 px + 4 px > 8), rows 3 px apart: 3 words fit."""
    layout = CaptionLayout(8, 6, superpixel=2, separator=1)
    assert layout.block == (1, 2) and layout.grid == (3, 1) and layout.capacity == 3
    vectors = torch.tensor([[[0.0, 1.0, -1.0, 2.0, -2.0, 0.5],
                             [3.0, -3.0, 0.25, -0.25, 1.5, -1.5],
                             [9.0, 9.0, 9.0, 9.0, 9.0, 9.0]]])  # the third word is padding
    present = torch.tensor([[True, True, False]])
    got = encode_captions(vectors, present, layout.source_index(3))

    want = np.zeros((3, 8, 8))
    for word, top in ((0, 0), (1, 3)):
        v = vectors[0, word].tolist()
        for c in range(3):
            want[c, top:top + 2, 0:2] = _px(v[c])        # first pixel: components 0, 1, 2
            want[c, top:top + 2, 2:4] = _px(v[3 + c])    # second pixel: components 3, 4, 5
    assert got.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-5, atol=1e-4)


def test_layout_reading_order_and_fit():
    """Words fill a row left to right, then the next; the largest superpixel that fits is picked."""
    layout = CaptionLayout(9, 3, superpixel=2, separator=1)  # one pixel a word: 2 × 2 blocks, 3 px apart
    assert layout.grid == (3, 3)
    index = layout.source_index(9)
    corners = [[int(index[0, y, x]) // 3 for x in (0, 3, 6)] for y in (0, 3, 6)]
    assert corners == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert (index[:, 2, :] == 27).all() and (index[:, :, 2] == 27).all()  # separators show the background

    # 1 × 2-pixel words: at superpixel 7 a word is 7 × 14 px, 2 a row, 4 rows = 8 words; at 8, 1 × 3
    assert CaptionLayout.fit(32, 6, 8, None, 1).superpixel == 7
    assert CaptionLayout.fit(32, 6, 8, 2, 1).superpixel == 2
    with pytest.raises(ValueError, match="fewer than model.text_max_length"):
        CaptionLayout.fit(32, 6, 8, 8, 1)
    with pytest.raises(ValueError, match="multiple of 3"):
        CaptionLayout.fit(32, 5, 8, None, 1)


def test_caption_tower_paints_its_vocabulary():
    model = build_model(0, 0, load_config(None, TINY).model)
    tower = model.text_tower
    tower.fit_vocabulary(["a dog runs", "a dog sits", "the cat"])
    ids = tower.prepare(["dog runs", "unknownword"])
    assert ids[0, :2].tolist() == [tower.prepare.index["dog"], tower.prepare.index["runs"]]
    assert (ids[0, 2:] == PAD).all() and ids[1, 0] == 1  # words from the first slot; unknown = 1
    images = tower(ids)
    assert images.shape == (2, 3, 32, 32)
    layout = tower.layout
    want = encode_captions(tower.lookup(ids), ids != PAD, layout.source_index(8))
    torch.testing.assert_close(images, want)
    assert float(images[1].count_nonzero()) == 3 * (layout.dim // 3) * layout.superpixel ** 2  # one word


# --------------------------------------------------------------------------- the loss


def test_softmax_center_loss_equals_loops():
    g = torch.Generator().manual_seed(0)
    n_img, n_txt, n_cls, d, lam = 3, 7, 5, 4, 0.7
    img = F.normalize(torch.randn(n_img, d, generator=g), dim=1)
    txt = F.normalize(torch.randn(n_txt, d, generator=g), dim=1)
    centers = torch.randn(n_cls, d, generator=g)
    img_logits, txt_logits = torch.randn(n_img, n_cls, generator=g), torch.randn(n_txt, n_cls, generator=g)
    img_cls, txt_cls = torch.tensor([0, 3, 4]), torch.tensor([0, 0, 3, 3, 4, 4, 4])
    got = softmax_center_loss(img, img_logits, centers[img_cls], img_cls, txt, txt_logits, centers[txt_cls], txt_cls,
                              center_weight=lam)

    def ce(logits, cls):
        return sum(-float(logits[i, c]) + float(np.log(sum(np.exp(float(v)) for v in logits[i]))) for i, c in
                   enumerate(cls.tolist())) / len(cls)

    def center(x, cls):
        return sum(0.5 * sum((float(x[i, k]) - float(centers[c, k])) ** 2 for k in range(d))
                   for i, c in enumerate(cls.tolist())) / len(cls)

    want = {"visual": ce(img_logits, img_cls), "textual": ce(txt_logits, txt_cls), "center_img": center(img, img_cls),
            "center_txt": center(txt, txt_cls)}
    want["loss"] = want["visual"] + want["textual"] + lam * (want["center_img"] + want["center_txt"])
    for key, value in want.items():
        assert float(got[key]) == pytest.approx(value, rel=1e-5), key


def _raw_store(tmp_path_factory):
    from itmatch.data.raw import prepare_raw

    tmp = tmp_path_factory.mktemp("single")
    return prepare_raw(f"synthetic:{tmp / 'shapes'}?n_images=40", cache_dir=tmp / "cache")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _raw_store(tmp_path_factory)


def _model_and_batch(store, *overrides: str, n_classes: int = 40):
    cfg = load_config(None, [*TINY, *overrides])
    torch.manual_seed(0)
    model = build_model(0, 0, cfg.model, n_classes=n_classes, heads=cfg.loss.heads)
    split = store.split("train")
    model.text_tower.fit_vocabulary(split.texts)
    captions = np.flatnonzero(split.caption_image < 6)
    batch = make_batch(split, captions, model.image_tower.prepare, model.text_tower.prepare, train=True,
                       rng=np.random.default_rng(0))
    return cfg, model, batch


def test_objective_is_the_loss_on_the_model_outputs(store):
    cfg, model, batch = _model_and_batch(store, "loss.center_weight=0.5")
    assert isinstance(model, SingleNet) and cfg.loss.name == "softmax_center"
    out = model(batch)
    got = build_objective(cfg.loss)(out, batch)
    want = softmax_center_loss(out["img"], out["img_logits"], out["img_center"], batch.image_cls, out["txt"],
                               out["txt_logits"], out["txt_center"], batch.text_cls, center_weight=0.5)
    torch.testing.assert_close(got["loss"], want["loss"])
    assert set(got) == {"loss", "visual", "textual", "center_img", "center_txt"}


def test_forward_in_eval_mode_is_what_embed_gives(store):
    """The evaluator and the registered model embed with embed_images / embed_texts: the same as
    the training forward's outputs in eval mode (one pass over the mixed batch changes nothing there)."""
    _, model, batch = _model_and_batch(store)
    model.eval()
    out = model(batch)
    torch.testing.assert_close(model.embed_images(batch.images), out["img"])
    torch.testing.assert_close(model.embed_texts(batch.texts), out["txt"])
    assert out["img"].shape == (len(batch.image_gid), 8) and out["txt"].shape == (len(batch.text_gid), 8)


def test_config2_adds_flipped_images_and_cropped_encodings(store, monkeypatch):
    cfg, model, batch = _model_and_batch(store, "model.single_inputs=config2")
    seen = []
    features = model.features
    monkeypatch.setattr(model, "features", lambda x: seen.append(x) or features(x))
    out = model.train()(batch)
    n_img, n_txt = len(batch.image_gid), len(batch.text_gid)
    (x,) = seen
    assert len(x) == 2 * (n_img + n_txt) and len(out["img"]) == 2 * n_img and len(out["txt"]) == 2 * n_txt
    pixels = batch.images.float()
    torch.testing.assert_close(x[:n_img], pixels)
    torch.testing.assert_close(x[n_img:2 * n_img], pixels.flip(-1))
    encoded = model.text_tower(batch.texts)
    torch.testing.assert_close(x[2 * n_img:2 * n_img + n_txt], encoded)
    for row, crop in zip(encoded, x[2 * n_img + n_txt:]):  # nearest scaling: only the caption's own colours
        assert set(crop.unique().tolist()) <= set(row.unique().tolist())
    torch.testing.assert_close(out["img_cls"], batch.image_cls.repeat(2))
    torch.testing.assert_close(out["txt_cls"], batch.text_cls.repeat(2))
    seen.clear()
    out = model.eval()(batch)  # evaluation sees the inputs alone
    assert len(seen[0]) == n_img + n_txt and len(out["img"]) == n_img


def test_random_crops_are_scaled_windows():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    torch.manual_seed(3)
    crops = random_crops(x, fraction=0.5)
    assert crops.shape == x.shape
    for row, crop in zip(x, crops):
        top, left = divmod(int(crop[0, 0, 0]) % 64, 8)  # the window's corner pixel
        torch.testing.assert_close(crop, F.interpolate(row[None, :, top:top + 4, left:left + 4], size=(8, 8))[0])


def test_a_few_steps_lower_the_loss(store):
    cfg, model, batch = _model_and_batch(store, "loss.center_weight=1", "model.single_inputs=config2")
    objective = build_objective(cfg.loss)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    model.train()
    torch.manual_seed(1)
    for _ in range(12):
        loss = objective(model(batch), batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_checkpoint_round_trip_keeps_vocabulary_and_embeddings(store, tmp_path):
    cfg, model, batch = _model_and_batch(store)
    model.eval()
    save_checkpoint(tmp_path, model=model.state_dict(), cfg=cfg, train_state=TrainState(), dims=(0, 0))
    loaded, _ = load_model(tmp_path)
    assert loaded.text_tower.vocabulary == model.text_tower.vocabulary
    texts = ["a red disc", "a blue square on the left"]
    torch.testing.assert_close(loaded.embed_texts(loaded.text_tower.prepare(texts)),
                               model.embed_texts(model.text_tower.prepare(texts)))
    split = store.split("val")
    pixels = loaded.image_tower.prepare(split.images_at(np.arange(3)))
    torch.testing.assert_close(loaded.embed_images(pixels), model.embed_images(pixels))


# --------------------------------------------------------------------------- config and word vectors


def test_config_picks_its_loss_and_cnn_and_refuses_the_rest():
    cfg = load_config(None, ["model.name=single"])
    assert (cfg.loss.name, cfg.model.image_tower) == ("softmax_center", "convnet")
    assert cfg.loss.heads == ("instance", "center")
    assert cfg.model.raw_images  # the data side gives it pixels and words
    assert load_config(None, ["model.name=single", "model.image_tower=efficientnet_lite0"]).model.image_tower == \
        "efficientnet_lite0"
    for bad, match in ((["model.name=single", "loss.name=ranking"], "softmax_center"),
                       (["loss.name=softmax_center"], "single network"),
                       (["model.name=single", "model.text_tower=minilm"], "text_tower"),
                       (["model.name=single", "model.word_dim=10"], "multiple of 3"),
                       (["model.name=single", "loss.instance_weight=1"], "instance_weight"),
                       (["model.name=single", "model.single_inputs=config3"], "single_inputs")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, bad)


def test_minilm_word_vectors_are_short_standardised_and_offline():
    from itmatch.models.word_towers import minilm_word_vectors

    words = ["dog", "puppy", "cat", "car", "truck", "beach", "sand", "water", "man", "woman", "red", "blue",
             "running", "jumps"]
    vectors = minilm_word_vectors(words, 6)
    assert vectors.shape == (14, 6) and torch.isfinite(vectors).all()
    torch.testing.assert_close(vectors.std(0), torch.ones(6), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(minilm_word_vectors(words, 6), vectors)  # deterministic: every rank agrees
    model = build_model(0, 0, load_config(None, [*TINY, "model.word_vectors=minilm"]).model)
    model.text_tower.fit_vocabulary([" ".join(words)])
    order = [model.text_tower.prepare.index[w] for w in sorted(words)]
    torch.testing.assert_close(model.text_tower.lookup.weight[order],
                               minilm_word_vectors(model.text_tower.vocabulary, 6))
