"""Group-aware, rank-sharded mini-batches of positive (image, caption) pairs.

An epoch visits every caption exactly once. With neighborhood sampling (001 §5.1) each image's
captions are cut into units of 2 (3 for the odd one out), so every image in a batch comes with at
least two of its captions; without it a unit is one caption. Units are shuffled and packed into
global batches of about `batch_size` captions, an image at most once per batch (a second unit of
the same image waits for the next batch). Each global batch is then split by image across ranks,
so a group never straddles workers and every rank gets at least two images in the same number of
steps. Everything is a function of (seed, epoch): resuming needs only (epoch, offset).

Region-phrase data (001 Algorithm 1) groups phrases by their ground-truth region (its coreference
chain: units of two phrases of one region are 3.c.i's neighborhood sampling) but shards by picture
(`shard_by`): a phrase's negative regions are the proposals of its picture, so a picture's phrases
and proposals must stay on one worker, or the global batch would hold them twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

# Images (shards) per rank in every batch: BatchNorm cannot train on a single row (a batch of two
# captions of one image stopped a run after start), and a rank's rows need a negative of their own.
SHARDS_PER_RANK = 2


def shards_per_rank(task: str) -> int:
    """SHARDS_PER_RANK for image-caption data; one picture for region-phrase data, whose picture
    already brings many rows (its proposals) and whose batches must stay as small as they were."""
    return 1 if task == "phrases" else SHARDS_PER_RANK


def _units(caption_image: np.ndarray, rng: np.random.Generator, neighborhood: bool) -> list[np.ndarray]:
    order = np.argsort(caption_image, kind="stable")
    bounds = np.flatnonzero(np.diff(caption_image[order])) + 1
    units: list[np.ndarray] = []
    for captions in np.split(order, bounds):
        captions = rng.permutation(captions)
        if not neighborhood or len(captions) < 2:
            units.extend(captions[:, None])
            continue
        n_units = len(captions) // 2  # units of 2, the last takes the odd caption
        units.extend(np.array_split(captions, n_units))
    return units


def _pack(
    units: list[np.ndarray], caption_image: np.ndarray, batch_size: int, drop_last: bool, min_images: int = 1,
    shard_key: Optional[np.ndarray] = None,
) -> list[np.ndarray]:
    """A batch closes at `batch_size` captions and `min_images` shards (SHARDS_PER_RANK per rank: with
    units of up to 3 captions, `batch_size` captions alone may be too few images to shard). Shards
    are the images unless `shard_key` (per caption) says otherwise."""
    shard_key = caption_image if shard_key is None else shard_key
    batches: list[np.ndarray] = []
    current: list[np.ndarray] = []
    images: set[int] = set()
    shards: set[int] = set()
    size = 0
    waiting: list[np.ndarray] = []
    for unit in units:
        # Units that had to wait (their image was already in the batch) get the first chance.
        queue, waiting = waiting + [unit], []
        for item in queue:
            image = int(caption_image[item[0]])
            if image in images:
                waiting.append(item)
                continue
            current.append(item)
            images.add(image)
            shards.add(int(shard_key[item[0]]))
            size += len(item)
            if size >= batch_size and len(shards) >= min_images:
                batches.append(np.concatenate(current))
                current, images, shards, size = [], set(), set(), 0
    leftover = current + waiting
    if leftover and not drop_last:
        tail = np.concatenate(leftover)
        if batches and len(np.unique(shard_key[tail])) < min_images:
            batches[-1] = np.concatenate([batches[-1], tail])  # too few images to shard: join the last batch
        else:
            batches.append(tail)
    return batches


def _shard(batch: np.ndarray, shard_key: np.ndarray, rank: int, world_size: int,
           per_rank: int = SHARDS_PER_RANK) -> np.ndarray:
    """Split by shard key (the image), largest groups first: the first `per_rank` rounds dealt
    out in snake order (0..W-1, W-1..0), so that every rank gets that many images, the rest each to
    the rank with the fewest captions. Greedy alone can leave a rank one image ([3,1,1,1] over two
    ranks: 3 | 1,1,1), and BatchNorm cannot train on one row."""
    images, inverse, counts = np.unique(shard_key[batch], return_inverse=True, return_counts=True)
    load = np.zeros(world_size, dtype=np.int64)
    owner = np.empty(len(images), dtype=np.int64)
    snake = [r for turn in range(per_rank)
             for r in (range(world_size) if turn % 2 == 0 else reversed(range(world_size)))]
    for i, g in enumerate(np.lexsort((images, -counts))):
        r = snake[i] if i < len(snake) else int(np.argmin(load))
        owner[g] = r
        load[r] += counts[g]
    return batch[owner[inverse] == rank]


@dataclass
class SamplerState:
    epoch: int = 0
    offset: int = 0  # global batches already consumed in this epoch


class NeighborhoodBatchSampler:
    """Yields this rank's caption indices for each global batch."""

    def __init__(
        self,
        caption_image: np.ndarray,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        neighborhood: bool = True,
        drop_last: bool = True,
        shard_by: Optional[np.ndarray] = None,
        shards_per_rank: int = SHARDS_PER_RANK,
    ) -> None:
        """`shard_by`: per caption, what must stay on one worker (default: its image, `caption_image`);
        `shards_per_rank`: how many of those every rank gets in every batch (at least)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.caption_image = np.asarray(caption_image, dtype=np.int64)
        self.shard_key = self.caption_image if shard_by is None else np.asarray(shard_by, dtype=np.int64)
        if self.shard_key.shape != self.caption_image.shape:
            raise ValueError(f"shard_by has shape {self.shard_key.shape}, caption_image {self.caption_image.shape}")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.neighborhood, self.drop_last = seed, neighborhood, drop_last
        self.per_rank = shards_per_rank
        self.state = SamplerState()
        n_images = len(np.unique(self.shard_key))
        if n_images < shards_per_rank * world_size:
            raise ValueError(f"{n_images} images cannot be split over {world_size} workers "
                             f"(at least {shards_per_rank} each)")

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        units = _units(self.caption_image, rng, self.neighborhood)
        order = rng.permutation(len(units))
        least = self.per_rank * self.world_size
        batches = _pack([units[i] for i in order], self.caption_image, self.batch_size, self.drop_last, least,
                        self.shard_key)
        # Too few images would leave a rank idle (DDP needs every rank to step) or one image alone.
        return [b for b in batches if len(np.unique(self.shard_key[b])) >= least]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.state.epoch:
            self.state = SamplerState(epoch, 0)

    def __len__(self) -> int:
        return len(self.global_batches(self.state.epoch))

    def __iter__(self):
        batches = self.global_batches(self.state.epoch)
        while self.state.offset < len(batches):
            batch = batches[self.state.offset]
            self.state.offset += 1
            yield _shard(batch, self.shard_key, self.rank, self.world_size, self.per_rank)

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "offset": self.state.offset, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler checkpoint has seed {state['seed']}, config has {self.seed}")
        self.state = SamplerState(int(state["epoch"]), int(state["offset"]))
