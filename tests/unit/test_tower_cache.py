"""Stage I on cached tower features (model.tower_cache_stage_one): the real Trainer outside Ray on
a handful of Flickr8k images with small real towers (EfficientNet-lite0 at 64 px, MiniLM). Against
the uncached run as the reference: Stage I on the cache trains to the same weights and losses,
Stage II then proceeds identically, the towers do not run in a cached step, a run resumed inside
Stage I or at the boundary replays exactly (flip views drawn per step), and Ray Data is not needed
for cached steps. Two workers, DDP and DeepSpeed: tests/distributed/test_tower_cache_ranks.py."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from itmatch.config import ConfigError, load_config
from itmatch.data.batch import TowerCache
from itmatch.data.raw import RawStore
from trainers.dist import WorkerContext
from trainers.loop import Trainer

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "flickr8k-1k"
PRESET = Path(__file__).resolve().parents[2] / "configs" / "flickr8k_e2e.yaml"
# 8 training images (40 captions): 2-3 steps an epoch; Stage II trains only the towers' last stages
E2E = ["model.image_tower=efficientnet_lite0", "model.text_tower=minilm", "model.image_size=64",
       "model.hidden_dim=32", "model.embed_dim=16", "data.batch_size=20", "data.drop_last=false",
       "model.image_train_last=1", "model.text_train_last=1", "model.tower_frozen_epochs=2", "train.epochs=3",
       "optim.lr=1e-3", "optim.scheduler=constant"]  # constant: a 2-epoch run is the first 2 of 3
CACHE = "model.tower_cache_stage_one=true"
TOL = dict(rtol=1e-4, atol=1e-5)
CPU = WorkerContext(0, 1, 0, torch.device("cpu"))
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/flickr8k-1k")


@pytest.fixture(scope="module")
def store(flickr8k_raw) -> RawStore:
    return flickr8k_raw  # tests/unit/conftest.py


class Run:
    """A Trainer fitted outside Ray, recording each epoch's weights and how often the towers ran in
    each training step (forward hooks)."""

    def __init__(self, store: RawStore, *overrides: str, restore: Path | None = None,
                 save_to: Path | None = None) -> None:
        self.trainer = trainer = Trainer(load_config(None, [*E2E, *overrides]), store, CPU, None)
        if restore is not None:
            trainer.restore(restore)
        self.tower_calls, self.step_calls, self.weights, self.builds = [0], [], {}, 0
        for tower in (trainer.model.image_tower, trainer.model.text_tower):
            tower.register_forward_hook(lambda *_: self.tower_calls.__setitem__(0, self.tower_calls[0] + 1))
        step, build = trainer.train_step, trainer.build_tower_cache

        def counted_step(batch):
            before = self.tower_calls[0]
            out = step(batch)
            self.step_calls.append((trainer.epoch, self.tower_calls[0] - before))
            return out

        def counted_build():
            self.builds += 1
            return build()

        trainer.train_step, trainer.build_tower_cache = counted_step, counted_build

        def report(metrics, save):
            self.weights[int(metrics["epoch"])] = trainer.epoch_weights
            if save_to is not None:
                save(save_to / f"epoch{int(metrics['epoch'])}")

        trainer.fit(report)
        self.history = trainer.state.history

    def calls_in(self, epoch: int) -> list[int]:
        return [calls for e, calls in self.step_calls if e == epoch]


def _assert_same_weights(got: dict, want: dict, **tol) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if torch.is_tensor(value) and value.is_floating_point():
            torch.testing.assert_close(got[key], value, **(tol or TOL), msg=key)


def _losses(history: list[dict]) -> list[float]:
    return [h["train_loss"] for h in history]


@pytest.fixture(scope="module")
def reference(store) -> Run:
    """Without the cache, no augmentation: what the cache must reproduce."""
    return Run(store, "model.augment=false")


@needs_data
def test_stage_one_on_the_cache_trains_as_the_towers_do_then_stage_two_proceeds(store, reference):
    cached = Run(store, "model.augment=false", CACHE)
    for epoch in (1, 2, 3):
        _assert_same_weights(cached.weights[epoch], reference.weights[epoch])
    assert _losses(cached.history) == pytest.approx(_losses(reference.history), rel=1e-4)
    assert [h["val_rsum"] for h in cached.history] == pytest.approx([h["val_rsum"] for h in reference.history])
    # the cache is used: no tower runs in a cached step (both do without it), and Stage II runs them
    assert reference.calls_in(0) and all(calls == 2 for calls in reference.calls_in(0) + reference.calls_in(1))
    assert cached.calls_in(0) and all(calls == 0 for calls in cached.calls_in(0) + cached.calls_in(1))
    assert cached.calls_in(2) and all(calls == 2 for calls in cached.calls_in(2))
    assert cached.builds == 1 and cached.trainer.tower_cache is None  # built once, freed at the boundary


@needs_data
def test_the_cache_under_gradient_caching_is_the_same_stage_one(store, reference):
    """train.grad_cache_chunk: a cached batch skips the towers' chunked passes (Stage II's are
    tests/unit/test_trainer_paths.py's and tests/distributed/'s)."""
    cached = Run(store, "model.augment=false", CACHE, "train.grad_cache_chunk=7", "train.epochs=1")
    assert cached.calls_in(0) and all(calls == 0 for calls in cached.calls_in(0))
    _assert_same_weights(cached.weights[1], reference.weights[1])
    assert _losses(cached.history) == pytest.approx(_losses(reference.history[:1]), rel=1e-4)


@needs_data
def test_a_run_resumed_inside_stage_one_or_at_the_boundary_replays_exactly(store, tmp_path):
    """With augmentation on: the cache keeps each image's flip, drawn per image from the step's
    seed, so the resumed run (which rebuilds the cache) draws the same views."""
    whole = Run(store, CACHE, save_to=tmp_path)
    assert whole.builds == 1
    for start in (1, 2):  # resume inside Stage I (the cache is rebuilt), and at the Stage I/II boundary
        resumed = Run(store, CACHE, restore=tmp_path / f"epoch{start}")
        assert resumed.builds == (1 if start < 2 else 0)
        _assert_same_weights(resumed.weights[3], whole.weights[3], rtol=0, atol=0)
        assert _losses(resumed.history) == _losses(whole.history)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    from itmatch.data.store import prepare

    tmp = tmp_path_factory.mktemp("shapes")
    return prepare(f"synthetic:{tmp / 'shapes'}?n_images=40", cache_dir=tmp / "cache", image_encoder="pixels",
                   text_encoder="hashing", splits=["train", "val", "test"], progress=False)


@pytest.mark.parametrize("model", [["loss.instance_weight=0.5", "loss.center_weight=0.1"],
                                   ["model.name=similarity", "loss.name=logistic"], ["model.name=twoway"]])
def test_every_two_tower_model_trains_on_the_cache(features, model):
    """A text encoder (word-level CNN, position shift off) beside cached image features: the image
    side's table is the identity tower's output, the text side's the CNN's."""
    overrides = ["data.source=x", "data.batch_size=24", "train.epochs=3", "model.hidden_dim=32", "model.embed_dim=16",
                 "model.text_tower=textcnn", "model.word_dim=16", "model.text_width=16", "model.text_blocks=1",
                 "model.position_shift=false", "model.tower_frozen_epochs=2", "optim.lr=1e-3", *model]
    runs = []
    for extra in ([], [CACHE]):
        trainer = Trainer(load_config(None, [*overrides, *extra]), features, CPU, None)
        trainer.fit(lambda metrics, save: None)
        runs.append(trainer)
    plain, cached = (t.strategy.full_state_dict(t.model) for t in runs)
    _assert_same_weights(cached, plain)
    assert _losses(runs[1].state.history) == pytest.approx(_losses(runs[0].state.history), rel=1e-4)


def test_the_cache_draws_each_images_view_from_the_steps_rng():
    split = types.SimpleNamespace(caption_image=np.array([0, 0, 1, 1, 2, 2, 3]), image_ids=np.array([10, 11, 12, 13]),
                                  caption_gid=np.array([10, 10, 11, 11, 12, 12, 13]))
    plain, flipped = torch.arange(8.0).view(4, 2), -torch.arange(8.0).view(4, 2)
    cache = TowerCache(images=[plain, flipped], texts=torch.arange(14.0).view(7, 2))
    captions = np.array([6, 0, 1, 4])
    batch = cache.batch(split, captions, np.random.default_rng([0, 1, 0, 5]))
    assert batch.tower_outputs and batch.image_cls.tolist() == [0, 2, 3] and batch.text_cls.tolist() == [3, 0, 0, 2]
    torch.testing.assert_close(batch.texts, cache.texts[captions])
    flip = np.random.default_rng([0, 1, 0, 5]).random(3) < 0.5  # the same draw, as the step would make it
    torch.testing.assert_close(batch.images, torch.where(torch.from_numpy(flip)[:, None], flipped[[0, 2, 3]],
                                                         plain[[0, 2, 3]]))
    views = {tuple(cache.batch(split, captions, np.random.default_rng(s)).images[:, 1].sign().tolist()) for s in range(20)}
    assert len(views) > 1  # both views are drawn
    one = TowerCache(images=[plain], texts=cache.texts).batch(split, captions, np.random.default_rng(0))
    torch.testing.assert_close(one.images, plain[[0, 2, 3]])


def test_embedding_a_table_pads_to_the_chunks_every_worker_runs():
    """ZeRO-3 gathers weights in every forward, so a worker with fewer rows runs as many chunks as
    the busiest (Passes.chunks); the extra ones repeat the first rows and are dropped."""
    from itmatch.accumulate import Passes, embed_rows

    class Padded(Passes):
        def chunks(self, n: int) -> int:
            return n + 2

    seen = []
    tower = torch.nn.Linear(3, 2).double()  # and float32 rows: cast as training casts them
    tower.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    rows = torch.randn(7, 3)
    plain, flipped = embed_rows(tower, lambda a, b: [rows[a:b], -rows[a:b]], 7, chunk=3, passes=Padded(),
                                dtype=torch.float64)
    assert seen == [3, 3, 3, 3, 1, 1, 3, 3, 3, 3]  # 3 chunks of both views, then 2 padding chunks
    with torch.no_grad():
        torch.testing.assert_close(plain, tower(rows.double()))
        torch.testing.assert_close(flipped, tower(-rows.double()))


@needs_data
def test_the_flip_view_is_the_tower_on_flipped_pixels(store):
    from itmatch.models import build_model
    from itmatch.models.towers import cache_views

    model = build_model(0, 0, load_config(None, E2E).model).eval()
    pil = store.split("train").images_at(np.arange(2))
    plain, flipped = cache_views(model.image_tower.prepare, pil)
    assert torch.equal(flipped, plain.flip(-1))
    assert torch.equal(plain, model.image_tower.prepare(pil, train=True, rng=None))  # the un-augmented crop
    assert len(cache_views(build_model(0, 0, load_config(None, [*E2E, "model.augment=false"]).model)
                           .image_tower.prepare, pil)) == 1


@needs_data
def test_cached_stage_one_needs_no_ray_data(store, monkeypatch):
    """data.loader=ray prepares Stage II's batches; Stage I's cached steps are cut in the worker."""
    def refuse(*args, **kwargs):
        raise AssertionError("Ray Data used in a cached Stage I epoch")

    monkeypatch.setitem(sys.modules, "trainers.input_pipeline", types.SimpleNamespace(ray_batches=refuse))
    run = Run(store, CACHE, "data.loader=ray", "train.epochs=1")
    assert run.calls_in(0) and run.history[0]["train_loss"] > 0


def test_the_cache_is_refused_where_it_cannot_apply():
    with pytest.raises(ConfigError, match="nothing to cache"):
        load_config(None, [CACHE])  # cached features: identity towers
    with pytest.raises(ConfigError, match="model.name='single'"):
        load_config(None, ["model.name=single", CACHE])
    assert load_config(None, ["model.text_tower=textcnn", CACHE]).model.tower_cache_stage_one  # a text encoder
    assert load_config(PRESET, []).model.tower_cache_stage_one  # the end-to-end preset runs Stage I on it
