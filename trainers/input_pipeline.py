"""The training input pipeline on Ray Data (`data.loader=ray`).

Each worker plans its epoch exactly as the in-process loader does: the group-aware sampler fixes,
for every step, which captions (and so which images) this rank trains on, with neighborhood
sampling over the global batch, and the augmentation of a step is drawn from (seed, epoch, rank,
step). Ray Data then does the work: one row per step goes through a pool of actors that open the
store once, decode and augment the images and tokenise the captions (the towers' own small,
picklable preparers), and the worker iterates the results with prefetching while it trains. The
batches are identical to the in-process loader's (tested), so a resumed run replays the same
batches, whichever loader it uses. On a cluster the actors run wherever Ray places them; the
store folder (data.cache_dir) must be on shared storage, as for training.

Why not `get_dataset_shard`: Ray Train's split hands each worker an arbitrary share of rows,
which cannot keep an image's captions together in one global batch or make every global batch
satisfy neighborhood sampling; planning the steps in the worker keeps both.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from itmatch.config import DataConfig
from itmatch.data.batch import Batch, Boxes, Prepare, make_batch

log = logging.getLogger("itmatch.data")
_FIELDS = ("images", "texts", "image_gid", "text_gid", "image_cls", "text_cls")


class _PrepareSteps:
    """A Ray Data actor: opens the split once, then turns planned steps into serialized batches."""

    def __init__(self, store: str, split: str, prepare: tuple[Prepare, Prepare], seed: int, epoch: int,
                 rank: int, data: Optional[DataConfig] = None) -> None:
        from itmatch.data.raw import open_store

        torch.set_num_threads(1)  # parallelism comes from the actor pool
        self.split, self.prepare, self.data = open_store(store).split(split), prepare, data
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        payloads = []
        for step, captions in zip(rows["step"], rows["captions"]):
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, int(step)])
            batch = make_batch(self.split, np.asarray(captions, dtype=np.int64), *self.prepare, train=True, rng=rng,
                               data=self.data)
            fields: dict[str, Any] = {f: getattr(batch, f) for f in _FIELDS}
            if batch.boxes is not None:  # region-phrase batches: where their regions and phrases lie
                fields["boxes"] = asdict(batch.boxes)
            buffer = io.BytesIO()
            torch.save(fields, buffer)
            payloads.append(buffer.getvalue())
        return {"step": np.asarray(rows["step"]), "payload": np.array(payloads, dtype=object)}


def _decode(payload: bytes) -> Batch:
    fields = torch.load(io.BytesIO(payload), weights_only=True)
    boxes = fields.pop("boxes", None)
    return Batch(**fields, boxes=None if boxes is None else Boxes(**boxes))


def ray_batches(store: str, split: str, plan: Sequence[tuple[int, np.ndarray]], prepare: tuple[Prepare, Prepare], *,
                seed: int, epoch: int, rank: int, actors: int = 1, prefetch: int = 2,
                actor_cpus: float = 0.0, data: Optional[DataConfig] = None) -> Iterator[Batch]:
    """This rank's batches for the planned steps, in step order, prepared by Ray Data actors."""
    import ray

    if not plan:
        return
    items: list[dict[str, Any]] = [{"step": int(s), "captions": np.asarray(c, dtype=np.int64)} for s, c in plan]
    ds = ray.data.from_items(items).map_batches(
        _PrepareSteps, fn_constructor_kwargs={"store": store, "split": split, "prepare": prepare, "seed": seed,
                                              "epoch": epoch, "rank": rank, "data": data},
        batch_size=1, concurrency=actors, num_cpus=actor_cpus, batch_format="numpy")
    pending: dict[int, bytes] = {}
    steps = iter(int(s) for s, _ in plan)
    want = next(steps)
    for rows in ds.iter_batches(batch_size=1, prefetch_batches=prefetch, batch_format="numpy"):
        pending[int(rows["step"][0])] = rows["payload"][0]
        while want in pending:  # Ray Data may finish steps out of order: hand them over in order
            yield _decode(pending.pop(want))
            want = next(steps, None)


__all__ = ["ray_batches"]
