"""What the end of a run costs (trainers.job.finalize), side by side in one run:

1. the overlap indicator's negative pairs (itmatch.eval.retrieval.pair_cosines, drawn for
   similarity.png and the `overlap` metric): up to 2M sampled (image, caption) pairs, their cosines
   read off one image-block x all-caption matmul per block (this tree), against gathering both rows
   of every pair and summing their product (the function at commit 67e577e, `--before`, read with
   `git show`); synthetic unit embeddings at test-split sizes (Flickr30K/COCO 1K, COCO 5K);
2. embedding the test split with encoder towers (EfficientNet-lite0 + MiniLM, model.image_size=224,
   untrained heads) on the Flickr8k-1k test split: a run's end used to do it twice (once for the
   metrics and plots, once more for the pictures); it now does it once (trainers.results.load_and_embed).

    .venv/bin/python bench/run_end.py [--dims 128 1024] [--repeats 3] [--budget-gb 6] [--skip-towers]
        [--before 67e577e]

The old way holds 3 x pairs x d floats at once (23 GB for 2M pairs at d = 1024: a 1,000-image test
split with 1024-d embeddings did not fit a 16 GB machine); it is run only where that fits --budget-gb.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from itmatch.eval.retrieval import pair_cosines  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "flickr8k-1k"


def gathered_at(rev: str) -> Callable:
    """pair_cosines as it was at `rev` (bench/retrieval_speed._module_at: read with `git show`):
    gather the two rows of every sampled pair, multiply, sum."""
    sys.path.insert(0, str(ROOT / "bench"))
    from retrieval_speed import _module_at

    return _module_at(rev).pair_cosines


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak live tensor storage made by fn (bench/mined_loss.TensorMemory), in an untimed call."""
    sys.path.insert(0, str(ROOT / "bench"))
    from mined_loss import TensorMemory

    with TensorMemory() as mem:
        fn()
    return mem.peak


def overlap_rows(dims: list[int], repeats: int, budget_gb: float, before: str) -> list[str]:
    """Both ways where the old one fits in budget_gb (it holds 3 x pairs x d floats: the gathered
    rows and their product); above that only this tree's, with the old one's need computed."""
    rows, gathered = [], gathered_at(before)
    for dim in dims:
        for n_img in (1000, 5000):
            g = torch.Generator().manual_seed(0)
            img = F.normalize(torch.randn(n_img, dim, generator=g), dim=1)
            txt_img = torch.arange(n_img).repeat_interleave(5)
            txt = F.normalize(img[txt_img] + torch.randn(len(txt_img), dim, generator=g), dim=1)
            new = pair_cosines(img, txt, txt_img)
            t_new = best_of(lambda: pair_cosines(img, txt, txt_img), repeats)
            m_new = peak_bytes(lambda: pair_cosines(img, txt, txt_img)) / 2**30
            need = 3 * len(new[1]) * dim * 4 / 2**30
            what = f"| negative-pair cosines, {n_img:,} images x {len(txt):,} captions, d={dim}, {len(new[1]):,} pairs"
            if need > budget_gb:
                rows.append(f"{what} | not run: needs {need:.1f} GB | {t_new:.3f} | | {m_new:.2f} GB | |")
                continue
            old = gathered(img, txt, txt_img)
            diff = float((new[1] - old[1]).abs().max())
            del old
            t_old = best_of(lambda: gathered(img, txt, txt_img), repeats)
            m_old = peak_bytes(lambda: gathered(img, txt, txt_img)) / 2**30
            rows.append(f"{what} | {t_old:.2f} ({m_old:.2f} GB) | {t_new:.3f} | {t_old / t_new:.1f}x | "
                        f"{m_new:.2f} GB | {diff:.1e} |")
    return rows


def tower_rows(repeats: int) -> list[str]:
    from itmatch.config import load_config
    from itmatch.data.raw import prepare_raw
    from itmatch.eval.evaluate import embed_split
    from itmatch.models import build_model

    with tempfile.TemporaryDirectory() as folder:
        store = prepare_raw(f"karpathy:{DATA / 'dataset_flickr8k_1k.json'}:{DATA / 'images'}", cache_dir=folder,
                            splits=["test"])
        cfg = load_config(None, ["model.image_tower=efficientnet_lite0", "model.text_tower=minilm",
                                 "model.image_size=224"])
        split = store.split("test")

        def end(passes: int) -> None:  # what finalize did: build the model, embed the split; per pass
            for _ in range(passes):
                embed_split(build_model(0, 0, cfg.model), split)

        twice, once = best_of(lambda: end(2), repeats), best_of(lambda: end(1), repeats)
    return [f"| a run's end: build the towers' model and embed the test split ({len(split.image_ids)} images at "
            f"224 px, {len(split)} captions), twice before / once now | {twice:.1f} | {once:.1f} | "
            f"{twice / once:.1f}x | | |"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-gb", type=float, default=6.0, help="run the old way only below this")
    parser.add_argument("--skip-towers", action="store_true")
    parser.add_argument("--before", default="67e577e", help="the git revision whose pair_cosines gathered rows")
    opts = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| what | before, s (peak) | now, s | ratio | now, peak | max abs difference |")
    print("|---|---|---|---|---|---|")
    for row in overlap_rows(opts.dims, opts.repeats, opts.budget_gb, opts.before):
        print(row, flush=True)
    if not opts.skip_towers and DATA.is_dir():
        for row in tower_rows(min(opts.repeats, 2)):
            print(row, flush=True)


if __name__ == "__main__":
    main()
