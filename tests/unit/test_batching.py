"""NeighborhoodBatchSampler: invariants checked by plain counting over every batch of an epoch."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from itmatch.data.batching import NeighborhoodBatchSampler


def random_dataset(seed: int, n_images: int = 50, max_caps: int = 7) -> np.ndarray:
    """caption -> image, 1..max_caps captions per image, captions in a shuffled order."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, max_caps + 1, size=n_images)
    counts[:3] = (1, 2, 3)  # always some singletons, pairs and odd groups
    caption_image = np.repeat(np.arange(n_images), counts)
    return rng.permutation(caption_image)


def samplers(caption_image, batch_size, world_size, **kw) -> list[NeighborhoodBatchSampler]:
    return [NeighborhoodBatchSampler(caption_image, batch_size, rank=r, world_size=world_size, **kw)
            for r in range(world_size)]


def epoch_shards(caption_image, batch_size, world_size, epoch=0, **kw) -> list[list[np.ndarray]]:
    """[step][rank] -> caption indices, iterating every rank's sampler through one epoch."""
    ranks = samplers(caption_image, batch_size, world_size, **kw)
    per_rank = []
    for s in ranks:
        s.set_epoch(epoch)
        per_rank.append([np.asarray(b) for b in s])
    lengths = {len(b) for b in per_rank}
    assert len(lengths) == 1, f"ranks yield different numbers of batches: {[len(b) for b in per_rank]}"
    assert len(per_rank[0]) == len(ranks[0])
    return [list(step) for step in zip(*per_rank)]


CASES = list(itertools.product([0, 1, 2], [1, 2, 3], [6, 16, 37]))  # seed, world_size, batch_size


@pytest.mark.parametrize("seed, world_size, batch_size", CASES)
@pytest.mark.parametrize("drop_last", [False, True])
def test_neighborhood_invariants(seed, world_size, batch_size, drop_last):
    caption_image = random_dataset(seed)
    n_caps = Counter(caption_image.tolist())
    steps = epoch_shards(caption_image, batch_size, world_size, seed=seed, neighborhood=True, drop_last=drop_last)
    assert steps, "no batches at all"
    seen: Counter = Counter()
    for i, shards in enumerate(steps):
        # shards: disjoint, non-empty, an image's batch captions all on one rank
        owner: dict[int, int] = {}
        for rank, shard in enumerate(shards):
            assert len(shard) > 0, f"step {i}: rank {rank} got nothing"
            # BatchNorm trains on at least two rows: two images on every rank
            assert len(set(caption_image[shard].tolist())) >= 2, f"step {i}: rank {rank} has one image"
            assert shard.dtype.kind == "i"
            for c in shard.tolist():
                image = int(caption_image[c])
                assert owner.setdefault(image, rank) == rank, f"step {i}: image {image} on two ranks"
        batch = np.concatenate(shards)
        assert len(set(batch.tolist())) == len(batch), f"step {i}: a caption twice in one batch"
        seen.update(batch.tolist())
        # neighborhood sampling: an image with >= 2 captions never comes alone
        in_batch = Counter(caption_image[batch].tolist())
        for image, k in in_batch.items():
            if n_caps[image] >= 2:
                assert k >= 2, f"step {i}: image {image} ({n_caps[image]} captions) with only {k}"
        if i < len(steps) - 1 or drop_last:
            assert len(batch) >= batch_size, f"step {i}: {len(batch)} < batch_size {batch_size}"
    assert max(seen.values()) == 1, "a caption appears twice in an epoch"
    assert all(0 <= c < len(caption_image) for c in seen)
    if drop_last:
        # only the unfinished tail is dropped: captions of fewer than batch_size images
        dropped = set(range(len(caption_image))) - set(seen)
        assert len({int(caption_image[c]) for c in dropped}) < batch_size
    else:
        assert sorted(seen) == list(range(len(caption_image))), (
            f"{len(caption_image) - len(seen)} captions never visited with drop_last=False"
        )


@pytest.mark.parametrize("seed, world_size, batch_size", CASES[::2])
def test_without_neighborhood(seed, world_size, batch_size):
    caption_image = random_dataset(seed)
    steps = epoch_shards(caption_image, batch_size, world_size, seed=seed, neighborhood=False, drop_last=False)
    seen: Counter = Counter()
    singletons = 0
    n_caps = Counter(caption_image.tolist())
    for i, shards in enumerate(steps):
        assert all(len(s) > 0 for s in shards)
        owner: dict[int, int] = {}
        for rank, shard in enumerate(shards):
            for image in caption_image[shard].tolist():
                assert owner.setdefault(image, rank) == rank
        batch = np.concatenate(shards)
        seen.update(batch.tolist())
        if i < len(steps) - 1:
            assert len(batch) >= batch_size
        singletons += sum(1 for image, k in Counter(caption_image[batch].tolist()).items()
                          if k == 1 and n_caps[image] >= 2)
    assert sorted(seen) == list(range(len(caption_image)))
    assert singletons > 0, "without neighborhood sampling some multi-caption image should come alone"


def test_neighborhood_units_are_shuffled_within_images():
    # each image's captions are cut into different pairs in different epochs
    caption_image = np.repeat(np.arange(20), 6)
    pairs = []
    for epoch in range(2):
        steps = epoch_shards(caption_image, 12, 1, epoch=epoch, neighborhood=True, drop_last=False)
        together = set()
        for (batch,) in steps:
            for image in set(caption_image[batch].tolist()):
                together.add(tuple(sorted(batch[caption_image[batch] == image].tolist())))
        pairs.append(together)
    assert pairs[0] != pairs[1]


def test_determinism_and_epochs():
    caption_image = random_dataset(5)
    a = epoch_shards(caption_image, 16, 2, epoch=3, seed=7)
    b = epoch_shards(caption_image, 16, 2, epoch=3, seed=7)
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        for x, y in zip(sa, sb):
            np.testing.assert_array_equal(x, y)
    c = epoch_shards(caption_image, 16, 2, epoch=4, seed=7)
    d = epoch_shards(caption_image, 16, 2, epoch=3, seed=8)
    flat = lambda steps: np.concatenate([np.concatenate(s) for s in steps]).tolist()  # noqa: E731
    assert flat(c) != flat(a)
    assert flat(d) != flat(a)
    # the global batches do not depend on world size or rank: only their split does
    one = epoch_shards(caption_image, 16, 1, epoch=3, seed=7)
    assert [sorted(np.concatenate(s).tolist()) for s in one] == [sorted(np.concatenate(s).tolist()) for s in a]


@pytest.mark.parametrize("world_size", [1, 3])
def test_resume(world_size):
    caption_image = random_dataset(11)
    k = 3
    full = [s for s in epoch_shards(caption_image, 16, world_size, epoch=2, seed=4)]
    assert len(full) > k + 1
    for rank in range(world_size):
        sampler = NeighborhoodBatchSampler(caption_image, 16, rank=rank, world_size=world_size, seed=4)
        sampler.set_epoch(2)
        it = iter(sampler)
        consumed = [next(it) for _ in range(k)]
        state = sampler.state_dict()
        assert state == {"epoch": 2, "offset": k, "seed": 4}
        for got, want in zip(consumed, full[:k]):
            np.testing.assert_array_equal(got, want[rank])

        resumed = NeighborhoodBatchSampler(caption_image, 16, rank=rank, world_size=world_size, seed=4)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # the trainer calls set_epoch with the same epoch: the offset survives
        rest = list(resumed)
        assert len(rest) == len(full) - k
        for got, want in zip(rest, full[k:]):
            np.testing.assert_array_equal(got, want[rank])
        assert resumed.state_dict() == {"epoch": 2, "offset": len(full), "seed": 4}
        assert list(resumed) == []  # the epoch is done

        # a new epoch starts from its first batch
        resumed.set_epoch(3)
        assert resumed.state_dict()["offset"] == 0
        next_epoch = list(resumed)
        expected = epoch_shards(caption_image, 16, world_size, epoch=3, seed=4)
        assert len(next_epoch) == len(expected)
        np.testing.assert_array_equal(next_epoch[0], expected[0][rank])


def test_resume_seed_mismatch():
    caption_image = random_dataset(0)
    sampler = NeighborhoodBatchSampler(caption_image, 16, seed=1)
    state = sampler.state_dict()
    with pytest.raises(ValueError, match="seed"):
        NeighborhoodBatchSampler(caption_image, 16, seed=2).load_state_dict(state)


@pytest.mark.parametrize("batch_size", [2, 3])
def test_small_batches_hold_two_images_per_rank(batch_size):
    """Batches of 2-3 captions would be one image (units of 2-3 captions of one image); and greedy
    splitting of groups [3, 1, 1, 1] over two ranks leaves one rank a single image."""
    caption_image = np.repeat(np.arange(12), 5)
    for world_size in (1, 2):
        for shards in epoch_shards(caption_image, batch_size, world_size, drop_last=False):
            assert all(len(set(caption_image[s].tolist())) >= 2 for s in shards), shards
    uneven = np.array([0, 0, 0, 1, 2, 3])  # captions of image 0 always come together (one unit of 3)
    for shards in epoch_shards(uneven, 6, 2, drop_last=False):
        assert sorted(len(set(uneven[s].tolist())) for s in shards) == [2, 2], shards


def test_bad_rank_and_too_few_images():
    with pytest.raises(ValueError, match="rank"):
        NeighborhoodBatchSampler(np.arange(10), 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="images"):
        NeighborhoodBatchSampler(np.zeros(10, np.int64), 4, rank=0, world_size=2)
    with pytest.raises(ValueError, match="at least 2 each"):  # 3 images: one worker would hold one
        NeighborhoodBatchSampler(np.arange(3), 2, rank=0, world_size=2)
