"""The plots a person looks at after a run (PNG files; the driver logs them to MLflow):

- similarity.png: histograms of positive- and negative-pair cosines with the overlap indicator S
  of 004 Eq. 10 (how much the two distributions overlap; lower is better);
- recall.png: R@K for K = 1..max_k, both directions;
- training.png: per-epoch training loss and validation metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from torch import Tensor

from itmatch.eval.retrieval import i2t_ranks, overlap_of, pair_cosines, t2i_ranks


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def similarity_histogram(img: Tensor, txt: Tensor, txt_img: Tensor, path: Path, *, bins: int = 100,
                         seed: int = 0) -> float:
    """Positive vs negative cosine histograms; returns the overlap indicator S of the very pairs
    plotted (the metric's own sampling)."""
    plt = _pyplot()
    pos_t, neg_t = pair_cosines(img, txt, txt_img, seed=seed)
    s = overlap_of(pos_t, neg_t)
    pos, neg = pos_t.numpy(), neg_t.numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    edges = np.linspace(-1, 1, bins + 1)
    ax.hist(neg, bins=edges, density=True, alpha=0.6, label=f"negative pairs ({len(neg):,} sampled)")
    ax.hist(pos, bins=edges, density=True, alpha=0.6, label=f"positive pairs ({len(pos):,})")
    ax.set(xlabel="cosine similarity", ylabel="density", title=f"image-caption similarity, overlap S = {s:.4f}")
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)
    return s


def recall_curve(img: Tensor, txt: Tensor, txt_img: Tensor, path: Path, *, max_k: int = 50) -> None:
    plt = _pyplot()
    ks = np.arange(1, max_k + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ranks in (("image→text", i2t_ranks(img, txt, txt_img.long())),
                        ("text→image", t2i_ranks(img, txt, txt_img.long()))):
        ax.plot(ks, [100.0 * np.mean(ranks <= k) for k in ks], label=name)
    ax.set(xlabel="K", ylabel="R@K (%)", xscale="log", ylim=(0, 100), title="recall at K")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    _save(fig, path)


def training_curves(history: Sequence[dict], path: Path, metric: str) -> None:
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, left = plt.subplots(figsize=(6, 3.5))
    if any("train_loss" in h for h in history):
        left.plot(epochs, [h.get("train_loss", np.nan) for h in history], color="tab:blue", label="train loss")
        left.set_ylabel("train loss", color="tab:blue")
    right = left.twinx()
    right.plot(epochs, [h.get(f"val_{metric}", np.nan) for h in history], color="tab:orange", marker=".")
    right.set_ylabel(f"val {metric}", color="tab:orange")
    left.set(xlabel="epoch", title="training")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)


def write_plots(img: Tensor, txt: Tensor, txt_img: Tensor, history: Sequence[dict], folder: Path,
                metric: str) -> dict[str, float]:
    """All three plots into `folder`; returns {"overlap": S}."""
    folder = Path(folder)
    s = similarity_histogram(img, txt, txt_img, folder / "similarity.png")
    recall_curve(img, txt, txt_img, folder / "recall.png")
    if history:
        training_curves(history, folder / "training.png", metric)
    return {"overlap": s}


__all__ = ["similarity_histogram", "recall_curve", "training_curves", "write_plots"]
