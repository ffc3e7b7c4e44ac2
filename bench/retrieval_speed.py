"""Time and peak memory of ranking a large gallery (i2t + t2i ranks), against the sgemm bound.

The bound is the bare GEMM of the same score blocks, `img[rows] @ txt.T` then `txt[rows] @ img.T`,
timed in the same process and interleaved with the methods (one round of every method, repeated),
so a shared CPU slows all of them alike. Methods:

- itmatch: `retrieval_metrics` of this tree (i2t and t2i ranks, recalls, median/mean ranks);
- before: the same function from an earlier commit (`--before REV`, read with `git show`), whose
  blocks were `chunk` = 1024 query rows, so its ratio is against the bound of 1024-row blocks.

Peak extra memory is the peak of live tensor storage created by the call, inputs excluded (on CUDA
torch.cuda.max_memory_allocated; on CPU mined_loss.TensorMemory, a dispatch mode, in a separate
untimed call).

    .venv/bin/python bench/retrieval_speed.py [--images 5000] [--captions-per-image 5] [--dim 1024]
        [--before d9bd6b6] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from itmatch.eval import retrieval  # noqa: E402
from mined_loss import TensorMemory  # noqa: E402

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _data(n_img: int, per_img: int, dim: int, device: torch.device) -> Inputs:
    """Unit-norm images and captions near their image, so ranks are neither all 1 nor random."""
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(n_img, dim, generator=g), dim=1)
    txt_img = torch.arange(n_img).repeat_interleave(per_img)
    txt = F.normalize(img[txt_img] + 1.5 * torch.randn(len(txt_img), dim, generator=g) / dim ** 0.5, dim=1)
    return img.to(device), txt.to(device), txt_img.to(device)


def sgemm_bound(img: torch.Tensor, txt: torch.Tensor, i2t_rows: int, t2i_rows: int) -> None:
    """The GEMMs a chunked ranking cannot avoid, as a user would write them."""
    for start in range(0, len(img), i2t_rows):
        img[start:start + i2t_rows] @ txt.T
    for start in range(0, len(txt), t2i_rows):
        txt[start:start + t2i_rows] @ img.T


def _module_at(rev: str) -> ModuleType:
    """itmatch/eval/retrieval.py as it was at `rev`, imported under another name."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:itmatch/eval/retrieval.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"retrieval_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak tensor memory created during one call, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with TensorMemory() as tracker:
        fn()
    return tracker.peak / 2**20


def _methods(args: argparse.Namespace, data: Inputs) -> list[tuple[str, str, Callable[[], object]]]:
    """(label, which bound it is compared with, call)."""
    img, txt, txt_img = data
    rows = (retrieval._block_rows(1024, len(txt), img.dtype), retrieval._block_rows(1024, len(img), img.dtype))
    out = [(f"sgemm bound, itmatch's blocks ({rows[0]} / {rows[1]} query rows)", "blocks",
            lambda: sgemm_bound(img, txt, *rows)),
           ("itmatch retrieval_metrics (this tree)", "blocks", lambda: retrieval.retrieval_metrics(img, txt, txt_img))]
    if args.before:
        old = _module_at(args.before)
        out += [("sgemm bound, 1024-row blocks", "1024", lambda: sgemm_bound(img, txt, 1024, 1024)),
                (f"itmatch retrieval_metrics at {args.before} (before)", "1024",
                 lambda: old.retrieval_metrics(img, txt, txt_img))]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--before", default="", help="a git revision to compare with (e.g. d9bd6b6)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    data = _data(args.images, args.captions_per_image, args.dim, device)
    methods = _methods(args, data)
    times: dict[str, list[float]] = {label: [] for label, _, _ in methods}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for label, _, fn in methods:
            times[label].append(_seconds(fn, device))
    median = {label: statistics.median(t[1:]) for label, t in times.items()}
    bound = {kind: median[label] for label, kind, _ in methods if label.startswith("sgemm")}
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {args.images} images x "
          f"{args.images * args.captions_per_image} captions, d={args.dim}, fp32, i2t + t2i ranks; "
          f"median of {args.repeats} interleaved rounds; inputs {sum(t.nbytes for t in data) / 2**20:.0f} MiB")
    print("| method | time (s) | time / sgemm bound of its blocks | time / fastest bound | peak extra memory (MiB) |")
    print("|---|---|---|---|---|")
    for label, kind, fn in methods:
        t = median[label]
        print(f"| {label} | {t:.2f} | {t / bound[kind]:.2f} | {t / min(bound.values()):.2f} | "
              f"{peak_mib(fn, device):.1f} |", flush=True)


if __name__ == "__main__":
    main()
