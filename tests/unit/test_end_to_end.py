"""End to end from pixels and words: encoder towers (EfficientNet-lite0, MiniLM from the PyPI
wheels), the raw store, per-step augmentation, the Stage I / Stage II schedule, and the pyfunc
model on raw inputs. A handful of real Flickr8k images, a few steps (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from itmatch.config import load_config
from itmatch.data.batch import make_batch
from itmatch.data.encoders import build_efficientnet_lite0, build_text_encoder
from itmatch.data.raw import RawStore, open_store
from itmatch.models import build_model
from itmatch.optim import TOWERS_GROUP, build_optimizer, build_scheduler, param_groups

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "flickr8k-1k"
E2E = ["model.image_tower=efficientnet_lite0", "model.text_tower=minilm", "model.image_size=64",
       "model.hidden_dim=32", "model.embed_dim=16", "data.batch_size=20"]
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/flickr8k-1k")


@pytest.fixture(scope="module")
def store(flickr8k_raw) -> RawStore:
    return flickr8k_raw  # tests/unit/conftest.py


def _cfg(*extra: str):
    return load_config(None, [*E2E, *extra])


def test_raw_store_keeps_bytes_and_groups(store):
    again = open_store(store.root)
    split = again.split("train")
    assert isinstance(again, RawStore) and len(split.image_ids) == 8 and len(split) == 40
    assert (np.bincount(split.caption_image) == 5).all()
    image = split.images_at(np.array([3]))[0]
    assert image.mode == "RGB" and min(image.size) == 256  # the JPEG as stored (short side 256)


def test_frozen_towers_compute_what_the_featurizers_compute(store):
    """The towers are the featurizers' networks: same weights, pooling, normalisation."""
    model = build_model(0, 0, _cfg("model.image_size=224").model).eval()
    split = store.split("val")
    pil = split.images_at(np.arange(3))
    want = build_efficientnet_lite0().encode(pil)
    got = model.image_tower(model.image_tower.prepare(pil)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    texts = split.captions_at(np.arange(4))
    want = build_text_encoder("minilm").encode(texts)
    got = model.text_tower(model.text_tower.prepare(texts)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_augmentation_replays_from_its_seed_and_evaluation_is_deterministic(store):
    model = build_model(0, 0, _cfg().model)
    split, captions = store.split("train"), np.arange(10)
    prep = (model.image_tower.prepare, model.text_tower.prepare)
    a = make_batch(split, captions, *prep, train=True, rng=np.random.default_rng([0, 1, 0, 2]))
    b = make_batch(split, captions, *prep, train=True, rng=np.random.default_rng([0, 1, 0, 2]))
    c = make_batch(split, captions, *prep, train=True, rng=np.random.default_rng([0, 1, 0, 3]))
    assert a.images.dtype == torch.uint8 and a.images.shape == (2, 3, 64, 64)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    e1 = make_batch(split, captions, *prep).images
    assert torch.equal(e1, make_batch(split, captions, *prep).images)  # no rng, no train: centre crop
    assert torch.equal(a.texts["input_ids"], make_batch(split, captions, *prep).texts["input_ids"])  # words: no augmentation


def test_ray_data_steps_equal_the_local_batches(store):
    """What a Ray Data actor (data.loader=ray) prepares for a planned step -- the augmented images,
    MiniLM's token ids, the group ids -- serialised and decoded, is the in-process loader's batch
    for the same (seed, epoch, rank, step): a run resumed under either loader replays the same steps."""
    from trainers.input_pipeline import _decode, _PrepareSteps

    model = build_model(0, 0, _cfg().model)
    prepare = (model.image_tower.prepare, model.text_tower.prepare)
    steps = _PrepareSteps(str(store.root), "train", prepare, seed=3, epoch=2, rank=1)
    plan = [np.array([0, 1, 2, 7]), np.array([10, 11, 30])]
    out = steps({"step": np.array([0, 4]), "captions": np.array(plan, dtype=object)})
    assert list(out["step"]) == [0, 4]
    split = store.split("train")
    for step, captions, payload in zip((0, 4), plan, out["payload"]):
        got = _decode(payload)
        want = make_batch(split, captions, *prepare, train=True, rng=np.random.default_rng([3, 2, 1, step]))
        for field in ("images", "image_gid", "text_gid", "image_cls", "text_cls"):
            torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=0, msg=field)
        assert got.texts.keys() == want.texts.keys()
        for key in want.texts:
            assert torch.equal(got.texts[key], want.texts[key]), key
        assert got.boxes is None and got.images.dtype == torch.uint8


def test_towers_get_their_lr_factor_and_stage_one_freezes_them():
    cfg = _cfg("optim.lr=1e-3", "optim.tower_lr_factor=0.1", "model.tower_frozen_epochs=1", "optim.scheduler=constant")
    model = build_model(0, 0, cfg.model)
    groups = param_groups(model, cfg.optim)
    assert [g.get("name") for g in groups] == [None, TOWERS_GROUP]
    n_tower = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("image_tower", "text_tower")))
    assert sum(p.numel() for p in groups[1]["params"]) == n_tower > 20_000_000  # MiniLM + EfficientNet
    opt = build_optimizer(groups, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, steps_per_epoch=3, epochs=2, towers_frozen_epochs=1)
    lrs = []
    for _ in range(6):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[:3] == [[1e-3, 0.0]] * 3 and lrs[3:] == [[1e-3, pytest.approx(1e-4)]] * 3
    frozen = build_model(0, 0, _cfg("model.train_image_tower=false").model)
    assert not any(p.requires_grad for p in frozen.image_tower.parameters())
    assert sum(p.numel() for g in param_groups(frozen, cfg.optim) for p in g["params"]) < \
        sum(p.numel() for g in groups for p in g["params"])


def test_stage_one_runs_the_towers_without_gradients(store):
    model = build_model(0, 0, _cfg().model).train()
    split = store.split("train")
    batch = make_batch(split, np.arange(10), model.image_tower.prepare, model.text_tower.prepare)
    model.freeze_towers(True)
    out = model(batch)
    (out["img"].sum() + out["txt"].sum()).backward()
    assert all(p.grad is None for p in model.image_tower.parameters())
    assert any(p.grad is not None for p in model.image.parameters())
    model.freeze_towers(False)
    out = model(batch)
    (out["img"].sum() + out["txt"].sum()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.image_tower.parameters())
    bn = [m for m in model.image_tower.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and not any(m.training for m in bn)  # frozen ImageNet statistics by default


def test_unknown_tower_is_refused_with_choices():
    from itmatch.models.towers import check_tower_names

    with pytest.raises(KeyError, match="choices"):
        check_tower_names(load_config(None, ["model.image_tower=resnet", "model.text_tower=minilm"]).model)
    with pytest.raises(Exception, match="raw captions"):
        load_config(None, ["model.image_tower=efficientnet_lite0"])  # raw images come with raw captions


# --------------------------------------------------------------------------- word-level text towers


@pytest.mark.parametrize("tower", ["textcnn", "gru"])
def test_word_towers_learn_beside_cached_image_features(tower, tmp_path):
    """A word-level text tower on the training split's vocabulary, beside cached image features:
    the vocabulary is fitted from training captions only, travels in the checkpoint, and the
    run's loss falls."""
    from itmatch.data.store import prepare
    from itmatch.state import TrainState, load_model, save_checkpoint
    from trainers.dist import WorkerContext
    from trainers.loop import Trainer

    store = prepare(f"synthetic:{tmp_path / 'shapes'}?n_images=40", cache_dir=tmp_path / "cache", image_encoder="pixels",
                    text_encoder="hashing", splits=["train", "val", "test"], progress=False)
    cfg = load_config(None, ["data.source=x", f"model.text_tower={tower}", "model.hidden_dim=32", "model.embed_dim=16",
                             "model.word_dim=16", "model.text_width=32", "data.batch_size=24", "train.epochs=4",
                             "optim.lr=2e-3"])
    trainer = Trainer(cfg, store, WorkerContext(0, 1, 0, torch.device("cpu")), None)
    vocabulary = trainer.model.text_tower.vocabulary
    train_words = {w for t in store.split("train").texts for w in t.lower().replace(".", " ").split()}
    assert vocabulary and set(vocabulary) <= train_words  # the training split's words only
    trainer.fit(lambda metrics, save: None)
    losses = [h["train_loss"] for h in trainer.state.history]
    assert losses[-1] < losses[0]
    save_checkpoint(tmp_path / "ckpt", model=trainer.strategy.full_state_dict(trainer.model), cfg=cfg,
                    train_state=TrainState(), dims=store.dims)
    loaded, _ = load_model(tmp_path / "ckpt")
    assert loaded.text_tower.vocabulary == vocabulary
    texts = store.split("test").texts[:3]
    torch.testing.assert_close(loaded.embed_texts(loaded.text_tower.prepare(texts)),
                               trainer.model.eval().embed_texts(trainer.model.text_tower.prepare(texts)))


def test_position_shift_moves_the_words_inside_the_fixed_length():
    from itmatch.models.word_towers import WordPrep, build_vocabulary

    vocabulary = build_vocabulary(["a red disc", "a blue square", "a red square"], size=10)
    assert vocabulary[:2] == ["a", "red"] or vocabulary[:2] == ["a", "square"]  # by count, then alphabet
    prep = WordPrep(vocabulary, length=8, shift=True)
    fixed = prep(["a red cat"])
    assert fixed[0, :3].tolist() == [vocabulary.index("a") + 2, vocabulary.index("red") + 2, 1]  # cat: unknown
    shifted = {tuple(prep(["a red cat"], train=True, rng=np.random.default_rng(s))[0].tolist()) for s in range(20)}
    assert len(shifted) > 1 and all(sorted(row, reverse=True)[:3] == sorted(fixed[0].tolist(), reverse=True)[:3]
                                    for row in shifted)
