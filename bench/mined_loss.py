"""Time and peak memory of the mined ranking loss (Eq. 6, K = 10), forward + backward.

(a) reference: the straightforward way, one process holding the whole global batch: for every
    term the [positive pairs, candidates] hinge matrix, masked, top-k, summed.
(b) itmatch.losses.ranking_loss as one of N workers runs it: its G/N local anchors against all G
    gathered candidates (the gathered block is a leaf that receives gradients, as DistGather's
    output does before its all-reduce). Communication is not included; everything else is.

Peak memory is the peak of live tensor storage during forward + backward, inputs excluded: on CUDA
torch.cuda.max_memory_allocated, on CPU the same quantity tracked by a dispatch mode. Times are
medians of interleaved rounds (every method once per round), so a shared CPU slows all alike.

    .venv/bin/python bench/mined_loss.py [--batches 500 1000 4000] [--workers 1 2 4] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from itmatch.losses.ranking import ranking_loss  # noqa: E402

DIM, K, MARGIN, CAPS_PER_IMAGE = 512, 10, 0.2, 2
LAMBDAS = (1.0, 1.5, 0.1, 0.1)


def _batch(g: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    n_img = g // CAPS_PER_IMAGE
    img = F.normalize(torch.randn(n_img, DIM, generator=gen), dim=1).to(device)
    txt = F.normalize(torch.randn(g, DIM, generator=gen), dim=1).to(device)
    return img, torch.arange(n_img, device=device), txt, torch.arange(g, device=device) // CAPS_PER_IMAGE


def _ref_term(anchor, a_gid, cand, c_gid, same_set: bool):
    cost = torch.sqrt(torch.clamp(2 - 2 * anchor @ cand.T, min=1e-12))
    pos = a_gid[:, None] == c_gid[None, :]
    if same_set:
        pos = pos & ~torch.eye(len(anchor), dtype=torch.bool, device=anchor.device)
    a_idx, p_idx = pos.nonzero(as_tuple=True)
    hinge = MARGIN + cost[a_idx, p_idx][:, None] - cost[a_idx]  # [positive pairs, candidates]
    hinge = hinge.masked_fill(pos[a_idx] | (a_gid[a_idx][:, None] == c_gid[None, :]), 0).clamp_min(0)
    return hinge.topk(min(K, hinge.shape[1]), dim=1).values.sum()


def reference(img, img_gid, txt, txt_gid):
    img, txt = img.requires_grad_(True), txt.requires_grad_(True)
    terms = [_ref_term(img, img_gid, txt, txt_gid, False), _ref_term(txt, txt_gid, img, img_gid, False),
             _ref_term(img, img_gid, img, img_gid, True), _ref_term(txt, txt_gid, txt, txt_gid, True)]
    n_pos = (img_gid[:, None] == txt_gid[None, :]).sum()
    loss = sum(lam * t for lam, t in zip(LAMBDAS, terms)) / n_pos
    loss.backward()
    return loss


class _OneWorkerOf:
    """What `DistGather` gives rank 0 of `world`: its rows are the first block of every gather."""

    def __init__(self, world: int, img_all, img_gid_all, txt_all, txt_gid_all):
        self.world_size = world
        self.img_all, self.txt_all = img_all.requires_grad_(True), txt_all.requires_grad_(True)
        self.gids = (img_gid_all, txt_gid_all)

    def local(self):
        ni, nt = len(self.img_all) // self.world_size, len(self.txt_all) // self.world_size
        return self.img_all[:ni], self.gids[0][:ni], self.txt_all[:nt], self.gids[1][:nt]

    def cat(self, t):  # local rows are views at the start of the gathered block
        return self.img_all if t.data_ptr() == self.img_all.data_ptr() else self.txt_all

    def cat_nograd(self, t):
        return self.gids[0] if t.data_ptr() == self.gids[0].data_ptr() else self.gids[1]

    def offset(self, n_local: int) -> int:
        return 0

    def sum(self, t):
        return t * self.world_size

    def layout(self, *n_local: int):  # cat tells images from captions by the tensor itself
        return tuple(self for _ in n_local)


def project(img, img_gid, txt, txt_gid, world: int):
    gather = _OneWorkerOf(world, img, img_gid, txt, txt_gid)
    li, lig, lt, ltg = gather.local()
    out = ranking_loss(li, lig, lt, ltg, lambdas=LAMBDAS, margin=MARGIN, top_k=K, gather=gather)
    out["loss"].backward()
    return out["loss"]


class TensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storage created inside the block: the CPU analogue of
    torch.cuda.max_memory_allocated (process RSS would mostly measure the allocator's caching)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[int, weakref.ref]] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, (0, None))[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views, in-place and out= results share an argument's storage: not new memory (and a view
        # of a tensor made before the block, an input, must not be counted as made inside it).
        seen = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in seen:
                    self.live[key] = (storage.nbytes(), weakref.ref(storage, lambda _, k=key: self._free(k)))
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
        return out


def _call(method: str, world: int):
    return (lambda *b: reference(*b)) if method == "reference" else (lambda *b: project(*b, world))


def _seconds(fn, g: int, device: torch.device) -> float:
    batch = _batch(g, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_mib(fn, g: int, device: torch.device) -> float:
    """Peak tensor memory of one forward+backward, inputs excluded, in MiB."""
    batch = _batch(g, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(*batch)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with TensorMemory() as tracker:
        fn(*batch)
    return tracker.peak / 2**20


def measure(rows: list[tuple[str, str, int]], g: int, device: torch.device, repeats: int) -> list[dict]:
    """Median time of `repeats` forward+backward passes per row, the rows interleaved (one round of
    every row, repeated, after a warm-up round) so a shared CPU slows them alike; and peak memory."""
    fns = [_call(method, world) for _, method, world in rows]
    times: list[list[float]] = [[] for _ in rows]
    for round_ in range(repeats + 1):
        for fn, t in zip(fns, times):
            seconds = _seconds(fn, g, device)
            if round_:
                t.append(seconds)
    return [{"time_ms": 1000 * statistics.median(t), "peak_mib": peak_mib(fn, g, device)}
            for fn, t in zip(fns, times)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[500, 1000, 4000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, d={DIM}, K={K}, "
          f"{CAPS_PER_IMAGE} captions per image, lambdas {LAMBDAS}; memory = peak tensor memory of fwd+bwd; "
          f"median of {args.repeats} interleaved rounds")
    print("| global batch | method | time fwd+bwd (ms) | peak memory (MiB) | time / reference | memory / reference |")
    print("|---|---|---|---|---|---|")
    for g in args.batches:
        rows = [("reference (one process, [pairs, G] hinge matrix + top-k)", "reference", 1)]
        rows += [(f"itmatch, one of {n} workers ([G/{n}, G] scores)", "project", n) for n in args.workers]
        results = measure(rows, g, device, args.repeats)
        ref = results[0]
        for (label, _, _), r in zip(rows, results):
            print(f"| {g} | {label} | {r['time_ms']:.1f} | {r['peak_mib']:.1f} | "
                  f"{r['time_ms'] / ref['time_ms']:.2f} | {r['peak_mib'] / ref['peak_mib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
