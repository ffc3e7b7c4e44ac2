"""Time and peak memory of the mined ranking loss (Eq. 6, K = 10), forward + backward.

(a) reference: the straightforward way, one process holding the whole global batch: for every
    term the [positive pairs, candidates] hinge matrix, masked, top-k, summed.
(b) itmatch.losses.ranking_loss as one of N workers runs it: its G/N local anchors against all G
    gathered candidates (the gathered block is a leaf that receives gradients, as DistGather's
    output does before its all-reduce). Communication is not included; everything else is.

Each measurement runs in a fresh process, so peak memory is that computation's alone: on CPU the
rise of peak RSS over the inputs, on CUDA torch.cuda.max_memory_allocated.

    .venv/bin/python bench/mined_loss.py [--batches 500 1000 4000] [--workers 1 2 4] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

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


def project(img, img_gid, txt, txt_gid, world: int):
    gather = _OneWorkerOf(world, img, img_gid, txt, txt_gid)
    li, lig, lt, ltg = gather.local()
    out = ranking_loss(li, lig, lt, ltg, lambdas=LAMBDAS, margin=MARGIN, top_k=K, gather=gather)
    out["loss"].backward()
    return out["loss"]


def measure(method: str, g: int, world: int, device: str, repeats: int) -> dict:
    """Median time of `repeats` forward+backward passes (after one warm-up); CUDA peak memory."""
    dev = torch.device(device)
    fn = (lambda *b: reference(*b)) if method == "reference" else (lambda *b: project(*b, world))
    fn(*_batch(g, dev))
    times, peak = [], None
    for _ in range(repeats):
        batch = _batch(g, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn(*batch)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        times.append(time.perf_counter() - start)
    return {"time_ms": 1000 * sorted(times)[len(times) // 2], "peak_mib": peak}


def _child(method: str, g: int, world: int, device: str, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(g), str(world), device, str(repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu_peak_child(method: str, g: int, world: int, device: str) -> float:
    """Peak RSS rise of one forward+backward in a process that did nothing else large before."""
    dev = torch.device(device)
    batch = _batch(g, dev)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if method == "reference":
        reference(*batch)
    else:
        project(*batch, world)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        method, g, world, device, repeats = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
        print(json.dumps(measure(method, g, world, device, repeats)))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--peak":
        print(json.dumps(_cpu_peak_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[500, 1000, 4000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, d={DIM}, K={K}, "
          f"{CAPS_PER_IMAGE} captions per image, lambdas {LAMBDAS}")
    print("| global batch | method | time fwd+bwd (ms) | peak memory (MiB) | time / reference | memory / reference |")
    print("|---|---|---|---|---|---|")
    for g in args.batches:
        rows = [("reference (one process, [pairs, G] hinge matrix + top-k)", "reference", 1)]
        rows += [(f"itmatch, one of {n} workers ([G/{n}, G] scores)", "project", n) for n in args.workers]
        ref = None
        for label, method, n in rows:
            r = _child(method, g, n, args.device, args.repeats)
            if args.device == "cpu":
                r["peak_mib"] = json.loads(subprocess.run(
                    [sys.executable, __file__, "--peak", method, str(g), str(n), args.device],
                    capture_output=True, text=True, timeout=900, check=True).stdout.strip().splitlines()[-1])
            ref = ref or r
            print(f"| {g} | {label} | {r['time_ms']:.1f} | {r['peak_mib']:.1f} | "
                  f"{r['time_ms'] / ref['time_ms']:.2f} | {r['peak_mib'] / max(ref['peak_mib'], 1e-9):.2f} |", flush=True)


if __name__ == "__main__":
    main()
