"""Run plots: files written, and the overlap they report is the metric's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from itmatch.eval.plots import write_plots
from itmatch.eval.retrieval import overlap_indicator


def test_plots_written_and_overlap_reported(tmp_path):
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    txt_img = torch.arange(40).repeat_interleave(3)
    txt = F.normalize(img[txt_img] + 0.3 * torch.randn(120, 8, generator=g), dim=1)
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_rsum": 100.0 + e} for e in range(1, 4)]
    out = write_plots(img, txt, txt_img, history, tmp_path / "plots", "rsum")
    for name in ("similarity.png", "recall.png", "training.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert out["overlap"] == overlap_indicator(img, txt, txt_img)
    assert 0 < out["overlap"] < 0.5  # captions near their image: the distributions barely overlap
