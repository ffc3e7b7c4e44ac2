"""Phrase localization as a task of the same system (no Ray): the region-phrase store (crops through
the image encoder, phrases through the text encoder, cached), 001 Algorithm 1's batches against a
brute-force loop, the pair sampling and the evaluation against loops, the config's task rules, and
a short local training run of both networks reaching phrase R@1 far above a random ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itmatch.config import ConfigError, load_config
from itmatch.data.batch import make_batch
from itmatch.data.batching import NeighborhoodBatchSampler, shards_per_rank
from itmatch.data.encoders import build_image_encoder
from itmatch.data.phrase_batch import phrase_batch, region_negatives
from itmatch.data.phrase_store import PhraseSplit, PhraseStore, RawPhraseSplit, pixel_box
from itmatch.data.raw import open_store, prepare_inputs
from itmatch.data.sources import DataError
from itmatch.eval.evaluate import embed_split, evaluate_split
from itmatch.eval.phrases import proposal_scores
from itmatch.losses import LOCAL
from itmatch.losses.logistic import sample_pairs
from itmatch.losses.phrases import pair_negatives, ranking_negatives
from itmatch.models import build_model
from itmatch.phrases.entities import read_entities

N_IMAGES = 80


def iou_loop(a, b) -> float:
    """IoU of two 0-based exclusive boxes, one pair at a time (the reference)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    area = lambda x: max(x[2] - x[0], 0) * max(x[3] - x[1], 0)  # noqa: E731
    return w * h / (area(a) + area(b) - w * h)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("phrases")


@pytest.fixture(scope="module")
def source(tmp) -> str:
    return f"shapes-phrases:{tmp / 'shapes'}?n_images={N_IMAGES}&seed=1"


@pytest.fixture(scope="module")
def store(tmp, source) -> PhraseStore:
    return prepare_inputs(source, cache_dir=tmp / "cache", raw_images=False, image_encoder="pixels",
                          text_encoder="hashing", splits=["train", "val", "test"])


def _features(items, *, train=False, rng=None):
    return torch.from_numpy(np.ascontiguousarray(items))


# --------------------------------------------------------------------------- the store


def test_store_holds_every_region_and_phrase_with_crop_features(tmp, store, source):
    corpus = read_entities(tmp / "shapes")
    again = prepare_inputs(source, cache_dir=tmp / "cache", raw_images=False, image_encoder="pixels",
                           text_encoder="hashing", splits=["train"])
    assert again.root == store.root and isinstance(open_store(store.root), PhraseStore)  # cached, reopened
    split = store.split("test")
    part = corpus.split("test")
    assert isinstance(split, PhraseSplit) and len(split) == part.phrases.num_rows
    assert len(split.image_ids) == part.regions.num_rows + part.proposals.num_rows
    gid = split.image_ids
    assert len(np.unique(gid)) == len(gid)  # one group per region: chains >= 0, proposals unique < 0
    # a phrase's positive "image" is its chain's ground-truth region, whose box is the phrase's box
    np.testing.assert_array_equal(split.caption_gid, part.phrases.column("region_id").to_numpy())
    np.testing.assert_array_equal(split.region_box[split.caption_image], split.phrase_box)
    np.testing.assert_array_equal(split.region_picture[split.caption_image], split.phrase_picture)
    # every proposal row of a picture is listed once in its padded row
    listed = split.proposal_rows[split.proposal_rows >= 0]
    assert sorted(listed.tolist()) == np.flatnonzero(gid < 0).tolist()
    assert (split.region_picture[split.proposal_rows[split.proposal_rows >= 0]]
            == np.nonzero(split.proposal_rows >= 0)[0]).all()
    # region features are the image encoder on the region's crop
    from PIL import Image

    paths = dict(zip(part.images.column("image_id").to_pylist(), part.images.column("path").to_pylist()))
    for row in (0, int(split.proposal_rows[1, 3]), len(gid) - 1):
        image = Image.open(paths[int(split.picture_ids[split.region_picture[row]])]).convert("RGB")
        want = build_image_encoder("pixels").encode([image.crop(pixel_box(split.region_box[row], *image.size))])
        np.testing.assert_allclose(split.image_feats[row], want[0], rtol=1e-6)
    groups, shards = store.caption_groups("train")
    train = store.split("train")
    np.testing.assert_array_equal(groups, train.caption_gid)
    np.testing.assert_array_equal(shards, train.picture_ids[train.caption_shard])


@pytest.fixture(scope="module")
def raw_store(tmp, source) -> PhraseStore:
    """The same source for encoder towers: pictures and phrase texts, cropped per batch."""
    return prepare_inputs(source, cache_dir=tmp / "cache", raw_images=True, image_encoder="pixels",
                          text_encoder="hashing", splits=["train", "val", "test"])


def _numpy_crop(path, box) -> np.ndarray:
    """The reference crop: the picture's pixel array sliced at the box rounded outwards."""
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("RGB"))
    height, width = pixels.shape[:2]
    x1, y1 = (min(max(int(np.floor(v)), 0), side - 1) for v, side in zip(box[:2], (width, height)))
    x2, y2 = (max(min(int(np.ceil(v)), side), lo + 1) for v, side, lo in zip(box[2:], (width, height), (x1, y1)))
    return pixels[y1:y2, x1:x2]


def test_raw_store_hands_the_towers_crops_and_phrase_texts(tmp, store, raw_store):
    """The raw store runs no encoder; its split has the feature split's regions, phrases and
    geometry, and its items are the regions' crops of the picture files and the phrases' text."""
    assert raw_store.raw and raw_store.dims == (0, 0) and raw_store.root != store.root
    assert raw_store.manifest["image_encoder"] == "pixels (raw crops)"
    assert isinstance(open_store(raw_store.root).split("test"), RawPhraseSplit)
    corpus = read_entities(tmp / "shapes")
    paths = dict(zip(corpus.images.column("image_id").to_pylist(), corpus.images.column("path").to_pylist()))
    for name in ("train", "test"):
        raw, feats = raw_store.split(name), store.split(name)
        for field in ("image_ids", "caption_ids", "caption_image", "picture_ids", "region_picture", "region_box",
                      "proposal_rows", "phrase_picture", "phrase_box", "phrase_caption"):
            np.testing.assert_array_equal(getattr(raw, field), getattr(feats, field), err_msg=field)
        rows = np.r_[0, raw.proposal_rows[1, :4], raw.caption_image[5], len(raw.image_ids) - 1]
        for row, crop in zip(rows, raw.images_at(rows)):
            want = _numpy_crop(paths[int(raw.picture_ids[raw.region_picture[row]])], raw.region_box[row])
            np.testing.assert_array_equal(np.asarray(crop), want)
        assert raw.captions_at(np.array([3, 0])) == [feats.texts[3], feats.texts[0]]


def test_raw_store_refuses_an_undecodable_picture_by_name(tmp, store):
    import shutil

    root = tmp / "bad-picture"
    shutil.copytree(tmp / "shapes", root)
    bad = sorted((root / "images").iterdir())[2]
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"cannot be decoded, first {bad}"):
        prepare_inputs(f"entities:{root}", cache_dir=tmp / "cache", raw_images=True, image_encoder="pixels",
                       text_encoder="hashing", splits=["train", "val", "test"])


def test_ray_data_steps_equal_the_local_batches(raw_store):
    """What a Ray Data actor prepares for a planned step (decoded, augmented crops, token ids,
    Algorithm 1's rows, the boxes), serialised and decoded, is the in-process loader's batch."""
    from trainers.input_pipeline import _decode, _PrepareSteps

    cfg = load_config(None, [f"data.source={raw_store.manifest['source']}", "model.image_tower=convnet",
                             "model.image_size=32", "model.text_tower=textcnn", "data.augment_positives=2"])
    model = build_model(0, 0, cfg.model)
    split = raw_store.split("train")
    model.text_tower.fit_vocabulary(split.texts)
    prepare = (model.image_tower.prepare, model.text_tower.prepare)
    steps = _PrepareSteps(str(raw_store.root), "train", prepare, seed=3, epoch=1, rank=0, data=cfg.data)
    plan = [np.array([0, 1, 2, 7]), np.array([10, 11])]
    out = steps({"step": np.array([0, 5]), "captions": np.array(plan, dtype=object)})
    for step, captions, payload in zip((0, 5), plan, out["payload"]):
        got = _decode(payload)
        want = make_batch(split, captions, *prepare, train=True, rng=np.random.default_rng([3, 1, 0, step]),
                          data=cfg.data)
        for field in ("images", "texts", "image_gid", "text_gid", "image_cls", "text_cls"):
            torch.testing.assert_close(getattr(got, field), getattr(want, field), msg=field)
        for field in ("image_picture", "image_box", "text_picture", "text_box"):
            torch.testing.assert_close(getattr(got.boxes, field), getattr(want.boxes, field), msg=field)
        assert len(got.images) > len(captions)  # ground truths, positives and the pictures' negatives


def test_pixel_box_is_at_least_one_pixel_inside_the_image():
    assert pixel_box(np.array([2.4, 3.0, 9.2, 7.0]), 64, 48) == (2, 3, 10, 7)
    assert pixel_box(np.array([-5.0, -5.0, 100.0, 100.0]), 64, 48) == (0, 0, 64, 48)
    assert pixel_box(np.array([64.0, 10.0, 64.0, 10.0]), 64, 48) == (63, 10, 64, 11)


@pytest.mark.parametrize("text, needle", [
    ("shapes-phrases:{tmp}/x?n_images=many", "n_images='many' is not an integer"),
    ("shapes-phrases:{tmp}/x?colour=red", "unknown option 'colour'"),
    ("entities:{tmp}/nothing", "missing folder Sentences/"),
    ("entities:{tmp}/shapes?proposals={tmp}/none.parquet", "none.parquet: proposals file does not exist"),
])
def test_bad_sources_name_the_source_and_value(tmp, store, text, needle):
    with pytest.raises(DataError, match=needle.replace("?", r"\?").replace(".", r"\.")):
        prepare_inputs(text.format(tmp=tmp), cache_dir=tmp / "cache", raw_images=False, image_encoder="pixels",
                       text_encoder="hashing", splits=["train"])


def test_entities_without_proposals_or_images_is_refused(tmp, store):
    import shutil

    root = tmp / "no-proposals"
    shutil.copytree(tmp / "shapes", root, ignore=shutil.ignore_patterns("proposals.parquet", "images"))
    with pytest.raises(DataError, match="no region proposals"):
        prepare_inputs(f"entities:{root}", cache_dir=tmp / "cache", raw_images=False, image_encoder="pixels",
                       text_encoder="hashing", splits=["train"])
    with pytest.raises(DataError, match="no image folder"):
        prepare_inputs(f"entities:{root}?proposals={tmp / 'shapes' / 'proposals.parquet'}", cache_dir=tmp / "cache",
                       raw_images=False, image_encoder="pixels", text_encoder="hashing", splits=["train"])


# --------------------------------------------------------------------------- Algorithm 1's batch


def _expected_rows(split: PhraseSplit, phrases: np.ndarray, all_positives: bool) -> set[tuple[int, int]]:
    """(region row, group id) of the batch, by loops over the batch's pictures' regions."""
    rows = {(int(split.caption_image[p]), int(split.caption_gid[p])) for p in phrases}
    for r in range(len(split.image_ids)):
        if split.image_ids[r] >= 0:  # ground truths enter through their phrases only
            continue
        for p in phrases:
            if split.region_picture[r] != split.phrase_picture[p]:
                continue
            iou = iou_loop(split.phrase_box[p], split.region_box[r])
            if iou < 0.3:
                rows.add((r, int(split.image_ids[r])))
            if iou >= 0.7 and all_positives:
                rows.add((r, int(split.caption_gid[p])))
    return rows


def _batch_rows(batch) -> set[tuple[int, int]]:
    pairs = list(zip(batch.image_cls.tolist(), batch.image_gid.tolist()))
    assert len(pairs) == len(set(pairs))  # no row twice with one group
    return set(pairs)


def _sampled(split: PhraseSplit, world: int, seed: int = 0) -> list[list[np.ndarray]]:
    """Each global batch of epoch 0 as the ranks' shares."""
    samplers = [NeighborhoodBatchSampler(split.caption_image, 30, rank=r, world_size=world, seed=seed,
                                         shard_by=split.caption_shard, shards_per_rank=shards_per_rank("phrases"))
                for r in range(world)]
    return [list(shares) for shares in zip(*samplers)]


def test_batches_match_a_brute_force_loop(store):
    split = store.split("train")
    for shares in _sampled(split, world=1)[:3]:
        phrases = shares[0]
        every = phrase_batch(split, phrases, _features, _features, augment=None)
        assert _batch_rows(every) == _expected_rows(split, phrases, all_positives=True)
        plain = phrase_batch(split, phrases, _features, _features, augment=0)
        assert _batch_rows(plain) == _expected_rows(split, phrases, all_positives=False)
        one = phrase_batch(split, phrases, _features, _features, augment=1, rng=np.random.default_rng(3))
        extra = _batch_rows(one) - _batch_rows(plain)
        allowed = _batch_rows(every) - _batch_rows(plain)
        assert extra <= allowed and extra  # random positives with IoU >= 0.7, drawn from the allowed ones
        chains = {g for _, g in allowed}
        assert {g for _, g in extra} == chains  # each phrase that has one gets one
        torch.testing.assert_close(every.texts, torch.from_numpy(split.caption_feats[phrases]))
        torch.testing.assert_close(every.images, torch.from_numpy(split.image_feats[every.image_cls.numpy()]))
        assert every.text_gid.tolist() == split.caption_gid[phrases].tolist()


def test_negative_masks_match_a_brute_force_loop(store):
    split = store.split("train")
    phrases = _sampled(split, world=1)[1][0]
    batch = phrase_batch(split, phrases, _features, _features, augment=1)
    mask = pair_negatives(batch)
    assert torch.equal(ranking_negatives(batch, LOCAL)["t2i"], mask)
    rows = batch.image_cls.tolist()
    for t, p in enumerate(phrases):
        for c, r in enumerate(rows):
            want = split.region_picture[r] == split.phrase_picture[p] and \
                iou_loop(split.phrase_box[p], split.region_box[r]) < 0.3
            assert bool(mask[t, c]) == want, (p, r)
    assert mask.any(dim=1).all()  # every phrase has negatives
    generic = make_batch(store.split("val"), np.arange(4), _features, _features)
    assert generic.boxes is not None  # make_batch on a PhraseSplit builds Algorithm 1's batch


def test_workers_share_whole_pictures_and_together_hold_the_one_process_batch(store):
    """Sharded by picture, the ranks' batches are the one-process batch of the global batch, split."""
    split = store.split("train")
    for one, two in zip(_sampled(split, world=1)[:3], _sampled(split, world=2)[:3]):
        pictures = [set(split.phrase_picture[s].tolist()) for s in two]
        assert pictures[0] and pictures[1] and not pictures[0] & pictures[1]
        assert sorted(np.concatenate(two).tolist()) == sorted(one[0].tolist())
        parts = [_batch_rows(phrase_batch(split, s, _features, _features, augment=None)) for s in two]
        assert parts[0] | parts[1] == _batch_rows(phrase_batch(split, one[0], _features, _features, augment=None))


def test_region_negatives_equal_numpy_iou():
    g = torch.Generator().manual_seed(0)
    lo = torch.rand(20, 2, generator=g) * 40
    boxes = torch.cat([lo, lo + 1 + torch.rand(20, 2, generator=g) * 20], dim=1)
    picture = torch.randint(0, 2, (20,), generator=g)
    mask = region_negatives(picture[:6], boxes[:6], picture, boxes)
    for t in range(6):
        for r in range(20):
            want = bool(picture[t] == picture[r]) and iou_loop(boxes[t].tolist(), boxes[r].tolist()) < 0.3
            assert bool(mask[t, r]) == want


def test_similarity_pairs_are_every_positive_with_a_negative_of_its_picture(store):
    split = store.split("train")
    phrases = _sampled(split, world=1)[0][0]
    batch = phrase_batch(split, phrases, _features, _features, augment=None)
    allowed = pair_negatives(batch)
    image_rows, text_rows, labels = sample_pairs(batch.image_gid, batch.text_gid, torch.Generator().manual_seed(0),
                                                 negatives=allowed)
    pos = {(int(i), int(t)) for i, t, z in zip(image_rows, text_rows, labels) if z == 1}
    want = {(i, t) for t in range(len(phrases)) for i in range(len(batch.image_gid))
            if batch.image_gid[i] == batch.text_gid[t]}
    assert pos == want and len(pos) > len(phrases)  # ground truths and every augmented positive
    negatives = [(int(i), int(t)) for i, t, z in zip(image_rows, text_rows, labels) if z == 0]
    assert len(negatives) == len(pos)  # balanced, 001 §3.3
    assert all(allowed[t, i] for i, t in negatives)


# --------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("name", ["embedding", "similarity"])
def test_proposal_scores_match_a_per_phrase_loop(store, source, name):
    overrides = [f"data.source={source}", "model.hidden_dim=16", "model.embed_dim=8", f"model.name={name}"]
    cfg = load_config(None, overrides + (["loss.name=logistic"] if name == "similarity" else []))
    torch.manual_seed(0)
    model = build_model(*store.dims, cfg.model).eval()
    split = store.split("val")
    regions, phrases = embed_split(model, split)
    scores = proposal_scores(model, regions, phrases, split.proposal_rows, split.phrase_picture)
    for n in range(0, len(split), 7):
        for slot, row in enumerate(split.proposal_rows[split.phrase_picture[n]]):
            if row < 0:
                continue
            pair = (regions[row], phrases[n])
            with torch.no_grad():
                want = model.pair_scores(*pair) if name == "similarity" else pair[0] @ pair[1]
            assert float(scores[n, slot]) == pytest.approx(float(want), abs=1e-5)
    metrics = evaluate_split(model, split)
    assert set(metrics) == {"phrase_r1", "phrase_r5", "phrase_r10", "phrase_upper", "phrase_random_r1"}


# --------------------------------------------------------------------------- config


def test_the_source_picks_the_task_and_its_defaults(source):
    cfg = load_config(None, [f"data.source={source}"])
    assert cfg.data.task == "phrases" and cfg.train.metric == "phrase_r1"
    assert cfg.tracking.registered_model == "itmatch-phrases"
    cfg = load_config(None, [f"data.source={source}", "train.metric=phrase_r5", "tracking.registered_model=mine"])
    assert (cfg.train.metric, cfg.tracking.registered_model) == ("phrase_r5", "mine")
    default = load_config(None, [])
    assert default.data.task == "retrieval" and default.train.metric == "rsum"


@pytest.mark.parametrize("extra, needle", [
    (["train.metric=rsum"], "train.metric='rsum'"),
    (["model.name=twoway"], "model.name='twoway'"),
    (["loss.name=infonce"], "loss.name='infonce'"),
    (["model.image_tower=convnet", "model.text_tower=textcnn", "model.tower_frozen_epochs=1",
      "model.tower_cache_stage_one=true"], "model.tower_cache_stage_one"),
    (["data.featurize=ray"], "data.featurize=ray"),
    (["loss.instance_weight=1"], "loss.instance_weight"),
])
def test_what_does_not_apply_to_phrases_is_refused_by_name(source, extra, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [f"data.source={source}", *extra])


def test_phrase_metrics_need_phrase_data():
    with pytest.raises(ConfigError, match="train.metric='phrase_r1' needs phrase localization data"):
        load_config(None, ["train.metric=phrase_r1"])


# --------------------------------------------------------------------------- training


@pytest.fixture
def one_thread():
    """Small matrices: one thread is fastest, and spinning OpenMP threads on shared cores are slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["embedding", "similarity"])
def test_local_training_localizes_phrases_far_above_random(store, source, name, one_thread):
    from trainers.dist import WorkerContext
    from trainers.loop import Trainer

    overrides = [f"data.source={source}", "data.batch_size=40", "train.epochs=6", "model.hidden_dim=128",
                 "model.embed_dim=32", "model.dropout=0", "optim.lr=2e-3", "loss.top_k=30", "loss.lambda2=4",
                 "data.augment_positives=1"]
    if name == "similarity":
        overrides += ["model.name=similarity", "loss.name=logistic"]
    trainer = Trainer(load_config(None, overrides), store, WorkerContext(0, 1, 0, torch.device("cpu")), None)
    trainer.fit(lambda metrics, save: None)
    history = trainer.state.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    best = max(h["val_phrase_r1"] for h in history)
    assert best > history[0]["val_phrase_random_r1"] + 40, history
    test = evaluate_split(trainer.eval_model, store.split("test"))
    assert test["phrase_r1"] > test["phrase_random_r1"] + 30 and test["phrase_upper"] == 100.0


def test_towers_trained_on_the_crops_localize_phrases_far_above_random(raw_store, one_thread):
    """End to end: a small CNN on the region crops and the text CNN on the phrases, both from
    scratch, trained by Algorithm 1's batches (issue 15: region features from a trained image tower)."""
    from trainers.dist import WorkerContext
    from trainers.loop import Trainer

    overrides = [f"data.source={raw_store.manifest['source']}", "data.batch_size=40", "train.epochs=3",
                 "model.hidden_dim=128", "model.embed_dim=32", "model.dropout=0", "optim.lr=2e-3", "loss.top_k=30",
                 "loss.lambda2=4", "model.image_tower=convnet", "model.cnn_width=16", "model.image_size=32",
                 "model.text_tower=textcnn", "optim.tower_lr_factor=1"]
    trainer = Trainer(load_config(None, overrides), raw_store, WorkerContext(0, 1, 0, torch.device("cpu")), None)
    before = {n: p.detach().clone() for n, p in trainer.model.image_tower.named_parameters()}
    trainer.fit(lambda metrics, save: None)
    after = dict(trainer.model.image_tower.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the image tower itself learned
    history = trainer.state.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    test = evaluate_split(trainer.eval_model, raw_store.split("test"))
    assert test["phrase_r1"] > test["phrase_random_r1"] + 25, (history, test)


def test_a_union_of_splits_is_refused_for_region_phrase_data_in_one_line(store):
    """data.train_split=train+val (search.refit) is for image-caption stores; a phrase store names
    the split and says so, from the sampler's groups as from the split itself."""
    for read in (store.split, store.caption_groups):
        with pytest.raises(DataError, match=r"split 'train\+val': unions of splits are for image-caption data"):
            read("train+val")
    with pytest.raises(DataError, match="split 'nope' not found"):
        store.caption_groups("nope")
